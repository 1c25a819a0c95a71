"""The checkout's layout: kernels/ and conf/ at the root, shipped inside gradcam_batch from one
copy, and no folder at the root that shadows an installed distribution when the root is on
sys.path (pytest, `python -m gradcam_batch` and torchrun from the checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def top_level_folders() -> list[Path]:
    return sorted(path for path in ROOT.iterdir()
                  if path.is_dir() and not path.name.startswith(".") and path.name != "build"
                  and not path.name.endswith(".egg-info"))


def test_no_root_folder_is_a_regular_package_but_gradcam_batch():
    # A folder with __init__.py on sys.path wins over an installed distribution of that name
    # (transformers imports the `kernels` distribution); one without is only a namespace
    # portion, which any installed package of the same name replaces.
    packages = [path.name for path in top_level_folders() if (path / "__init__.py").exists()]
    assert packages == ["gradcam_batch"]


@pytest.mark.parametrize("folder", ["kernels", "conf"])
def test_root_folders_are_the_one_copy_shipped_in_the_package(folder):
    files = sorted(path.relative_to(ROOT / folder) for path in (ROOT / folder).rglob("*")
                   if path.is_file() and "__pycache__" not in path.parts)
    assert files, f"{folder}/ is empty"
    for relative in files:
        shipped = ROOT / "gradcam_batch" / folder / relative
        assert shipped.exists(), f"{folder}/{relative} is not reachable as gradcam_batch/{folder}/{relative}: add a link"
        assert shipped.resolve() == (ROOT / folder / relative).resolve(), f"gradcam_batch/{folder}/{relative} is a copy"


def test_root_kernels_does_not_shadow_the_kernels_distribution():
    installed = pytest.importorskip("kernels")  # transformers 5 installs it; pyproject's test extra names it
    assert Path(installed.__file__).resolve().parent != (ROOT / "kernels").resolve()
    probe = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).resolve().parent != (ROOT / "kernels").resolve(), probe.stdout


def test_python_m_runs_a_hugging_face_model_from_the_checkout_root(tmp_path):
    pytest.importorskip("kernels")
    from sample_data import make_imagefolder
    from test_model_families import save_tiny_hf_vit

    save_tiny_hf_vit(tmp_path / "vit")
    make_imagefolder(tmp_path / "data", per_class=(1, 1))
    result = subprocess.run(
        [sys.executable, "-m", "gradcam_batch", "model=huggingface", f"model.name={tmp_path / 'vit'}",
         "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_workers=0", "runtime.progress=false",
         f"output.dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "out" / "cams").glob("part-*.parquet"))
