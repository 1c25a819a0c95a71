"""Values a user can type that used to allocate gigabytes, fail deep inside a library or leave a
traceback: each is one line with exit code 2 before anything is written."""

from __future__ import annotations

import math
import shutil

import pytest

from cli_helpers import TINY_RESNET, read_cams, run_cli, run_composed
from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, DataConfig, OutputConfig, RuntimeConfig


@pytest.mark.parametrize("make, names", [
    (lambda: DataConfig(resize=1_000_000), "data.resize=1000000"),  # 26 GB per image
    (lambda: DataConfig(crop=100_000, resize=100_000), "data.resize=100000"),
    (lambda: OutputConfig(cam_size=[100_000, 100_000]), "output.cam_size=[100000, 100000]"),
    (lambda: OutputConfig(cam_size=[1025, 7]), "output.cam_size=[1025, 7]"),
    (lambda: RuntimeConfig(threads=100_000), "runtime.threads=100000"),  # libgomp fails
    (lambda: DataConfig(mean=[math.nan, 0.4, 0.4]), "data.mean=[nan"),
    (lambda: DataConfig(mean=[math.inf, 0.4, 0.4]), "data.mean=[inf"),
    (lambda: DataConfig(std=[0.2, 0.2, 1e-9]), "data.std=[0.2, 0.2, 1e-09]"),
    (lambda: DataConfig(std=[0.2, math.inf, 0.2]), "data.std=[0.2, inf"),
    (lambda: DataConfig(demo_images=0), "data.demo_images=0"),
    (lambda: DataConfig(demo_images=-5), "data.demo_images=-5"),
    (lambda: CamConfig(targets="classes", classes=[10**30]), "cam.classes[...]="),
    (lambda: CamConfig(targets="topk", topk=10**30), "cam.topk="),
    (lambda: OutputConfig(queue_size=10**9), "output.queue_size="),
])
def test_values_past_their_ceiling_are_named(make, names):
    with pytest.raises(UserError) as caught:
        make()
    assert str(caught.value).startswith(names), str(caught.value)
    assert "\n" not in str(caught.value)


def test_sizes_at_their_ceiling_pass():
    DataConfig(resize=4096, crop=4096)
    OutputConfig(cam_size=[1024, 1024])
    RuntimeConfig(threads=1)
    DataConfig(mean=[0.5, 0.5, 0.5], std=[1e-4, 1, 1])


@pytest.mark.parametrize("override, said", [
    ("data.batch_size=abc", "data.batch_size=abc: Value 'abc'"),
    ("cam.classes=[1e30]", "cam.classes=[1e30]: Value '1e+30'"),
    ("cam.topk=1e30", "cam.topk=1e30"),
    ("runtime.amp=[1,2]", "runtime.amp=[1,2]"),
    ("output.cam_size=[100000,100000]", "output.cam_size=[100000, 100000] is not valid"),
    ("data.resize=1000000", "data.resize=1000000 is not valid"),
    ("runtime.threads=100000", "runtime.threads=100000 is not valid"),
    ("data.std=[0.2,0.2,0]", "data.std=[0.2, 0.2, 0.0] is not valid"),
])
def test_type_and_range_errors_are_one_line_exit_2_before_anything_is_written(tmp_path, override, said):
    result = run_cli(*TINY_RESNET, override, f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert OutputConfig(dir="~/cams").dir == str(tmp_path / "home" / "cams")
    assert DataConfig(format="imagefolder", root="~/images").root == str(tmp_path / "home" / "images")


@pytest.mark.parametrize("name", ["out[1]", "out*", "out{a,b}", "out,x"])
def test_the_demo_runs_in_an_output_dir_with_pattern_characters(tmp_path, name):
    out = tmp_path / name
    result = run_cli(*TINY_RESNET, "data.demo_images=6", f"output.dir='{out}'")
    assert result.returncode == 0, result.stderr
    assert read_cams(out).num_rows == 6


@pytest.fixture(scope="module")
def finished_output(tmp_path_factory):
    """One finished demo run's output folder, copied by each damaged-manifest case."""
    out = tmp_path_factory.mktemp("finished") / "out"
    first = run_cli(*TINY_RESNET, "data.demo_images=6", f"output.dir={out}")
    assert first.returncode == 0, first.stderr
    return out


@pytest.mark.parametrize("content", ["", "[]", "not json", "\xff\xfe", "42"])
def test_a_damaged_manifest_is_one_line_and_overwrite_recovers(tmp_path, content, finished_output):
    out = tmp_path / "out"
    shutil.copytree(finished_output, out)
    (out / "_manifest.json").write_bytes(content.encode("latin-1"))
    again = run_cli(*TINY_RESNET, "data.demo_images=6", f"output.dir={out}")
    assert again.returncode == 2, again.stderr
    assert "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("gradcam-batch: error: "), again.stderr
    assert "_manifest.json is damaged" in again.stderr.strip().splitlines()[-1], again.stderr
    # the recovery in-process (the command line's one-line error is what the run above checks)
    summary = run_composed(*TINY_RESNET, "data.demo_images=6", f"output.dir={out}", "output.overwrite=true")
    assert summary.rows == 6 and summary.errors == 0
    assert read_cams(out).num_rows == 6


def test_resized_maps_that_would_fill_gigabytes_in_the_writers_queue_are_refused(tmp_path):
    # the demo's batch of 100 with 1000x1000 maps held 4.5 GB in the writer's queue
    result = run_cli("data.demo_images=8", "output.cam_size=[1000,1000]", "runtime.progress=false",
                     f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "output.cam_size=[1000, 1000]" in line and "data.batch_size=100" in line and "GiB" in line, line
    assert not (tmp_path / "out" / "cams").exists()
    smaller = run_cli("data.demo_images=8", "output.cam_size=[1000,1000]", "data.batch_size=4", "output.queue_size=2",
                      "runtime.progress=false", f"output.dir={tmp_path / 'out'}")
    assert smaller.returncode == 0, smaller.stderr
    assert read_cams(tmp_path / "out").column("cam_resized_height").to_pylist() == [1000] * 8
