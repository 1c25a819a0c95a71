"""Run the command line in a subprocess (exit codes, stderr) or in-process through Hydra's
compose API with the same config files (fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradcam_batch.cli import CONFIG_DIR

TINY_RESNET = ["model=torchvision", "model.name=resnet18", "data.resize=64", "data.crop=64",
               "data.num_workers=0", "runtime.progress=false"]


def merged(*overrides: str) -> list[str]:
    """The overrides with each key once, the last value winning: tests start from TINY_RESNET and
    change some of its settings, while the command line refuses a key given twice."""
    last = {}
    for index, token in enumerate(overrides):
        key = token.split("=", 1)[0] if "=" in token and not token.startswith("-") else f"#{index}"
        last[key] = token
    seen, kept = set(), []
    for index, token in enumerate(overrides):
        key = token.split("=", 1)[0] if "=" in token and not token.startswith("-") else f"#{index}"
        if key not in seen:
            seen.add(key)
            kept.append(last[key])
    return kept


def run_cli(*overrides: str, cwd: Path | None = None, timeout: int = 300,
            as_typed: bool = False) -> subprocess.CompletedProcess:
    """`as_typed`: pass repeated keys through, as a user's shell would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    arguments = list(overrides) if as_typed else merged(*overrides)
    return subprocess.run([sys.executable, "-m", "gradcam_batch", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_composed(*overrides: str):
    from gradcam_batch import pipeline

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=merged(*overrides))
    return pipeline.run(OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True))


def read_cams(output_dir: Path):
    return ds.dataset(Path(output_dir) / "cams", format="parquet").to_table()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(log_dir: Path, *overrides: str, world_size: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """The ranks of one job as separate processes, launched the way SLURM's srun does (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT), so a test can signal one rank and read each one's output.
    Rank r writes to log_dir/rank<r>.out and .err."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world_size), **(env or {})}
    processes = []
    for rank in range(world_size):
        with open(log_dir / f"rank{rank}.out", "w") as out, open(log_dir / f"rank{rank}.err", "w") as err:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gradcam_batch", *merged(*overrides)], stdout=out, stderr=err,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    return processes


def finish_ranks(log_dir: Path, processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of every rank; kills all of them if one overruns."""
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(process.returncode, (log_dir / f"rank{rank}.out").read_text(), (log_dir / f"rank{rank}.err").read_text())
            for rank, process in enumerate(processes)]
