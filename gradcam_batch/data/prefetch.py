"""The device side of the input, one or two batches ahead of the model.

A background thread owns the DataLoader iterator. For each batch it copies the worker-decoded
uint8 images to the device, decodes and resizes the JPEG payloads there (DeviceDecoder) and
normalizes (Preprocess), all on a CUDA stream of its own, and records an event. The consumer's
stream waits for that event on the device (the host never waits for the whole device), and
`record_stream` keeps the caching allocator from handing a batch's memory back to the thread
while the consumer's kernels still read it. nvJPEG and the copies release the GIL, so the
thread's work overlaps the model's. On a CPU device there are no streams or events and the same
code runs, in the same order, which is what the tests check.

data.decode=mixed: `DecodeBalance` tells each worker, sample by sample, whether to ship a JPEG
to the device or decode it itself, and the prefetcher moves that share at run time towards
whichever side has slack.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import queue
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from gradcam_batch.data.device_decode import DeviceDecoder
from gradcam_batch.data.loader import Batch

log = logging.getLogger("gradcam_batch")


class Preprocess:
    """uint8 (B, 3, H, W) on the host -> normalized float on the device, in one fused op."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool):
        std_tensor = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_tensor
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return torch.addcmul(self.shift, images.float(), self.scale)


def device_images(batch: Batch, decoder: DeviceDecoder | None, device: torch.device) -> torch.Tensor:
    """uint8 images of the batch on the device: the workers' ones, then the device-decoded
    payloads. Payloads that fail to decode leave the batch (sample id, label, boxes and image
    digest) and join its error rows."""
    images = batch.images.to(device, non_blocking=True)
    if not batch.payloads:
        return images
    decoded, failed = decoder(batch.payloads)
    if failed:
        offset = len(batch.images)
        drop = {offset + index for index in failed}
        keep = [i for i in range(len(batch.sample_ids)) if i not in drop]
        batch.errors.extend((batch.sample_ids[offset + index], "decode", type(error).__name__, str(error)[:500])
                            for index, error in failed.items())
        batch.sample_ids = [batch.sample_ids[i] for i in keep]
        if batch.image_digests is not None:  # each row's digest stays its own sample's
            batch.image_digests = [batch.image_digests[i] for i in keep]
        batch.labels, batch.boxes = batch.labels[keep], batch.boxes[keep]
    return torch.cat([images, decoded])


@dataclass
class ReadyBatch:
    """One batch, ready for the model on the consumer's current stream."""
    batch: Batch  # host side; sample_ids, labels, boxes, image_digests and errors already hold the decode failures
    images: torch.Tensor  # normalized float (N, 3, crop, crop) on the device, Preprocess's memory format
    labels: torch.Tensor  # int64 (N,) on the device


@dataclass
class PrefetchStats:
    """Where the input side's time went. The thread's three times add up to its wall time; the
    stage whose time dominates is the one the others wait for."""
    batches: int = 0
    images: int = 0  # rows handed to the model
    device_decoded: int = 0  # payloads decoded on the device (failures excluded)
    worker_decoded: int = 0  # images the workers decoded
    decode_failures: int = 0  # payloads that joined the error rows
    first_batch_seconds: float = 0.0  # from the start of iteration to the first ready batch
    consumer_wait_seconds: float = 0.0  # the consumer waiting for a ready batch, the first included
    loader_wait_seconds: float = 0.0  # the thread waiting for the DataLoader (workers behind)
    decode_seconds: float = 0.0  # the thread copying, decoding, resizing, normalizing (its busy time)
    queue_full_seconds: float = 0.0  # the thread waiting for room in the queue (the model behind)
    device_share: float | None = None  # data.decode=mixed: the device's share at the end

    def as_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


class _End:
    """The source is exhausted."""


@dataclass
class _Failure:
    error: BaseException
    where: str


