"""Crash safety and scale-out: kill -9 at random moments then resume, refuse to mix runs,
two ranks under torchrun, flat host memory."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_helpers import TINY_RESNET, merged, read_cams, run_cli
from sample_data import make_imagefolder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def assert_visible_parts_are_whole(out: Path):
    for part in (out / "cams").glob("part-*.parquet"):
        pq.read_table(part)  # a partial file would fail to parse its footer
    read_cams(out)  # and the dataset view never includes the hidden temporaries


@pytest.mark.slow
def test_kill_nine_at_random_moments_then_resume_exactly_once(tmp_path):
    expected = make_imagefolder(tmp_path / "data", per_class=(90, 90))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gradcam_batch", *merged(*TINY_RESNET, "data=imagefolder",
            f"data.root={tmp_path / 'data'}", "data.shard_size=9", "data.batch_size=3", "data.num_workers=1",
            "data.resize=96", "data.crop=96", f"output.dir={out}")]
    rng = random.Random(1234)
    progress = []
    # one kill during start-up, then kills after 3, 8 and 14 of the 20 shards plus a random delay,
    # so they land mid-shard, mid-rename or between shards whatever the machine's speed
    for wait_for_parts in (0, 3, 8, 14):
        process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.monotonic() + 120
        while (wait_for_parts and process.poll() is None and time.monotonic() < deadline
               and len(list((out / "cams").glob("part-*.parquet"))) < wait_for_parts):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.5, 2.0) if not wait_for_parts else rng.uniform(0.0, 0.3))
        os.killpg(process.pid, signal.SIGKILL)  # the main process and its DataLoader workers
        process.wait()
        if out.exists():
            assert_visible_parts_are_whole(out)
        progress.append(len(list((out / "cams").glob("part-*.parquet"))) if out.exists() else 0)
    assert any(0 < done < 20 for done in progress), progress  # kills landed mid-run
    final = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    ids = read_cams(out)["sample_id"].to_pylist()
    assert sorted(ids) == sorted(path for path, _ in expected)  # every sample exactly once
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == len(expected)
    assert sorted(manifest["shards"]) == [f"imagefolder-{i:05d}" for i in range(20)]
    assert not list((out / "cams").glob(".*.tmp"))


def test_resume_into_a_different_run_is_refused_unless_overwrite(tmp_path):
    make_imagefolder(tmp_path / "data", per_class=(2, 1))
    base = [*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", f"output.dir={tmp_path / 'out'}"]
    assert run_cli(*base).returncode == 0
    refused = run_cli(*base, "cam.method=layercam", "model.target_layer=layer3")
    assert refused.returncode == 2
    assert "holds results of a different run (model.target_layer, cam.method changed)" in refused.stderr
    assert run_cli(*base, "data.batch_size=7", "data.num_workers=1").returncode == 0  # how, not what: resumes
    replaced = run_cli(*base, "cam.method=layercam", "output.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr
    file = pq.ParquetFile(next((tmp_path / "out" / "cams").glob("part-*.parquet")))
    assert json.loads(file.schema_arrow.metadata[b"gradcam_batch"])["method"] == "layercam"
    assert read_cams(tmp_path / "out").num_rows == 3


@pytest.mark.slow
def test_torchrun_two_ranks_cover_the_input_exactly_once(tmp_path):
    expected = make_imagefolder(tmp_path / "data", per_class=(7, 6, 8))
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node=2", "--rdzv-backend=c10d",
         "--rdzv-endpoint=localhost:0", "-m", "gradcam_batch", *TINY_RESNET, "data=imagefolder",
         f"data.root={tmp_path / 'data'}", "data.shard_size=3", f"output.dir={out}"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = read_cams(out)
    assert sorted(table["sample_id"].to_pylist()) == sorted(path for path, _ in expected)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete"
    assert [r["images"] for r in manifest["this_run"]["ranks"]] == [12, 9]  # shards 0,2,4,6 / 1,3,5
    assert result.stdout.count("images      21") == 1  # one summary, for all ranks


@pytest.mark.slow
def test_host_memory_does_not_grow_with_the_dataset(tmp_path):
    script = (
        "import resource, sys\n"
        "from cli_helpers import run_composed\n"
        "run_composed(*sys.argv[1:])\n"
        # VmHWM, not ru_maxrss: Linux carries the forking parent's RSS across exec into ru_maxrss
        "own = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "usage = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print('PEAK', usage)\n")
    peaks = {}
    for shards in (10, 100):
        root = tmp_path / f"data{shards}"
        make_imagefolder(root, per_class=(shards * 10, shards * 10), seed=shards)
        result = subprocess.run(
            [sys.executable, "-c", script, "data=imagefolder", f"data.root={root}", "data.shard_size=20",
             "data.resize=64", "data.crop=64", "data.batch_size=16", "data.num_workers=1",
             "runtime.progress=false", f"output.dir={tmp_path / f'out{shards}'}"],
            cwd=Path(__file__).parent, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[shards] = int(result.stdout.split("PEAK")[-1])
        assert read_cams(tmp_path / f"out{shards}").num_rows == shards * 20
    assert peaks[100] < 1.10 * peaks[10], peaks
