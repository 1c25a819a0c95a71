"""Time kernels.fused_cam against the eager and torch.compile'd PyTorch composites.

    python benchmarks/bench_kernel.py [--methods gradcam,layercam] [--shapes 256x2048x7x7,...]
        [--layouts nchw,nhwc] [--targets 1,5] [--providers fused,eager,compiled] [--out FILE]
        [--dry-run]

Inputs are bf16, the way the engine hands them over: A (B, C, H, W) in NCHW or channels_last,
G from a batched backward, i.e. (K, B, C, H, W) transposed to (B, K, C, H, W) (per-image
channels_last for nhwc). Providers, timed with triton.testing.do_bench (median, ms):

    fused     kernels.fused_cam (autotuned; the tuning runs before timing)
    eager     gradcam_batch.methods.compute_cam(A, G, method): the composite with its default
              fp32 upcast of the bf16 inputs, as the CPU path and a careful user would write it
    compiled  torch.compile of that same composite (one compile per case, before timing)

GB/s counts the bytes any implementation must move: A and G read once, the fp32 CAM written once.
The device-to-device copy bandwidth (a 1 GiB tensor, bytes read + written) is measured in the
same run, and each rate is also given as a fraction of it. --out writes the markdown table with
the card, versions and date to benchmarks/results/ (a bare file name) or to the given path.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

DEFAULT_SHAPES = "256x2048x7x7,256x1024x14x14,128x512x28x28,64x256x56x56"
PROVIDERS = ("fused", "eager", "compiled")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="gradcam", help="comma-separated CAM methods (default gradcam)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxCxHxW activation shapes")
    parser.add_argument("--layouts", default="nchw,nhwc", help="comma-separated: nchw, nhwc")
    parser.add_argument("--targets", default="1,5", help="comma-separated K values (targets per image)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ", ".join(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    parser.add_argument("--out", help="also write the markdown here (a bare name goes to benchmarks/results/)")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    from gradcam_batch.methods import METHODS

    args.methods = split(args.methods)
    args.layouts = split(args.layouts)
    args.providers = split(args.providers)
    try:
        args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in split(args.shapes)]
        args.targets = [int(k) for k in split(args.targets)]
    except ValueError as error:
        parser.error(f"--shapes must look like 256x2048x7x7 and --targets like 1,5 ({error})")
    for values, allowed, flag in (
        (args.methods, METHODS, "--methods"),
        (args.layouts, ("nchw", "nhwc"), "--layouts"),
        (args.providers, PROVIDERS, "--providers"),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if any(len(shape) != 4 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes: each needs four positive sizes BxCxHxW, got {args.shapes}")
    if "fused" not in args.providers:
        parser.error("--providers must include fused (the table compares against it)")
    return args


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cases(args):
    for shape in args.shapes:
        for layout in args.layouts:
            for targets in args.targets:
                for method in args.methods:
                    yield shape, layout, targets, method


def make_inputs(shape, layout, targets, device):
    batch, channels, height, width = shape
    activations = torch.randn(batch, channels, height, width, device=device, dtype=torch.bfloat16).relu_()
    if layout == "nhwc":
        activations = activations.contiguous(memory_format=torch.channels_last)
        gradients = torch.randn(targets, batch, height, width, channels, device=device, dtype=torch.bfloat16)
        gradients = gradients.permute(0, 1, 4, 2, 3)
    else:
        gradients = torch.randn(targets, batch, channels, height, width, device=device, dtype=torch.bfloat16)
    gradients.mul_(1e-3)  # gradient-like magnitudes; irrelevant to timing, kept for realism
    return activations, gradients.transpose(0, 1)  # (B, K, C, H, W) view, as the engine passes it


def bench(fn, args) -> float:
    from triton.testing import do_bench

    result = do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5])  # median, ms
    return result[0] if isinstance(result, (list, tuple)) else result


def copy_bandwidth(args, device) -> float:
    """Device-to-device copy of a 1 GiB tensor: (bytes read + bytes written) / time, in GB/s."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = bench(lambda: target.copy_(source), args)
    del source, target
    return 2 * 2**30 / (milliseconds * 1e-3) / 1e9


