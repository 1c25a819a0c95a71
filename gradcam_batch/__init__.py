"""gradcam-batch: batched Grad-CAM over whole image datasets, written to Parquet."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value): reported as one line, exit code 2."""
