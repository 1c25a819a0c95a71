"""benchmarks/bench_pipeline.py on the CPU: the smoke run, the manifest fields it reads, the
single-shard copy of the dataset, the budget and the subprocess kill."""

from __future__ import annotations

import json
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the benchmark's modules import each other as siblings, as a script does
    sys.path.insert(0, str(BENCHMARKS))

import bench_pipeline  # noqa: E402
from pipeline_data import ensure_dataset, ensure_single_shard  # noqa: E402
from pipeline_report import Row, render, run_row, summary_lines  # noqa: E402
from pipeline_runs import TimedOut, read_run_manifest, run_command, run_gradcam_batch  # noqa: E402

TIMING = {"seconds": 2.5, "steady_images_per_second": 1250.0, "seconds_to_first_batch": 5.25,
          "seconds_to_first_batch_after_imports": 1.75}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-data")


def _table_row(markdown: str, provider: str) -> list[str]:
    """The cells of the first table row whose provider cell is `provider`."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == provider:
            return cells
    raise AssertionError(f"no row {provider!r} in:\n{markdown}")


def test_manifest_timing_keys_are_read_when_present(tmp_path):
    (tmp_path / "_manifest.json").write_text(json.dumps({"status": "complete", "this_run": {"images": 8, **TIMING}}))
    assert read_run_manifest(tmp_path) == TIMING


def test_manifest_without_timing_keys_reads_as_none(tmp_path):
    assert set(read_run_manifest(tmp_path).values()) == {None}  # no manifest at all
    (tmp_path / "_manifest.json").write_text(json.dumps({"this_run": {"seconds": 3, "steady_images_per_second": None,
                                                                      "seconds_to_first_batch": "soon"}}))
    values = read_run_manifest(tmp_path)
    assert values["seconds"] == 3.0
    assert values["steady_images_per_second"] is None and values["seconds_to_first_batch"] is None


def _fake_gradcam_batch(monkeypatch, this_run: dict):
    """run_command replaced by a job that writes a summary and a manifest like the pipeline's."""
    import pipeline_runs

    def fake_run_command(command, timeout, cwd=None):
        output_dir = Path(next(arg for arg in command if arg.startswith("output.dir=")).split("=", 1)[1])
        (output_dir / "_manifest.json").write_text(json.dumps({"this_run": this_run}))
        summary = "images      32\nrows        32\nerrors      0\nthroughput  12.8 img/s (2.5 s)\n"
        return pipeline_runs.Finished(0, summary, "", 6.0)

    monkeypatch.setattr(pipeline_runs, "run_command", fake_run_command)


@pytest.mark.parametrize("this_run", [pytest.param({"images": 32, **TIMING}, id="timing-reported"),
                                      pytest.param({"images": 32, "seconds": 2.5}, id="timing-absent")])
def test_run_rows_show_the_manifest_timing_or_dashes(monkeypatch, this_run):
    _fake_gradcam_batch(monkeypatch, this_run)
    args = bench_pipeline.parse_args(["--device", "cpu", "--quick"])
    result = run_gradcam_batch(args, "cpu", ["model.name=resnet18"], timeout=60)
    plan = dict(key="top1", provider="gradcam-batch top-1, 2 shards", model="resnet18", batch="16", decode="auto",
                shards=2, reference="forward", ran="model.name=resnet18")
    forward = Row("forward", "forward-fp32", "stage", "resnet18", "16", in_loop=500.0, ms_per_batch=32.0,
                  reference="forward")
    rows = [forward, run_row(plan, [result], None, args.images)]
    header = _header()
    cells = _table_row(render(args, rows, header), "gradcam-batch top-1, 2 shards")
    # provider, model, decode, shards, images, in-loop, steady, whole, first batch, in-loop/fwd, steady/fwd, ran
    assert cells[4:6] == ["32", "12.8"] and cells[7] == "5.3"  # 32 images over 2.5 s and over 6.0 s
    if "steady_images_per_second" in this_run:
        assert cells[6] == "1,250.0" and cells[8] == "5.2 / 1.8" and cells[10] == "2.50x"
    else:
        assert cells[6] == "-" and cells[8] == "-" and cells[10] == "-"
    assert cells[11] == "model.name=resnet18"
    assert summary_lines(args, rows, header)[0].startswith("== bench_pipeline summary")


def _header() -> dict:
    import datetime

    return {"started": datetime.datetime.now().astimezone(), "elapsed": 1.0, "load_before": (0.0, 0.0, 0.0),
            "load_after": (0.0, 0.0, 0.0), "device_name": "CPU test", "versions": {"python": "3"},
            "meta": {"images": 32, "width": 500, "height": 375, "mean_jpeg_kb": 69.0, "shards": 2, "shard_size": 16},
            "folder": "/data", "argv": ["--quick"]}


