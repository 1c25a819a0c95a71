"""End-to-end throughput of gradcam-batch against its stages and its peers, on the same images
and device, in one run.

    python benchmarks/bench_pipeline.py [--device cpu|cuda] [--images N] [--peer-images N]
        [--model NAME] [--batch-size B] [--workers W] [--repeats R] [--providers a,b,...]
        [--budget-seconds S] [--out FILE] [--quick]

One run generates (or reuses) JPEG WebDataset shards of N smooth random 500x375 images (about
70 kB each at quality 90, a random label 0..999 per image) and a single-shard copy of the same
members, then measures:

  stages, each alone in this process (ms per batch, img/s):
    forward           the bare model forward on preprocessed device tensors (no_grad; channels_last,
                      bf16 autocast on CUDA): the bound for layer Grad-CAM; with `big`, ResNet-152's too
    engine            CamEngine.explain on random device tensors, top-1 and top-k
    decode            the project's loader with data.decode=workers over N shards and over 1 shard
    device-decode     gradcam_batch.data.device_decode.DeviceDecoder on JPEG bytes in memory (CUDA),
                      per installed backend (torchvision's nvJPEG; nvImageCodec where installed)
    writer            ParquetShardWriter fed synthetic maps, top-1 and top-k
  whole runs, `python -m gradcam_batch data=webdataset ...` in a subprocess each, shards to Parquet:
    top1              top-1, data.decode=auto, N shards: the reference row
    top1-1shard       the same over the single shard
    top1-workers, top1-device, top1-mixed
                      top-1 with data.decode=workers / device / mixed (device and mixed need CUDA)
    topk              top-k (--topk, default 5)
    big               ResNet-152 top-1 (CUDA only)
    vit               ViT-B/16 top-1, its layer chosen by auto (CUDA only), against its own forward
    timm              a timm model (--timm-model, default resnet18) top-1, layer auto
    faithfulness      top-1 with metrics.faithfulness=true: what the extra forwards cost
    heatmaps          top-1 with output.cam_size=input and output.heatmap_png=true
  peers, a subprocess each (this file in --peer-... mode) on the first --peer-images images:
    pytorch-grad-cam  pytorch_grad_cam.GradCAM maps of the predicted class
    captum            captum.attr.LayerGradCam (+ LayerAttribution.interpolate)

Each whole-run row reports its rate in its own clock (in-loop), in steady state and over its
process's wall time, and its time to first batch; gradcam-batch rows read the last two from the
output folder's _manifest.json (`this_run`), '-' where the pipeline does not write them.
--repeats R runs the subprocess rows R times, interleaved, and reports medians.
--budget-seconds S skips the providers that would start after S seconds of this run (and stops
one that runs past them); they are marked skipped in the tables. The markdown is rewritten to
--out after every row, so a run killed from outside keeps its finished rows. The last lines
printed are a short summary table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import sys
import time
import traceback
from pathlib import Path

import pipeline_stages as stages
from pipeline_data import ensure_dataset, ensure_single_shard, first_shards
from pipeline_peers import PEERS, peer_arguments, peer_captum, peer_pytorch_grad_cam, run_peer
from pipeline_report import (STAGE, Row, count_of, device_name, one_line, rate, render, run_row, summary_lines,
                             versions)
from pipeline_runs import (TimedOut, common_overrides, decode_modes, pipeline_defaults, row_overrides,
                           run_gradcam_batch)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

STAGE_PROVIDERS = ("forward", "engine", "decode", "device-decode", "writer")
# a whole run per CAM method beyond gradcam (the perturbation ones on 64 channels per image: 64 extra
# forwards of the whole model for scorecam, of the network after the layer for ablationcam)
METHOD_PROVIDERS = {
    "method-gradcam-backward": ["cam.analytic=off"],
    **{f"method-{name}": [f"cam.method={name}"] for name in
       ("gradcampp", "finercam", "shapleycam", "cam", "eigencam", "eigengradcam", "kpcacam", "fem")},
    "method-scorecam": ["cam.method=scorecam", "cam.channels=top:64"],
    "method-ablationcam": ["cam.method=ablationcam", "cam.channels=top:64"],
    "targets-all": ["cam.targets=all"],
    "road": ["metrics.road=true"],
}
# the extra forwards per image the perturbation rows cost (their row's notes say it)
FORWARDS_PER_IMAGE = {
    "method-scorecam": "forwards per image: 1 + 64 of the whole model",
    "method-ablationcam": "forwards per image: 1 of the whole model + 64 of the network after the layer",
    "road": "forwards per image: 1 + 8 of the whole model (4 percentiles, most and least relevant first)",
}
RUN_PROVIDERS = ("top1", "top1-1shard", "top1-workers", "top1-device", "top1-mixed", "topk", "big", "vit", "timm",
                 "faithfulness", "heatmaps", *METHOD_PROVIDERS)
# rows that add output options to the top-1 row, to measure what they cost
OPTION_PROVIDERS = {"faithfulness": ["metrics.faithfulness=true"],
                    "heatmaps": ["output.cam_size=input", "output.heatmap_png=true"], **METHOD_PROVIDERS}
PROVIDERS = STAGE_PROVIDERS + RUN_PROVIDERS + tuple(PEERS)
# the order the whole runs go in: what the goals need first, so a short budget drops the rest
RUN_PRIORITY = ("top1", "top1-1shard", "big", "vit", "top1-workers", "top1-device", "top1-mixed", "pytorch-grad-cam",
                "captum", "topk", "timm", "faithfulness", "heatmaps", *METHOD_PROVIDERS)
PEER_MODULES = {"pytorch-grad-cam": "pytorch_grad_cam", "captum": "captum"}
DECODE_PROVIDERS = {"top1-workers": "workers", "top1-device": "device", "top1-mixed": "mixed"}
CUDA_ONLY = {
    "top1-device": "needs CUDA (data.decode=device decodes JPEGs with nvJPEG on the device)",
    "top1-mixed": "needs CUDA (data.decode=mixed shares JPEGs between CPU workers and the CUDA device)",
    "device-decode": "needs CUDA (DeviceDecoder decodes with nvJPEG on the device)",
    "big": "needs CUDA (the ResNet-152 rows take minutes per run on a CPU)",
    "vit": "needs CUDA (the ViT-B/16 rows take minutes per run on a CPU)",
}
ONE_SHARD_ALREADY = "skipped: the dataset is one shard already (--images <= --shard-size)"
# a run is not started with less time left than this: imports and start-up alone take about 10 s
# on the GPU machine, and a run killed at the budget reports nothing
MIN_RUN_SECONDS = {"cuda": 15.0, "cpu": 3.0}


# --- arguments -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--images", type=int, help="images in the dataset (default 20000 on cuda, 256 on cpu)")
    parser.add_argument("--peer-images", type=int,
                        help="images the peers read, rounded up to whole shards (default 4000 on cuda, all on cpu)")
    parser.add_argument("--width", type=int, default=500, help="generated image width (default 500)")
    parser.add_argument("--height", type=int, default=375, help="generated image height (default 375)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default 1000)")
    parser.add_argument("--data-dir", default="/tmp/gradcam-bench-data",
                        help="cache of generated shards; one sub-folder per count/size (default %(default)s)")
    parser.add_argument("--model", help="torchvision model (default resnet50 on cuda, resnet18 on cpu)")
    parser.add_argument("--big-model", default="resnet152", help="compute-bound model, cuda only (default resnet152)")
    parser.add_argument("--vit-model", default="vit_b_16",
                        help="torchvision vision transformer, cuda only, target layer auto (default vit_b_16)")
    parser.add_argument("--timm-model", default="resnet18",
                        help="timm model of the `timm` row, target layer auto (default resnet18)")
    parser.add_argument("--target-layer", default="layer4", help="dotted module name (default layer4)")
    parser.add_argument("--resize", type=int, help="shorter side before the crop (default 256; --quick 72)")
    parser.add_argument("--crop", type=int, help="center crop (default 224; --quick 64)")
    parser.add_argument("--batch-size", type=int, help="gradcam-batch / stage batch (default 256 cuda, 32 cpu)")
    parser.add_argument("--peer-batch-size", type=int, help="peer batch (default 64 cuda, 32 cpu)")
    parser.add_argument("--workers", type=int, help="DataLoader workers everywhere (default 15 cuda, 1 cpu)")
    parser.add_argument("--topk", type=int, default=5, help="targets per image of the top-k run (default 5)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each subprocess provider, interleaved; the median is reported")
    parser.add_argument("--min-seconds", type=float, help="timed duration of each in-process stage "
                        "(default 1.5 cuda, 3 cpu); decode-only stops at 3x this")
    parser.add_argument("--providers", default="all", help="comma-separated subset of: " + ", ".join(PROVIDERS)
                        + " (default all)")
    parser.add_argument("--budget-seconds", type=float,
                        help="skip the providers left when this run has taken this long (default: no limit)")
    parser.add_argument("--timeout", type=int, help="seconds per subprocess before it is killed (default 120 on "
                        "cuda, where a healthy run takes 10-30 s, so one stuck run cannot eat the budget; 900 on cpu)")
    parser.add_argument("--note", action="append", default=[],
                        help="free-text line for the results header (repeatable), e.g. what else ran")
    parser.add_argument("--out", help="also write the markdown here, rewritten after every row (a bare name goes "
                        "to benchmarks/results/; a folder gets <card>-pipeline-<date>.md)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 32 images, short timings")
    # peer mode: this file runs as the peer's own process, so its start-up is measured as well
    parser.add_argument("--peer-pytorch-grad-cam", dest="peer_mode_pytorch_grad_cam", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--peer-captum", dest="peer_mode_captum", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    defaults = dict(images=20000 if cuda else 256, model="resnet50" if cuda else "resnet18",
                    batch_size=256 if cuda else 32, peer_batch_size=64 if cuda else 32,
                    workers=15 if cuda else 1, min_seconds=1.5 if cuda else 3.0, resize=256, crop=224,
                    timeout=120 if cuda else 900)
    if args.quick:
        defaults.update(images=32, batch_size=16, peer_batch_size=16, min_seconds=0.3, resize=72, crop=64)
        if args.shard_size == parser.get_default("shard_size"):
            args.shard_size = 16  # two shards, so a second worker and the shard boundary are exercised
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.peer_images is None:
        args.peer_images = min(4000, args.images) if cuda and not args.quick else args.images
    args.decode_seconds = round(3 * args.min_seconds, 3)
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    args.providers = list(PROVIDERS) if names == ["all"] else names
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {', '.join(unknown)}; choose from all or {', '.join(PROVIDERS)}")
    for name in ("images", "peer_images", "width", "height", "shard_size", "resize", "crop", "batch_size",
                 "peer_batch_size", "topk", "repeats", "timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.workers < 0:
        parser.error(f"--workers={args.workers} must be >= 0")
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        parser.error(f"--budget-seconds={args.budget_seconds} must be > 0")
    if args.crop > args.resize:
        parser.error(f"--crop={args.crop} is larger than --resize={args.resize}")
    return args


# --- the run ---------------------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float | None, start: float):
        self.seconds, self.start = seconds, start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def skipped(self, needed: float = 0.0) -> str:
        left = self.left()
        if left > 0:
            return (f"skipped: --budget-seconds {self.seconds:g} had {left:.0f} s left, under the {needed:g} s "
                    "a run needs")
        return f"skipped: --budget-seconds {self.seconds:g} spent ({self.elapsed():.0f} s into the run)"


def _short_path(text: str, folder: Path) -> str:
    return text.replace(str(folder), "<data>")


class Benchmark:
    def __init__(self, args, start: float):
        self.args = args
        self.budget = Budget(args.budget_seconds, start)
        self.rows: list[Row] = []
        self.header: dict = {}
        self.cuda = args.device == "cuda"
        # whole runs: their plans, each run's results, why a provider stopped
        self.plans: list[dict] = []
        self.results: dict[str, list[dict]] = {}
        self.stopped: dict[str, str] = {}
        self.runs_finished = True

    # reporting -------------------------------------------------------------------------------------
    def current_rows(self) -> list[Row]:
        """The finished rows, and while the whole runs go on, each run's row as it stands: a
        table written now and never again (the benchmark killed from outside) still says which
        runs finished."""
        if self.runs_finished:
            return self.rows
        return self.rows + [run_row(plan, self.results[plan["key"]], self.stopped.get(plan["key"]), self.args.images)
                            for plan in self.plans]

    def report(self) -> str:
        self.header["elapsed"] = self.budget.elapsed()
        self.header["load_after"] = os.getloadavg()
        return render(self.args, self.current_rows(), self.header)

    def save_progress(self, quiet: bool = True) -> None:
        if self.args.out:
            name = result_name(self.args.device, self.header.get("device_name", ""), self.header["started"].date())
            write_markdown(self.args.out, self.report(), quiet, name)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.log_row(row)
        self.save_progress()

    def log_row(self, row: Row) -> None:
        if row.status:
            shown = row.status
        elif row.kind == STAGE:
            shown = f"{row.in_loop:,.1f} img/s, {row.ms_per_batch:,.1f} ms per batch"
        else:
            shown = (f"{rate(row.in_loop)} img/s in-loop, {rate(row.steady)} steady, {rate(row.whole)} whole "
                     f"process ({row.extra.get('wall_seconds', 0):.1f} s)")
        print(f"  {row.provider:<44} {shown}", flush=True)

    def guarded(self, key: str, provider: str, kind: str, work, model: str = "", batch: str = ""):
        """Run one in-process provider unless the budget is spent; an error becomes its row."""
        if self.budget.left() <= 0:
            self.add(Row(key, provider, kind, model, batch, status=self.budget.skipped()))
            return None
        try:
            return work()
        except Exception as error:  # noqa: BLE001 -- reported in the table and on stderr
            traceback.print_exc()
            self.add(Row(key, provider, kind, model, batch, status=f"failed: {one_line(error)}"))
            return None

    # stages ------------------------------------------------------------------------------------------
    def run_stages(self, wanted: set, device, dataset, single) -> None:
        args = self.args
        batch = str(args.batch_size)
        shape = None

        def stage(key, provider, work, model=""):
            row = self.guarded(key, provider, STAGE, work, model, batch)
            if row is not None:
                self.add(row)
            return row

        if "forward" in wanted:
            stage("forward", "forward", lambda: stages.bench_forward(args, device, args.model), args.model)
        if "big" in wanted and self.cuda:  # ResNet-152's forward bounds its gradcam-batch row
            stage("forward-big", f"forward {args.big_model}",
                  lambda: stages.bench_forward(args, device, args.big_model), args.big_model)
        if "vit" in wanted and self.cuda:  # and ViT-B/16's its row
            stage("forward-vit", f"forward {args.vit_model}",
                  lambda: stages.bench_forward(args, device, args.vit_model), args.vit_model)
        if "engine" in wanted:
            variants = [(1, None), (args.topk, None)] + ([] if self.cuda else [(1, False)])  # NCHW what-if on CPU
            for targets, channels_last in variants:
                result = self.guarded("engine" if targets == 1 else "engine-topk", f"engine-only top-{targets}", STAGE,
                                      lambda t=targets, c=channels_last: stages.bench_engine(args, device, t, c),
                                      args.model, batch)
                if result:
                    self.add(result[0])
                    shape = shape or result[1]
        if "decode" in wanted:
            for key, data, label in (("decode", dataset, count_of(dataset.meta["shards"], "shard")),
                                     ("decode-1shard", single, "1 shard")):
                if data is None:
                    self.add(Row(key, f"decode-only, workers, {label}", STAGE, "", batch, status=ONE_SHARD_ALREADY))
                    continue
                stage(key, f"decode-only, workers, {label}",
                      lambda d=data, k=key, p=label: stages.bench_decode(args, device, d, k,
                                                                         f"decode-only, workers, {p}"))
        if "device-decode" in wanted:
            if self.cuda:
                for backend in stages.device_decoder_backends():
                    stage(f"device-decode-{backend}" if backend else "device-decode",
                          f"device-decode-only, {backend or 'default'}",
                          lambda b=backend: stages.bench_device_decode(args, device, dataset, b))
            else:
                self.add(Row("device-decode", "device-decode-only (DeviceDecoder)", STAGE, "", batch,
                             status=f"skipped: {CUDA_ONLY['device-decode']}"))
        if "writer" in wanted:
            shape = shape or self.guarded("writer", "writer-only", STAGE, lambda: stages.cam_shape(args, device))
            if shape:
                for targets in (1, args.topk):
                    stage("writer" if targets == 1 else "writer-topk", f"writer-only top-{targets}",
                          lambda t=targets: stages.bench_writer(args, t, shape))
        if self.cuda:
            import torch

            torch.cuda.empty_cache()  # the subprocesses get the whole device

    # whole runs --------------------------------------------------------------------------------------
    def plan_runs(self, wanted: set, dataset, single) -> list[dict]:
        args = self.args
        device_type = args.device
        shards = dataset.meta["shards"]
        plans: list[dict] = []

        def gradcam_batch(key, provider, model, data, topk=None, decode=None, source=None, extra=()):
            overrides = row_overrides(data.shards_glob, model, topk, decode) + list(extra)
            if source is not None:  # another model family, its layer chosen by auto
                overrides += [f"model={source}", "model.target_layer=auto"]
            plans.append(dict(key=key, provider=provider, model=model, batch=str(args.batch_size),
                              decode=decode or "auto", shards=data.meta["shards"],
                              ran=_short_path(" ".join(overrides), dataset.folder),
                              reference="" if source == "timm" else stages.forward_key(args, model),
                              work=lambda: run_gradcam_batch(args, device_type, overrides, self.timeout())))

        modes = decode_modes()
        for key in RUN_PROVIDERS + tuple(PEERS):
            if key not in wanted:
                continue
            if key in CUDA_ONLY and not self.cuda:
                plans.append(dict(key=key, provider=_run_label(args, key, shards), model=_run_model(args, key),
                                  status=f"skipped: {CUDA_ONLY[key]}", decode=DECODE_PROVIDERS.get(key, "auto")))
            elif key in DECODE_PROVIDERS and modes is not None and DECODE_PROVIDERS[key] not in modes:
                plans.append(dict(key=key, provider=_run_label(args, key, shards), model=args.model,
                                  decode=DECODE_PROVIDERS[key],
                                  status=f"skipped: this gradcam_batch has no data.decode={DECODE_PROVIDERS[key]} "
                                         f"(it takes {', '.join(modes)})"))
            elif key == "top1":
                gradcam_batch(key, _run_label(args, key, shards), args.model, dataset)
            elif key == "top1-1shard" and single is None:
                plans.append(dict(key=key, provider=_run_label(args, key, shards), model=args.model,
                                  decode="auto", status=ONE_SHARD_ALREADY))
            elif key == "top1-1shard":
                gradcam_batch(key, _run_label(args, key, shards), args.model, single)
            elif key in DECODE_PROVIDERS:
                gradcam_batch(key, _run_label(args, key, shards), args.model, dataset, decode=DECODE_PROVIDERS[key])
            elif key == "topk":
                gradcam_batch(key, _run_label(args, key, shards), args.model, dataset, topk=args.topk)
            elif key == "big":
                gradcam_batch(key, _run_label(args, key, shards), args.big_model, dataset)
            elif key == "vit":
                gradcam_batch(key, _run_label(args, key, shards), args.vit_model, dataset, source="torchvision")
            elif key == "timm" and importlib.util.find_spec("timm") is None:
                plans.append(dict(key=key, provider=_run_label(args, key, shards), model=args.timm_model,
                                  status="skipped: timm not installed (pip install timm)"))
            elif key == "timm":
                gradcam_batch(key, _run_label(args, key, shards), args.timm_model, dataset, source="timm")
            elif key in OPTION_PROVIDERS:
                gradcam_batch(key, _run_label(args, key, shards), args.model, dataset, extra=OPTION_PROVIDERS[key])
                if key in FORWARDS_PER_IMAGE:
                    plans[-1]["cost"] = FORWARDS_PER_IMAGE[key]
            else:
                plans.append(self._peer_plan(key, dataset))
        return plans

    def _peer_plan(self, peer: str, dataset) -> dict:
        args = self.args
        plan = dict(key=peer, provider=PEERS[peer], model=args.model, batch=str(args.peer_batch_size), decode="PIL",
                    reference="forward", peer=True)
        module = PEER_MODULES[peer]
        if importlib.util.find_spec(module) is None:  # not imported here: pytorch_grad_cam alone takes seconds
            return {**plan, "status": f"skipped: {module} not installed (pip install .[bench])"}
        paths = first_shards(dataset, args.peer_images)
        plan["shards"] = len(paths)
        plan["ran"] = (f"--peer-{peer} --shards <data>/{paths[0].name}"
                       + (f",...,{paths[-1].name}" if len(paths) > 1 else "")
                       + f" (first {len(paths)} of {dataset.meta['shards']} shards)")
        plan["work"] = lambda: run_peer(args, peer, paths, args.device, self.timeout())
        return plan

    def timeout(self) -> float:
        return max(1.0, min(self.args.timeout, self.budget.left()))

    def run_runs(self, plans: list[dict]) -> None:
        """Every planned run, --repeats times, interleaved; rows stay in table order while the
        runs go in RUN_PRIORITY order, so a spent budget drops the least needed ones."""
        args = self.args
        self.plans, self.results, self.stopped = plans, {plan["key"]: [] for plan in plans}, {}
        self.runs_finished = False
        order = sorted(plans, key=lambda plan: RUN_PRIORITY.index(plan["key"]))
        self.header["run_order"] = [plan["key"] for plan in order if "status" not in plan]
        for repeat in range(args.repeats):
            for plan in order:
                key = plan["key"]
                if "status" in plan or key in self.stopped:
                    continue
                if self.budget.left() < MIN_RUN_SECONDS[args.device]:
                    self.stopped[key] = self.budget.skipped(MIN_RUN_SECONDS[args.device])
                    continue
                print(f"  {plan['provider']} (run {repeat + 1}/{args.repeats}) ...", flush=True)
                try:
                    self.results[key].append(plan["work"]())
                except TimedOut as error:
                    self.stopped[key] = (f"stopped: --budget-seconds {args.budget_seconds:g} ran out while it ran "
                                         f"({error})" if self.budget.left() <= 1
                                         else f"stopped: --timeout {args.timeout} ({error})")
                    print(f"{plan['provider']}: {self.stopped[key]}", file=sys.stderr, flush=True)
                except Exception as error:  # noqa: BLE001 -- reported in the table and on stderr
                    self.stopped[key] = f"failed: {one_line(error)}"
                    print(f"{plan['provider']}: {self.stopped[key]}", file=sys.stderr, flush=True)
                else:
                    self.log_row(run_row(plan, self.results[key][-1:], None, args.images))
                self.save_progress()
        self.rows += [run_row(plan, self.results[plan["key"]], self.stopped.get(plan["key"]), self.args.images) for plan in plans]
        self.runs_finished = True

    # all of it --------------------------------------------------------------------------------------------
    def run(self) -> str:
        import torch

        args = self.args
        device = torch.device(args.device)
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("bench_pipeline: --device cuda but no CUDA device is available; use --device cpu")
        wanted = set(args.providers)
        self.header.update(started=datetime.datetime.now().astimezone(), load_before=os.getloadavg(),
                           argv=self.header.get("argv", sys.argv[1:]))
        log = lambda text: print(text, flush=True)  # noqa: E731
        dataset = ensure_dataset(args.data_dir, args.images, args.width, args.height, args.shard_size, log)
        # a dataset of one shard is its own 1-shard copy: the 1-shard rows would repeat the others
        single = (ensure_single_shard(dataset, log) if wanted & {"decode", "top1-1shard"}
                  and dataset.meta["shards"] > 1 else None)
        self.header.update(meta=dataset.meta, folder=dataset.folder, device_name=device_name(args.device),
                           versions=versions(), pipeline_defaults=pipeline_defaults(),
                           common_overrides=" ".join(common_overrides(args, args.device) + ["output.dir=<tmp>"]),
                           peer_common=" ".join(peer_arguments(args, args.device)) if wanted & set(PEERS) else "")
        print(f"device: {self.header['device_name']}", flush=True)
        self.run_stages(wanted, device, dataset, single)
        self.run_runs(self.plan_runs(wanted, dataset, single))
        return self.report()


def _run_model(args, key: str) -> str:
    return {"big": args.big_model, "vit": args.vit_model, "timm": args.timm_model}.get(key, args.model)


def _run_label(args, key: str, shards: int) -> str:
    return {"top1": f"gradcam-batch top-1, {count_of(shards, 'shard')}",
            "top1-1shard": "gradcam-batch top-1, 1 shard",
            "top1-workers": "gradcam-batch top-1, decode workers",
            "top1-device": "gradcam-batch top-1, decode device",
            "top1-mixed": "gradcam-batch top-1, decode mixed",
            "topk": f"gradcam-batch top-{args.topk}",
            "big": f"gradcam-batch {args.big_model} top-1",
            "vit": f"gradcam-batch {args.vit_model} top-1",
            "timm": f"gradcam-batch timm {args.timm_model} top-1",
            "faithfulness": "gradcam-batch top-1 + faithfulness (3 fractions: 7 extra forwards)",
            "heatmaps": "gradcam-batch top-1 + cam_size=input + heatmap_png",
            **{key: f"gradcam-batch {' '.join(options)}" for key, options in METHOD_PROVIDERS.items()}}[key]


def result_name(device: str, card: str, date: datetime.date) -> str:
    """<card>-pipeline-<date>.md, e.g. h100-pipeline-2026-11-27.md or cpu-pipeline-2026-11-27.md."""
    found = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", card) if device == "cuda" else None
    return f"{found.group(1).lower() if found else device}-pipeline-{date.isoformat()}.md"


def write_markdown(out: str, markdown: str, quiet: bool = False, name: str = "pipeline.md") -> Path:
    """Atomically to `out`: a bare file name goes to benchmarks/results/, a folder gets `name`."""
    path = Path(out)
    if path.is_dir():
        path = path / name
    elif path.parent == Path("."):
        path = RESULTS_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(markdown)
    os.replace(tmp, path)  # a reader never sees half a table
    if not quiet:
        print(f"wrote {path}")
    return path


def main(argv=None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.peer_mode_pytorch_grad_cam or args.peer_mode_captum:
        if not args.shards:
            raise SystemExit("bench_pipeline: peer mode needs --shards GLOB[,GLOB...]")
        (peer_pytorch_grad_cam if args.peer_mode_pytorch_grad_cam else peer_captum)(args)
        return
    benchmark = Benchmark(args, start)
    benchmark.header["argv"] = list(sys.argv[1:] if argv is None else argv)
    markdown = benchmark.run()
    print()
    print(markdown, end="", flush=True)
    benchmark.save_progress(quiet=False)
    print()
    print("\n".join(summary_lines(args, benchmark.rows, benchmark.header)), flush=True)


if __name__ == "__main__":
    main()
