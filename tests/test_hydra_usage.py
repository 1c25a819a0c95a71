"""Hydra as Hydra users expect it: help, list values, no schema options, multirun folders."""

from cli_helpers import TINY_RESNET, read_cams, run_cli
from sample_data import make_webdataset


def test_help_describes_the_project_and_hides_schema_entries():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "gradcam-batch: Grad-CAM over whole image datasets" in result.stdout
    assert "powered by Hydra" not in result.stdout
    groups = result.stdout.split("== Option groups (group=option) ==")[1].split("==")[0]
    assert "data: demo, demo_shortcut, imagefolder, parquet, webdataset" in groups
    assert "model: checkpoint, demo, demo_shortcut, huggingface, timm, torchvision" in groups
    assert "schema" not in groups


def test_schema_is_not_an_option():
    result = run_cli("data=schema", "runtime.progress=false")
    assert result.returncode != 0


def test_shards_as_a_hydra_list(tmp_path):
    expected = make_webdataset(tmp_path / "data", shards=3, per_shard=2)
    first, second = (tmp_path / "data" / f"shard-{index:04d}.tar" for index in (0, 2))
    result = run_cli(*TINY_RESNET, "data=webdataset", f"data.shards=[{first},{second}]",
                     f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    ids = sorted(read_cams(tmp_path / "out")["sample_id"].to_pylist())
    assert ids == sorted(key for key in expected if key.startswith(("s0/", "s2/")))
