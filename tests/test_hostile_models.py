"""Model folders prepared by someone else: their code never runs, weights that do not fit are
refused, and nothing prompts on stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sample_data import make_imagefolder

pytest.importorskip("transformers")

CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import ViTForImageClassification as {name}
"""


def run(*overrides: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradcam_batch", *overrides], input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def common(tmp_path, folder) -> list[str]:
    make_imagefolder(tmp_path / "data", per_class=(1, 1))
    return ["model=huggingface", f"model.name={folder}", "data=imagefolder", f"data.root={tmp_path / 'data'}",
            "data.num_workers=0", "runtime.progress=false", f"output.dir={tmp_path / 'out'}"]


def plant_code(folder, config_file: str, auto_class: str, marker) -> None:
    (folder / "custom_model.py").write_text(CUSTOM_CODE.format(marker=str(marker), name="Custom"))
    config = json.loads((folder / config_file).read_text())
    config["auto_map"] = {auto_class: "custom_model.Custom"}
    (folder / config_file).write_text(json.dumps(config))


@pytest.mark.parametrize("config_file, auto_class", [("config.json", "AutoModelForImageClassification"),
                                                      ("preprocessor_config.json", "AutoImageProcessor")])
def test_a_folder_with_its_own_code_is_refused_and_the_code_never_runs(tmp_path, config_file, auto_class):
    from test_model_families import save_tiny_hf_vit

    folder = tmp_path / "vit"
    save_tiny_hf_vit(folder)
    marker = tmp_path / "code-ran"
    plant_code(folder, config_file, auto_class, marker)
    result = run(*common(tmp_path, folder), stdin="y\n" * 20)  # `yes |`: a prompt would run the code
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "never runs" in lines[0] and "auto_map" in lines[0], result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "cams").exists()


def test_the_custom_code_check_also_holds_inside_transformers(tmp_path, monkeypatch):
    """A cached hub id is not a folder the pre-check can read: transformers loads its built-in
    class without asking (trust_remote_code=False), and the loaded config's auto_map is refused."""
    from gradcam_batch import UserError
    from gradcam_batch import model_sources
    from gradcam_batch.config import ModelConfig
    from test_model_families import save_tiny_hf_vit

    folder = tmp_path / "vit"
    save_tiny_hf_vit(folder)
    marker = tmp_path / "code-ran"
    plant_code(folder, "config.json", "AutoModelForImageClassification", marker)
    monkeypatch.setattr(model_sources, "_CUSTOM_CODE_FILES", ())  # skip the pre-check
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(UserError, match="never runs"):
        model_sources.huggingface_model(ModelConfig(source="huggingface", name=str(folder)))
    assert not marker.exists()


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "base"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    transformers.ViTModel(config).save_pretrained(folder)  # a base model: no classifier in the weights
    config.architectures = ["ViTForImageClassification"]
    config.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    result = run(*common(tmp_path, folder))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "do not fit" in line and "missing" in line and "classifier" in line, line
    assert not (tmp_path / "out" / "cams").exists()