def test_single_shard_holds_the_same_members_in_order(tmp_path):
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.readers import iter_samples
    from gradcam_batch.data.shards import list_shards

    dataset = ensure_dataset(tmp_path, images=5, width=40, height=30, shard_size=2, log=lambda text: None)
    single = ensure_single_shard(dataset, log=lambda text: None)
    assert [p.name for p in dataset.shard_paths] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [p.name for p in single.shard_paths] == ["all.tar"] and single.meta["shards"] == 1

    def members(paths):
        names = []
        for path in paths:
            with tarfile.open(path) as tar:
                names += [(m.name, tar.extractfile(m).read()) for m in tar]
        return names

    assert members(single.shard_paths) == members(dataset.shard_paths)
    # the project's own reader takes it whole, end-of-archive check included
    cfg = DataConfig(format="webdataset", shards=single.shards_glob)
    samples = [sample for shard in list_shards(cfg) for sample in iter_samples(shard, cfg)]
    assert [s.sample_id for s in samples] == [f"{i:08d}" for i in range(5)] and all(s.error is None for s in samples)
    written = (single.folder / "all.tar").stat().st_mtime_ns
    ensure_single_shard(dataset, log=lambda text: None)
    assert (single.folder / "all.tar").stat().st_mtime_ns == written  # reused, not rewritten


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_timeout_kills_the_job_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(60)")
    start = time.perf_counter()
    with pytest.raises(TimedOut):
        run_command([sys.executable, "-c", script, str(pid_file)], timeout=2)
    assert time.perf_counter() - start < 30
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_budget_skips_every_provider_left(data_dir, capsys):
    bench_pipeline.main(["--device", "cpu", "--quick", "--data-dir", str(data_dir), "--budget-seconds", "0.001",
                         "--providers", "forward,top1,pytorch-grad-cam"])
    output = capsys.readouterr().out
    for provider in ("forward", "gradcam-batch top-1, 2 shards", "pytorch-grad-cam GradCAM"):
        assert _table_row(output, provider)[3 if provider == "forward" else 5].startswith("skipped: --budget-seconds")


def test_unknown_provider_is_refused():
    with pytest.raises(SystemExit):
        bench_pipeline.parse_args(["--device", "cpu", "--providers", "top1,nonsense"])


@pytest.mark.slow
def test_quick_cpu_run_reports_rows_and_skips(data_dir, tmp_path, capsys):
    """The smoke run: real subprocesses of gradcam-batch (2 shards and 1 shard) and of the
    pytorch-grad-cam peer, stages in process, the CUDA-only modes skipped with their reason."""
    out = tmp_path / "pipeline.md"
    bench_pipeline.main(["--device", "cpu", "--quick", "--data-dir", str(data_dir), "--out", str(out), "--providers",
                         "forward,decode,top1,top1-1shard,top1-device,top1-mixed,big,pytorch-grad-cam"])
    markdown = out.read_text()
    assert float(_table_row(markdown, "forward-fp32")[4].replace(",", "")) > 0
    for provider in ("decode-only, workers, 2 shards", "decode-only, workers, 1 shard"):
        assert float(_table_row(markdown, provider)[4].replace(",", "")) > 0
    for provider, shards in (("gradcam-batch top-1, 2 shards", "2"), ("gradcam-batch top-1, 1 shard", "1"),
                             ("pytorch-grad-cam GradCAM", "2")):
        cells = _table_row(markdown, provider)
        assert cells[3:5] == [shards, "32"], cells
        in_loop, steady, whole = cells[5:8]
        assert float(in_loop.replace(",", "")) > 0 and float(whole.replace(",", "")) > 0
        assert steady == "-" or float(steady.replace(",", "")) > 0  # '-' until the pipeline reports it
    assert "data.shards='<data>/single-shard/*.tar'" in _table_row(markdown, "gradcam-batch top-1, 1 shard")[11]
    for provider in ("gradcam-batch top-1, decode device", "gradcam-batch top-1, decode mixed",
                     "gradcam-batch resnet152 top-1"):
        assert _table_row(markdown, provider)[5].startswith("skipped: needs CUDA")
    assert re.search(r"1 shard / 2 shards \(same images\): [\d.]+x in-loop", markdown)
    assert re.search(r"top-1 / pytorch-grad-cam \(speed-up\): [\d.]+x in-loop", markdown)
    tail = capsys.readouterr().out.rstrip().splitlines()[-14:]
    assert any(line.startswith("== bench_pipeline summary: cpu") for line in tail)
    assert any(line.startswith("gradcam-batch top-1, decode device") and "skipped: needs CUDA" in line
               for line in tail)


def test_perturbation_rows_state_their_forwards_per_image(monkeypatch):
    """The scorecam, ablationcam and ROAD rows say how many forwards an image costs, with the
    channel count of their own options and ROAD's default percentiles."""
    from gradcam_batch.config import MetricsConfig

    for key in ("method-scorecam", "method-ablationcam"):
        channels = next(o for o in bench_pipeline.METHOD_PROVIDERS[key] if o.startswith("cam.channels=top:"))
        assert f"+ {channels.rsplit(':', 1)[1]} " in bench_pipeline.FORWARDS_PER_IMAGE[key]
    percentiles = len(MetricsConfig().road_percentiles)
    assert f"1 + {2 * percentiles} of the whole model ({percentiles} percentiles" in bench_pipeline.FORWARDS_PER_IMAGE["road"]
    _fake_gradcam_batch(monkeypatch, {"images": 32, "seconds": 2.5})
    args = bench_pipeline.parse_args(["--device", "cpu", "--quick"])
    result = run_gradcam_batch(args, "cpu", ["cam.method=scorecam"], timeout=60)
    plan = dict(key="method-scorecam", provider="gradcam-batch cam.method=scorecam", model="resnet18",
                cost=bench_pipeline.FORWARDS_PER_IMAGE["method-scorecam"])
    assert run_row(plan, [result], None, args.images).notes[0] == "forwards per image: 1 + 64 of the whole model"
