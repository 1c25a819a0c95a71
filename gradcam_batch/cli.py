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
    # The settings are checked before torch is imported (seconds): a mistake on the command
    # line is its one line at once, and nothing is written.
    try:
        config = OmegaConf.to_object(cfg)
        config.data.check_settings_used()
        config.check_all_targets()
    except UserError as error:
        print(f"gradcam-batch: error: {error}", file=sys.stderr)
        sys.exit(2)
    from gradcam_batch import dist, pipeline
    from gradcam_batch.writer import OutputWriteError

    # Under torchrun every rank would print the same lines: rank 0 tells the story, the others
    # speak only for warnings and errors, and say which rank they are.
    rank, world = dist.rank(), dist.world_size()
    prefix = f"gradcam-batch [rank {rank}]" if world > 1 and rank else "gradcam-batch"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"{prefix}: %(message)s", force=True)
    logging.getLogger("gradcam_batch").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("hydra").setLevel(logging.WARNING)  # its launcher's "#1 : ..." lines: the job header says it
    try:
        job = _per_job_output_dir(config, cfg)
        if job is not None and dist.is_main():  # a sweep: say which job the lines below belong to
            print(f"== job {job}: {' '.join(_job_overrides()) or '(defaults)'} -> {config.output.dir}", flush=True)
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


def _per_job_output_dir(config, cfg: DictConfig) -> int | None:
    """Under --multirun every job writes to <output.dir>/<job number>, so the jobs of a sweep
    (-m cam.method=gradcam,layercam) never share, and refuse, one folder. Returns the job number
    under --multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    config.output.dir = str(Path(config.output.dir) / str(hydra_cfg.job.num))
    cfg.output.dir = config.output.dir  # the manifest records the folder actually used
    return hydra_cfg.job.num


def _job_overrides() -> list[str]:
    """The overrides that make this sweep job what it is (those of the sweep, not the shared ones)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


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
