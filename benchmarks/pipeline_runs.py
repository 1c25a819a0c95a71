"""Whole jobs in their own processes: `python -m gradcam_batch` runs and what their summary and
`_manifest.json` report, and the subprocess runner the peers share."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# this_run keys of _manifest.json read into a row; a pipeline that does not write one gives None
MANIFEST_TIMING_KEYS = ("seconds", "steady_images_per_second", "seconds_to_first_batch",
                        "seconds_to_first_batch_after_imports")


class TimedOut(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"killed after {seconds:.0f} s")
        self.seconds = seconds


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (its DataLoader workers), read from /proc; none where it is absent."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended while the table was read
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, pending = [], [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found += children
        pending += children
    return found


def run_command(command: list[str], timeout: float, cwd: Path = REPO_ROOT) -> Finished:
    """Run to completion, or kill it and its descendants at the timeout: a job's DataLoader
    workers must not outlive it to compete with the next row. The child stays in this process
    group, so a `timeout` around the whole benchmark still reaches it."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the listing and the kill
                pass
        process.communicate()
        raise TimedOut(time.perf_counter() - start) from None
    return Finished(process.returncode, stdout, stderr, time.perf_counter() - start)


def failure_text(finished: Finished) -> str:
    lines = [line for line in (finished.stderr or "").splitlines() if line.strip()]
    return f"exit {finished.returncode}: {lines[-1] if lines else 'no stderr'}"[:300]


def read_run_manifest(output_dir: str | Path) -> dict:
    """The timing keys of `this_run` in the output folder's _manifest.json, None where absent."""
    path = Path(output_dir) / "_manifest.json"
    this_run = {}
    if path.is_file():
        this_run = json.loads(path.read_text()).get("this_run") or {}
    values = {}
    for key in MANIFEST_TIMING_KEYS:
        value = this_run.get(key)
        values[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return values


def hydra_string(value: str) -> str:
    """A Hydra override value quoted, so globs and commas reach the config as one string."""
    return f"'{value}'" if "'" not in value else value


def common_overrides(args, device_type: str) -> list[str]:
    """The overrides every gradcam-batch row shares; output.dir is a fresh temporary folder."""
    return ["data=webdataset", "model=torchvision", f"model.target_layer={args.target_layer}",
            f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", f"data.resize={args.resize}",
            f"data.crop={args.crop}", f"runtime.device={device_type}", "runtime.progress=false",
            "output.overwrite=true"]


def row_overrides(shards_glob: str, model_name: str, topk: int | None, decode: str | None) -> list[str]:
    overrides = [f"data.shards={hydra_string(shards_glob)}", f"model.name={model_name}"]
    if topk is not None:
        overrides += ["cam.targets=topk", f"cam.topk={topk}"]
    if decode is not None:
        overrides.append(f"data.decode={decode}")
    return overrides


def run_gradcam_batch(args, device_type: str, overrides: list[str], timeout: float) -> dict:
    """One `python -m gradcam_batch` run: images, rows, errors, its own seconds, the wall time
    and the manifest's timing keys."""
    with tempfile.TemporaryDirectory(prefix="bench-gradcam-batch-") as output_dir:
        # a row's own value of a shared key (model=timm, model.target_layer=auto) replaces the shared one
        own = {override.split("=", 1)[0] for override in overrides}
        common = [override for override in common_overrides(args, device_type) if override.split("=", 1)[0] not in own]
        command = [sys.executable, "-m", "gradcam_batch", *common, *overrides, f"output.dir={output_dir}"]
        finished = run_command(command, timeout)
        if finished.returncode != 0:
            raise RuntimeError(failure_text(finished))
        summary = finished.stdout
        found = re.search(r"throughput\s+([\d.]+) img/s \(([\d.]+) s\)", summary)
        images = re.search(r"^images\s+(\d+)", summary, re.M)
        rows = re.search(r"^rows\s+(\d+)", summary, re.M)
        errors = re.search(r"^errors\s+(\d+)", summary, re.M)
        if not (found and images and rows):
            raise RuntimeError(f"no summary line in the output: {summary[-300:]!r}")
        manifest = read_run_manifest(output_dir)
    return {"images": int(images.group(1)), "rows": int(rows.group(1)),
            "errors": int(errors.group(1)) if errors else 0,
            # the manifest keeps the run's seconds to the millisecond, the summary line to 0.1 s
            "loop_seconds": manifest["seconds"] or float(found.group(2)),
            "wall_seconds": finished.wall_seconds,
            "steady_images_per_second": manifest["steady_images_per_second"],
            "seconds_to_first_batch": manifest["seconds_to_first_batch"],
            "seconds_to_first_batch_after_imports": manifest["seconds_to_first_batch_after_imports"]}


def decode_modes() -> tuple[str, ...] | None:
    try:
        from gradcam_batch.config import DECODE_MODES
    except ImportError:  # the constant moved: let the run itself accept or refuse the mode
        return None
    return tuple(DECODE_MODES)


def pipeline_defaults() -> list[str]:
    """The data defaults the runs inherit, so a table says which pipeline options it measured."""
    from dataclasses import MISSING, fields

    from gradcam_batch.config import DataConfig

    defaults = {f.name: f.default for f in fields(DataConfig) if f.default is not MISSING}
    shown = [f"data.{name}={defaults[name]}" for name in ("decode", "unit_size") if name in defaults]
    modes = decode_modes()
    return [", ".join(shown) + (f" (data.decode takes {', '.join(modes)})" if modes else "")] if shown else []
