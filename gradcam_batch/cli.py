"""Command line: `gradcam-batch [hydra overrides]` (also `python -m gradcam_batch`).

The bare command runs the offline demo. Mistakes a user can make print one line on stderr and
exit with code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from gradcam_batch import UserError
from gradcam_batch.config import register_configs

# The configs ship inside the package, so an installed wheel finds them wherever it runs.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

register_configs()


def _hydra_main(cfg: DictConfig) -> None:
    from gradcam_batch import dist, pipeline

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="gradcam-batch: %(message)s")
    logging.getLogger("gradcam_batch").setLevel(logging.INFO)
    try:
        config = OmegaConf.to_object(cfg)
        summary = pipeline.run(config, OmegaConf.to_container(cfg, resolve=True))
    except UserError as error:
        print(f"gradcam-batch: error: {error}", file=sys.stderr)
        sys.exit(2)
    if dist.is_main():
        print("\n".join(summary.lines()), flush=True)


def main() -> None:
    hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")(_hydra_main)()
    # Everything is written, fsynced and renamed, and the process group is gone; skip the
    # interpreter's ~1 s teardown of torch's modules.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