class DevicePrefetcher:
    """Iterate over ReadyBatch objects prepared `depth` batches ahead by a background thread.

    Use it as a context manager (or call close()): leaving the block early, by a break, an
    exception or Ctrl+C, stops the thread and lets it drop the DataLoader iterator, which shuts
    the workers down. An exception in the thread is raised in the consumer, same type, with a
    note saying which batch it was working on."""

    def __init__(self, batches: Iterable[Batch], device: torch.device | str, preprocess: Preprocess,
                 decoder: DeviceDecoder | None = None, depth: int = 2, balance: DecodeBalance | None = None,
                 join_timeout: float = 60.0):
        if depth < 1:
            raise ValueError(f"depth={depth}: the prefetcher holds at least one batch ahead")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the thread sets it by index
        self.depth = depth
        self.balance = balance
        self._batches = batches
        self._preprocess = preprocess
        self._decoder = decoder
        self._join_timeout = join_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self._started_at = 0.0
        self._consumer_ready_event = None  # everything the consumer's stream did before iteration
        self._where = "starting the loader"
        self._stats = PrefetchStats()

    @property
    def stats(self) -> PrefetchStats:
        if self.balance is not None:
            self._stats.device_share = self.balance.share
        return self._stats

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> DevicePrefetcher:
        self._start()
        return self

    def _start(self) -> None:
        if self._thread is not None or self._finished:
            return
        self._started_at = time.perf_counter()
        if self.device.type == "cuda":
            # Preprocess's constants (and anything else set up before iterating) were computed on
            # the consumer's stream; the thread's stream starts after them.
            self._consumer_ready_event = torch.cuda.Event()
            self._consumer_ready_event.record(torch.cuda.current_stream(self.device))
        self._thread = threading.Thread(target=self._produce, name="gradcam-batch-prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> ReadyBatch:
        if self._finished:
            raise StopIteration
        self._start()
        began = time.perf_counter()
        item = self._queue.get()
        now = time.perf_counter()
        if item is _End:
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish()
            error = item.error
            if isinstance(error, StopIteration):  # would end the consumer's loop silently
                raise RuntimeError(f"StopIteration raised in the device prefetch thread while {item.where}") from error
            error.add_note(f"raised in the device prefetch thread while {item.where}")
            raise error
        ready, event = item
        stats = self._stats
        stats.consumer_wait_seconds += now - began
        if stats.batches == 0:
            stats.first_batch_seconds = now - self._started_at
        stats.batches += 1
        stats.images += len(ready.batch.sample_ids)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            ready.images.record_stream(stream)
            ready.labels.record_stream(stream)
        return ready

    def close(self) -> None:
        """Stop the thread (it finishes the batch in hand, then drops the loader) and wait for it."""
        self._stopping.set()
        if self._thread is not None and self._thread.is_alive():
            self._drain()  # a thread blocked on a full queue wakes up and sees the stop
            self._thread.join(self._join_timeout)
            if self._thread.is_alive():
                log.warning("the device prefetch thread is still waiting for the loader after %.0f s; "
                            "leaving it behind (it is a daemon thread)", self._join_timeout)
        self._drain()  # batches nobody will read: their device memory goes back now
        self._finished = True

    def _finish(self) -> None:
        self._finished = True
        if self._thread is not None:
            self._thread.join(self._join_timeout)

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def _put(self, item) -> bool:
        """Queue an item unless the consumer has stopped; False when it has."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            with self._device_context() as stream:
                iterator = iter(self._batches)
                try:
                    self._produce_from(iterator, stream)
                finally:
                    # End the loader here, in the thread that owns it, now rather than whenever
                    # the last reference goes: a DataLoader iterator stops its workers
                    # (_shutdown_workers, what its __del__ calls), a generator runs its cleanup.
                    for name in ("_shutdown_workers", "close"):
                        end = getattr(iterator, name, None)
                        if end is not None:
                            end()
                    del iterator
        except BaseException as error:  # the consumer re-raises it; nothing is swallowed
            # The traceback's frames would keep the loader and the batch in hand (device memory)
            # alive for as long as the consumer holds the exception; their locals go, the
            # frames and line numbers stay.
            traceback.clear_frames(error.__traceback__)
            self._put(_Failure(error, self._where))
        finally:
            self._put(_End)

    @contextlib.contextmanager
    def _device_context(self):
        with torch.no_grad():
            if self.device.type != "cuda":
                yield None
                return
            # The current device is per thread: without this, a rank on cuda:3 would allocate on cuda:0.
            torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_event(self._consumer_ready_event)
            with torch.cuda.stream(stream):
                yield stream

    def _produce_from(self, iterator, stream) -> None:
        stats = self._stats
        previous_event = None
        index = 0
        while not self._stopping.is_set():
            self._where = f"reading batch {index} from the loader"
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            fetched = time.perf_counter()
            self._where = f"preparing batch {index} (shard {batch.shard_id!r}) on {self.device}"
            payloads, errors_before = len(batch.payloads), len(batch.errors)
            uint8_images = device_images(batch, self._decoder, self.device)
            ready = ReadyBatch(batch, self._preprocess(uint8_images), batch.labels.to(self.device, non_blocking=True))
            del uint8_images
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                if previous_event is not None:
                    # Waits for this thread's own stream only, one batch behind: keeps its busy
                    # time honest when a decoder returns before the device is done, and bounds
                    # how far it runs ahead.
                    previous_event.synchronize()
                previous_event = event
            prepared = time.perf_counter()
            if not self._put((ready, event)):
                return
            queued = time.perf_counter()
            failures = len(batch.errors) - errors_before
            stats.worker_decoded += len(batch.images)
            stats.device_decoded += payloads - failures
            stats.decode_failures += failures
            stats.loader_wait_seconds += fetched - began
            stats.decode_seconds += prepared - fetched
            stats.queue_full_seconds += queued - prepared
            if self.balance is not None:
                self.balance.observe(loader_wait=fetched - began, busy=prepared - fetched, blocked=queued - prepared)
            index += 1


# frac(i * golden ratio) spreads any run of consecutive indices evenly over [0, 1)
_GOLDEN = (5 ** 0.5 - 1) / 2


class DecodeBalance:
    """data.decode=mixed: the share of device-eligible JPEGs that workers ship to the device (the
    rest they decode themselves), and the controller that moves it while the job runs.

    Workers call `take_device(sample_index)` once per sample. The share lives in shared memory
    (a multiprocessing RawValue: one aligned double, written whole, read without a lock), so the
    workers' copies of this object (inherited at fork, pickled when a spawned worker starts) read
    what the main process sets.

    The prefetch thread reports each batch's three times to `observe`: waiting for the loader,
    busy preparing on the device, blocked on a full queue. Every `interval` batches, from their
    moving averages:
    - the thread waits for the loader (> loader_wait_high of its time) while its own busy time
      is below decoder_busy_high: the workers are behind and the device has room; ship more;
    - the thread is busy (> decoder_busy_high) and hardly waits for the loader: the device
      decode is the bottleneck; decode more in the workers;
    - otherwise (both have slack: the model sets the pace; or both are saturated): hold.
    Damping: each move is `step`, which halves when a move reverses the previous one (the
    loader's prefetched batches delay every move's effect, so reversals mean overshoot) and
    grows by a quarter, up to max_step, while moves keep one direction. The first `warmup`
    batches (worker start-up) are not observed."""

    def __init__(self, share: float = 0.7, *, minimum: float = 0.0, maximum: float = 1.0, step: float = 0.05,
                 min_step: float = 0.005, max_step: float = 0.1, interval: int = 8, warmup: int = 4,
                 smoothing: float = 0.2, loader_wait_high: float = 0.05, decoder_busy_high: float = 0.8):
        if not 0.0 <= minimum <= maximum <= 1.0:
            raise ValueError(f"minimum={minimum}, maximum={maximum}: need 0 <= minimum <= maximum <= 1")
        if not 0.0 < min_step <= step <= max_step:
            raise ValueError(f"min_step={min_step}, step={step}, max_step={max_step}: need 0 < min_step <= step <= max_step")
        if interval < 1 or warmup < 0 or not 0.0 < smoothing <= 1.0:
            raise ValueError(f"interval={interval}, warmup={warmup}, smoothing={smoothing}: need interval >= 1, "
                             "warmup >= 0, 0 < smoothing <= 1")
        self.minimum, self.maximum = minimum, maximum
        self.step, self.min_step, self.max_step = step, min_step, max_step
        self.interval, self.warmup, self.smoothing = interval, warmup, smoothing
        self.loader_wait_high, self.decoder_busy_high = loader_wait_high, decoder_busy_high
        self._shared_share = multiprocessing.RawValue(ctypes.c_double, self._bounded(share))
        self.observed = 0
        self.loader_wait_fraction: float | None = None  # moving averages of the thread's time fractions
        self.busy_fraction: float | None = None
        self._since_decision = 0
        self._last_direction = 0
        self.history: list[tuple[int, float]] = [(0, self.share)]  # (batches observed, share) at each move

    @property
    def share(self) -> float:
        return self._shared_share.value

    def set_share(self, share: float) -> None:
        self._shared_share.value = self._bounded(share)

    def _bounded(self, share: float) -> float:
        return min(max(float(share), self.minimum), self.maximum)

    def take_device(self, sample_index: int) -> bool:
        """Whether the worker ships this sample's JPEG to the device (if the device can take it)
        rather than decoding it. Over any run of consecutive indices the fraction taken is the
        share, give or take a couple of samples."""
        return (sample_index * _GOLDEN) % 1.0 < self._shared_share.value

    def observe(self, loader_wait: float, busy: float, blocked: float) -> float:
        """One batch's seconds in the prefetch thread; returns the share now in force."""
        self.observed += 1
        period = loader_wait + busy + blocked
        if self.observed <= self.warmup or period <= 0.0:
            return self.share
        wait_fraction, busy_fraction = loader_wait / period, busy / period
        if self.loader_wait_fraction is None:
            self.loader_wait_fraction, self.busy_fraction = wait_fraction, busy_fraction
        else:
            self.loader_wait_fraction += self.smoothing * (wait_fraction - self.loader_wait_fraction)
            self.busy_fraction += self.smoothing * (busy_fraction - self.busy_fraction)
        self._since_decision += 1
        if self._since_decision < self.interval:
            return self.share
        self._since_decision = 0
        workers_behind = self.loader_wait_fraction > self.loader_wait_high
        device_behind = self.busy_fraction > self.decoder_busy_high
        direction = (1 if workers_behind and not device_behind else
                     -1 if device_behind and not workers_behind else 0)
        if direction == 0:
            return self.share
        if direction == -self._last_direction:
            self.step = max(self.min_step, self.step / 2)
        elif direction == self._last_direction:
            self.step = min(self.max_step, self.step * 1.25)
        self._last_direction = direction
        before = self.share
        self.set_share(before + direction * self.step)
        if self.share != before:
            self.history.append((self.observed, self.share))
        return self.share

    def summary(self) -> dict:
        return {"share": round(self.share, 4), "moves": len(self.history) - 1,
                "loader_wait_fraction": None if self.loader_wait_fraction is None else round(self.loader_wait_fraction, 4),
                "busy_fraction": None if self.busy_fraction is None else round(self.busy_fraction, 4)}
