"""Run clocks for the summary and the manifest: time to the first batch and the steady rate.

A run's overall img/s mixes start-up (imports, model build, worker start, kernel compilation)
with the rate the job settles at; users sizing a cluster job need both, so they are kept apart.
"""

from __future__ import annotations

import os
import time


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read.

    Counts the interpreter start and every import before our own code ran, which a clock
    started inside the program would miss.
    """
    try:
        with open("/proc/self/stat", "rb") as handle:
            # the command name (field 2) may hold spaces and parentheses: split after its last ')'
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read().split()[0])
        start_ticks = int(fields[19])  # field 22 of stat, counted from field 3
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


class RunClock:
    """Batch completion times of one run.

    `steady_images_per_second` leaves out the first tenth of the batches (at least one): those
    include worker start-up, cuDNN and kernel compilation and the input pipeline filling up.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.process_age_at_start = process_age_seconds()
        self._times: list[float] = []
        self._images: list[int] = []

    def batch_done(self, images: int) -> None:
        self._times.append(time.perf_counter())
        self._images.append(images)

    @property
    def batches(self) -> int:
        return len(self._times)

    @property
    def seconds_to_first_batch(self) -> float | None:
        """From this clock's start (after the imports) to the end of the first batch."""
        return self._times[0] - self.started if self._times else None

    @property
    def seconds_to_first_batch_from_process_start(self) -> float | None:
        if not self._times or self.process_age_at_start is None:
            return None
        return self.process_age_at_start + self.seconds_to_first_batch

    @property
    def steady_images_per_second(self) -> float | None:
        """Images per second after the warm-up batches; None with fewer than 3 batches."""
        if len(self._times) < 3:
            return None
        skip = max(1, len(self._times) // 10)
        seconds = self._times[-1] - self._times[skip - 1]
        images = sum(self._images[skip:])
        return images / seconds if seconds > 0 else None

    def as_dict(self) -> dict:
        def rounded(value):
            return None if value is None else round(value, 3)

        return {
            "seconds_to_first_batch": rounded(self.seconds_to_first_batch_from_process_start),
            "seconds_to_first_batch_after_imports": rounded(self.seconds_to_first_batch),
            "steady_images_per_second": rounded(self.steady_images_per_second),
            "batches": self.batches,
        }