def run_case(shape, layout, targets, method, args, device):
    import torch._dynamo

    from gradcam_batch.methods import compute_cam
    from kernels.cam import fused_cam

    activations, gradients = make_inputs(shape, layout, targets, device)
    batch, channels, height, width = shape
    moved = (activations.numel() + gradients.numel()) * 2 + batch * targets * height * width * 4
    fused_result = fused_cam(activations, gradients, method)  # autotunes for this case
    eager_result = compute_cam(activations, gradients, method)
    max_difference = (fused_result - eager_result).abs().max().item()
    del eager_result
    timings = {"fused": bench(lambda: fused_cam(activations, gradients, method), args)}
    if "eager" in args.providers:
        timings["eager"] = bench(lambda: compute_cam(activations, gradients, method), args)
    if "compiled" in args.providers:
        torch._dynamo.reset()  # a fresh compile per case, never the recompile-limit fallback
        compiled = torch.compile(compute_cam)
        try:
            compiled(activations, gradients, method)
            timings["compiled"] = bench(lambda: compiled(activations, gradients, method), args)
        except Exception as error:  # report it in the table and go on with the other cases
            print(f"bench_kernel: torch.compile failed for {shape} {layout} K={targets}: {error!r}",
                  file=sys.stderr)
            timings["compiled"] = float("nan")
    return timings, moved, max_difference


def table_header(providers) -> list[str]:
    columns = ["shape BxCxHxW", "layout", "K", "method"]
    columns += [f"{p} ms" for p in providers] + [f"{p} GB/s" for p in providers]
    columns += ["fused / copy BW"] + [f"fused speedup vs {p}" for p in providers if p != "fused"]
    columns += ["max abs diff vs eager"]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def table_row(case, timings, moved, max_difference, copy_gbps, providers) -> str:
    shape, layout, targets, method = case
    rates = {p: moved / (timings[p] * 1e-3) / 1e9 for p in providers}
    cells = ["x".join(map(str, shape)), layout, str(targets), method]
    cells += [f"{timings[p]:.4f}" for p in providers] + [f"{rates[p]:.0f}" for p in providers]
    cells += [f"{rates['fused'] / copy_gbps:.0%}"]
    cells += [f"{timings[p] / timings['fused']:.2f}x" for p in providers if p != "fused"]
    cells += [f"{max_difference:.1e}"]
    return "| " + " | ".join(cells) + " |"


def environment_lines(device, copy_gbps) -> list[str]:
    import triton

    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- card: {torch.cuda.get_device_name(device)}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- copy bandwidth (1 GiB device-to-device, read + write): {copy_gbps:.0f} GB/s",
        "- inputs bf16; eager = methods.compute_cam with its fp32 upcast; compiled = torch.compile of it",
        "- GB/s = (bytes of A + bytes of G + fp32 CAM bytes) / median time",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    all_cases = list(cases(args))
    if args.dry_run or not torch.cuda.is_available():
        reason = "dry run" if args.dry_run else "no CUDA device: nothing timed (this benchmark needs a GPU)"
        print(f"bench_kernel: {reason}; {len(all_cases)} cases, providers {', '.join(args.providers)}:")
        for shape, layout, targets, method in all_cases:
            print(f"  {'x'.join(map(str, shape))} {layout} K={targets} {method}")
        return 0
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth(args, device)
    lines = environment_lines(device, copy_gbps) + [""] + table_header(args.providers)
    print("\n".join(lines), flush=True)
    for case in all_cases:
        timings, moved, max_difference = run_case(*case, args, device)
        lines.append(table_row(case, timings, moved, max_difference, copy_gbps, args.providers))
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    if args.out:
        path = Path(args.out)
        path = RESULTS_DIR / path if path.parent == Path(".") else path
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"# fused_cam benchmark, {datetime.date.today().isoformat()}"
        path.write_text("\n".join([title, ""] + lines) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
