"""Triton kernels of gradcam-batch; each has a pure-PyTorch twin in gradcam_batch.methods."""

from gradcam_batch.kernels.cam import fused_cam

__all__ = ["fused_cam"]
