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


# --- model files that would allocate gigabytes before "does not fit" --------------------------

def test_a_deflated_weights_file_far_larger_than_the_model_is_refused_before_it_is_read(tmp_path):
    import zipfile

    import torch

    from cli_helpers import TINY_RESNET, run_cli

    # a torch.save zip whose one tensor (~256 MiB of zeros) is deflated to a few hundred kB
    plain = tmp_path / "plain.pth"
    torch.save({"fc.weight": torch.zeros(64, 2**20)}, plain)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    assert bomb.stat().st_size < 2 * 2**20
    result = run_cli(*TINY_RESNET, f"model.weights={bomb}", f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "MiB of tensors (uncompressed), far more than the model's" in line, line


def test_a_weights_file_of_the_right_size_still_loads(tmp_path):
    import torch
    import torchvision

    from gradcam_batch.models import load_state_dict

    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    assert load_state_dict(str(tmp_path / "r18.pth"), model).keys() == model.state_dict().keys()


def test_a_folder_whose_weights_are_far_smaller_than_its_config_is_refused_before_allocating(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    folder = tmp_path / "big-vit"
    folder.mkdir()
    config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000,
                                    architectures=["ViTForImageClassification"])
    config.save_pretrained(folder)
    save_file({}, str(folder / "model.safetensors"))  # empty weights
    result = run(*common(tmp_path, folder))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "weight files hold 0.0 MiB" in line and "missing or cut short" in line, line


def test_a_processor_asking_for_huge_images_is_refused(tmp_path):
    from test_model_families import save_tiny_hf_vit

    folder = tmp_path / "vit"
    save_tiny_hf_vit(folder, processor_size=40000)
    result = run(*common(tmp_path, folder))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "asks for 40000-pixel images" in result.stderr.strip().splitlines()[-1]


def test_a_pickled_bin_is_one_line(tmp_path):
    import pickle

    from test_model_families import save_tiny_hf_vit

    folder = tmp_path / "vit"
    save_tiny_hf_vit(folder)
    size = (folder / "model.safetensors").stat().st_size
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:  # a pickle, not a torch zip
        pickle.dump({"x": 1}, handle)
        handle.write(b"\0" * size)
    result = run(*common(tmp_path, folder))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("gradcam-batch: error: model.name=")
