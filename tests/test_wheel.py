"""The built wheel runs anywhere: configs and kernels inside the gradcam_batch namespace."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_runs_the_demo_from_an_unrelated_directory(tmp_path):
    # Built from a copy: setuptools reuses a checkout's build/ folder, whose stale modules would
    # land in the wheel and could hide a file the package no longer ships.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", ".whl", "build", "*.egg-info", "__pycache__",
                                                  ".pytest_cache", "gradcam-out"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("gradcam_batch-*.whl")
    # A fresh environment: the wheel installed on its own, the test environment's packages for its
    # dependencies only (a plain path entry, so this checkout's editable install is not loaded).
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert not (site / "kernels").exists(), "the wheel must not install a top-level `kernels` package"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([str(python), "-c", "import gradcam_batch, gradcam_batch.kernels.cam as cam; "
                            "print(gradcam_batch.__file__); print(cam.__file__)"],
                           cwd=elsewhere, check=True, capture_output=True, text=True).stdout.split()
    assert all(path.startswith(str(site)) for path in probe), probe
    run = subprocess.run([str(python), "-m", "gradcam_batch", "output.dir=out", "runtime.progress=false",
                          "data.demo_images=200"], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "images      200" in run.stdout
    assert list((elsewhere / "out" / "cams").glob("part-*.parquet"))
