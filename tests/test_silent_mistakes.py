"""Ordinary command lines that used to give a wrong result with exit code 0: a data setting the
chosen source never reads, brace shard lists (unquoted: repeated keys; quoted: no match), and a
missing dataset noticed only after the model was built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_helpers import TINY_RESNET, read_cams, run_cli, run_composed
from gradcam_batch import UserError
from gradcam_batch.config import DataConfig
from gradcam_batch.data.shards import expand_braces
from sample_data import make_imagefolder, make_webdataset


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# --- a setting the chosen data source does not read ------------------------------------------

def test_forgotten_data_imagefolder_is_refused_and_writes_nothing_into_the_users_folder(tmp_path):
    images = tmp_path / "my-images"
    make_imagefolder(images, per_class=(1, 1))
    before = sorted(path.relative_to(images) for path in images.rglob("*"))
    out = tmp_path / "out"
    result = run_cli(*TINY_RESNET, f"data.root={images}", f"output.dir={out}")
    assert result.returncode == 2, result.stderr
    assert last_line(result).startswith("gradcam-batch: error: data.root=")
    assert "data=imagefolder" in last_line(result) and "data=demo" in last_line(result)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(path.relative_to(images) for path in images.rglob("*")) == before  # no demo-*.tar, no COMPLETE
    assert not (out / "cams").exists()


@pytest.mark.parametrize("setting, source", [
    ("data.shards='/data/*.tar'", "data=webdataset or data=parquet"),
    ("data.shard_size=10", "data=imagefolder"),
    ("data.image_column=img", "data=parquet"),
    ("data.follow_links=true", "data=imagefolder"),
])
def test_a_setting_of_another_source_names_the_source_to_pick(tmp_path, setting, source):
    result = run_cli(*TINY_RESNET, setting, f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    assert source in last_line(result), last_line(result)
    assert not (tmp_path / "out").exists()


def test_settings_of_the_chosen_source_pass():
    DataConfig(format="imagefolder", root="/x", shard_size=10, follow_links=True).check_settings_used()
    DataConfig(format="webdataset", shards="/x/*.tar").check_settings_used()
    DataConfig(format="parquet", shards="/x/*.parquet", image_column="img", id_column="id").check_settings_used()
    DataConfig(format="demo", demo_images=10, resize=32, crop=32, batch_size=4).check_settings_used()
    with pytest.raises(UserError, match="demo_images"):
        DataConfig(format="imagefolder", root="/x", demo_images=10).check_settings_used()


def test_the_demo_writes_only_inside_output_dir(tmp_path):
    out = tmp_path / "out"
    result = run_cli(*TINY_RESNET, "data.demo_images=8", f"output.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert list((out / "demo-data").glob("demo-*.tar"))


# --- brace shard lists ---------------------------------------------------------------------

@pytest.mark.parametrize("pattern, expanded", [
    ("/d/shard-{0000..0003}.tar", [f"/d/shard-{i:04d}.tar" for i in range(4)]),  # WebDataset's padded range
    ("/d/{train,val}-{1..2}.tar", ["/d/train-1.tar", "/d/train-2.tar", "/d/val-1.tar", "/d/val-2.tar"]),
    ("/d/{a,{b,c}}.tar", ["/d/a.tar", "/d/b.tar", "/d/c.tar"]),  # nested alternatives
    ("/d/{9..11}.tar", ["/d/9.tar", "/d/10.tar", "/d/11.tar"]),  # unpadded: widths grow
    ("/d/{3..1}.tar", ["/d/3.tar", "/d/2.tar", "/d/1.tar"]),  # a falling range, as the shell reads it
    ("/d/{x}.tar", ["/d/{x}.tar"]),  # one choice is no alternative: a literal, as in the shell
    ("/d/{a.tar", ["/d/{a.tar"]),  # unbalanced: literal
    ("/d/*.tar", ["/d/*.tar"]),  # no braces: the glob itself
])
def test_expand_braces(pattern, expanded):
    assert expand_braces(pattern) == expanded


def test_quoted_brace_shards_read_every_shard(tmp_path):
    expected = make_webdataset(tmp_path / "d", shards=4, per_shard=2)
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards='{tmp_path}/d/shard-{{0000..0003}}.tar'",
                           f"output.dir={out}")
    assert summary.images == len(expected) == 8
    assert sorted(read_cams(out).column("sample_id").to_pylist()) == sorted(expected)


def test_brace_alternatives_with_commas_and_a_second_glob(tmp_path):
    expected = make_webdataset(tmp_path / "d", shards=4, per_shard=1)
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=webdataset",
                           f"data.shards='{tmp_path}/d/shard-{{0000,0002}}.tar,{tmp_path}/d/shard-0003.tar'",
                           f"output.dir={out}")
    assert summary.images == 3 == len(expected) - 1


def test_a_key_given_twice_is_refused_in_one_line(tmp_path):
    make_webdataset(tmp_path / "d", shards=4, per_shard=2)
    # what bash makes of an unquoted data.shards=/d/shard-{0000..0003}.tar
    shards = [f"data.shards={tmp_path}/d/shard-{index:04d}.tar" for index in range(4)]
    result = run_cli(*TINY_RESNET, "data=webdataset", *shards, f"output.dir={tmp_path / 'out'}", as_typed=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "data.shards is given 4 times" in last_line(result)
    assert f"data.shards='{tmp_path}/d/shard-{{0000..0003}}.tar'" in last_line(result)
    assert not (tmp_path / "out").exists()
    twice = run_cli(*TINY_RESNET, "cam.method=gradcam", "cam.method=layercam", f"output.dir={tmp_path / 'out'}",
                    as_typed=True)
    assert twice.returncode == 2 and "cam.method is given 2 times" in last_line(twice)


# --- inputs before the model ---------------------------------------------------------------

@pytest.mark.parametrize("data", [["data=imagefolder", "data.root=/no/such/folder"],
                                  ["data=webdataset", "data.shards=/no/such/shard-0000.tar"]])
def test_missing_data_is_reported_before_the_model_is_built(tmp_path, data):
    # the weights file is missing too: the data error must come first, before any model loads
    result = run_cli("model=torchvision", "model.name=resnet18", f"model.weights={tmp_path / 'missing.pth'}",
                     *data, "runtime.progress=false", f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2
    line = last_line(result)
    assert "data." in line and "missing.pth" not in line, line


# --- what the console says -----------------------------------------------------------------

def test_a_sweep_prints_a_header_per_job(tmp_path):
    result = run_cli("-m", *TINY_RESNET, "cam.method=gradcam,layercam", f"output.dir={tmp_path / 'sweep'}",
                     "data.demo_images=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("== job ")]
    assert len(headers) == 2, result.stdout
    assert headers[0].startswith("== job 0: ") and "cam.method=gradcam" in headers[0]
    assert headers[1].startswith("== job 1: ") and "cam.method=layercam" in headers[1]
    assert headers[1].endswith(str(tmp_path / "sweep" / "1"))
    # each job's summary follows its own header
    lines = result.stdout.splitlines()
    assert lines.index(headers[0]) < [i for i, line in enumerate(lines) if line.startswith("images")][0] < lines.index(headers[1])


@pytest.mark.slow
def test_torchrun_ranks_do_not_repeat_each_log_line(tmp_path):
    from cli_helpers import finish_ranks, start_ranks

    processes = start_ranks(tmp_path / "logs", *TINY_RESNET, "data.demo_images=24", "runtime.device=cpu",
                            f"output.dir={tmp_path / 'out'}")
    results = finish_ranks(tmp_path / "logs", processes)
    assert [code for code, _, _ in results] == [0, 0], results
    main_log, other_log = results[0][2], results[1][2]
    assert "gradcam-batch:" in main_log
    repeated = [line for line in other_log.splitlines() if line.startswith("gradcam-batch") and "warning" not in line.lower()]
    assert not repeated, other_log


@pytest.mark.slow
def test_demo_sh_does_not_count_its_set_up_as_start_up(tmp_path):
    import os
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
    # time spent before the tool starts (here 12 s of sleep, in real life the first pip install) in
    # the process that runs demo.sh must not show up as the tool's start-up
    result = subprocess.run(["bash", "-c", f'sleep 12; exec "{script}" "$@"', "demo", "output.dir=out",
                             "data.demo_images=16", "runtime.progress=false"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"first batch ([\d.]+) s after process start, ([\d.]+) s after the imports", result.stdout)
    assert found, result.stdout
    since_start, since_imports = map(float, found.groups())
    assert since_start - since_imports < 12, result.stdout  # the imports alone, not the 12 s before


# --- random weights are said, whatever the model family --------------------------------------

def test_timm_with_random_weights_is_warned_about(tmp_path):
    pytest.importorskip("timm")
    make_imagefolder(tmp_path / "data", per_class=(1, 1))
    result = run_cli("model=timm", "model.name=resnet18", "data=imagefolder", f"data.root={tmp_path / 'data'}",
                     "data.resize=64", "data.crop=64", "data.num_workers=0", "runtime.progress=false",
                     f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "model.weights=null: resnet18 has random weights" in result.stderr


def test_huggingface_weights_missing_from_the_folder_are_warned_about(tmp_path):
    from test_model_families import save_tiny_hf_vit

    save_tiny_hf_vit(tmp_path / "vit")
    make_imagefolder(tmp_path / "data", per_class=(1, 1))
    common = ["model=huggingface", f"model.name={tmp_path / 'vit'}", "data=imagefolder", f"data.root={tmp_path / 'data'}",
              "data.num_workers=0", "runtime.progress=false"]
    whole = run_cli(*common, f"output.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    assert "random values" not in whole.stderr
    new_head = run_cli(*common, "model.num_classes=7", f"output.dir={tmp_path / 'head'}")
    assert new_head.returncode == 0, new_head.stderr
    warning = [line for line in new_head.stderr.splitlines() if "random values" in line]
    assert len(warning) == 1 and "classifier" in warning[0], new_head.stderr


def test_a_rerun_of_a_one_unit_run_speaks_in_the_singular(tmp_path):
    first = run_cli(*TINY_RESNET, "data.demo_images=1", f"output.dir={tmp_path / 'out'}")
    assert first.returncode == 0, first.stderr
    again = run_cli(*TINY_RESNET, "data.demo_images=1", f"output.dir={tmp_path / 'out'}")
    assert again.returncode == 0, again.stderr
    assert "nothing to do: the only unit was already complete" in again.stdout
    assert "stored      1 row, 0 errors in 1 unit" in again.stdout


# --- a mistake in the settings is found before torch is imported ---------------------------------

CHECK_BEFORE_TORCH = """
import sys
sys.argv = ["gradcam-batch", *sys.argv[1:]]
from gradcam_batch.cli import main
try:
    main()
except SystemExit as stop:
    print("exit", stop.code, "torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("setting", ["data.shard_size=10", "cam.channels=best:3", "cam.method=nonsense",
                                     "cam.targets=all metrics.road=true"])
def test_a_settings_mistake_is_refused_before_torch_is_imported(tmp_path, setting):
    """The configuration is checked without torch (seconds of imports): the one line comes at once."""
    result = subprocess.run([sys.executable, "-c", CHECK_BEFORE_TORCH, *setting.split(), f"output.dir={tmp_path}/out"],
                            capture_output=True, text=True, timeout=120)
    assert "exit 2 torch imported: False" in result.stdout, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "gradcam-batch: error: " in result.stderr
    assert not (tmp_path / "out").exists()
