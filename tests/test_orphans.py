"""DataLoader workers end with their main process, however it ends (kill -9 included): an orphan
holds hundreds of MB and its shared-memory segments for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import TINY_RESNET, merged
from sample_data import make_webdataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["workers", "device", "mixed"])
def test_workers_end_when_the_main_process_is_killed(tmp_path, decode):
    make_webdataset(tmp_path / "wds", shards=4, per_shard=60)
    out = tmp_path / "out"
    args = merged(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'wds'}/*.tar", "data.unit_size=10",
                  "data.batch_size=2", "data.num_workers=2", f"data.decode={decode}", f"output.dir={out}")
    process = subprocess.Popen([sys.executable, "-m", "gradcam_batch", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and process.poll() is None:
            workers = children(process.pid)
            if len(workers) >= 2 and list((out / "cams").glob("part-*.parquet")):
                break
            time.sleep(0.05)
        assert process.poll() is None and len(workers) >= 2, "the run ended before its workers could be seen"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        # the kernel ends them with their parent at once; torch's own watchdog would take up to
        # 5 s, and never comes to look while a worker is blocked elsewhere
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.1)
        survivors = [pid for pid in workers if alive(pid)]
        assert not survivors, f"workers {survivors} outlived their killed main process"
    finally:
        for pid in children(process.pid) if process.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
