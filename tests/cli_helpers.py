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


def run_cli(*overrides: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gradcam_batch", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_composed(*overrides: str):
    from gradcam_batch import pipeline

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return pipeline.run(OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True))


def read_cams(output_dir: Path):
    return ds.dataset(Path(output_dir) / "cams", format="parquet").to_table()
