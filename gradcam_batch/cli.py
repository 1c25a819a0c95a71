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
    from gradcam_batch.writer import OutputWriteError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="gradcam-batch: %(message)s")
    logging.getLogger("gradcam_batch").setLevel(logging.INFO)
    try:
        config = OmegaConf.to_object(cfg)
        _per_job_output_dir(config, cfg)
        summary = pipeline.run(config, OmegaConf.to_container(cfg, resolve=True))
    except UserError as error:
        print(f"gradcam-batch: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (OutputWriteError, dist.CollectiveTimeout) as error:
        # Not the user's mistake, but nothing a traceback would explain better: a full disk or
        # a stalled rank, in one line; exit 1, and a rerun resumes once it is fixed.
        print(f"gradcam-batch: error: {error}", file=sys.stderr)
        sys.exit(1)
    if dist.is_main():
        print("\n".join(summary.lines()), flush=True)
    if summary.samples_seen and not summary.images:
        print(f"gradcam-batch: error: none of the {summary.samples_seen} samples could be read or decoded; "
              f"see {summary.output_dir}/errors/", file=sys.stderr)
        sys.exit(1)


def _per_job_output_dir(config, cfg: DictConfig) -> None:
    """Under --multirun every job writes to <output.dir>/<job number>, so the jobs of a sweep
    (-m cam.method=gradcam,layercam) never share, and refuse, one folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        config.output.dir = str(Path(config.output.dir) / str(hydra_cfg.job.num))
        cfg.output.dir = config.output.dir  # the manifest records the folder actually used


def main() -> None:
    from gradcam_batch.overrides import check_overrides

    try:
        check_overrides(sys.argv[1:], CONFIG_DIR)
    except UserError as error:
        print(f"gradcam-batch: error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")(_hydra_main)()
    except KeyboardInterrupt:
        # Complete units are renamed into place, the unit in progress is left as a temporary:
        # the same command resumes where this one stopped.
        print("\ngradcam-batch: interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        os._exit(130)
    # Everything is written, fsynced and renamed, and the process group is gone; skip the
    # interpreter's ~1 s teardown of torch's modules.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
