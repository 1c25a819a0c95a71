"""The prefetcher hands out exactly what the synchronous path computes, in order, with the same
error rows; it owns and ends its source; it stops on close, on an exception and on Ctrl+C; and
the mixed-decode balance moves the way the timings say. The gpu tests would catch a missing
stream wait or record_stream: they make the thread's device work slow and the consumer's reads
late, over many batches."""

from __future__ import annotations

import copy
import io
import multiprocessing
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_batch.data.device_decode import DeviceDecoder
from gradcam_batch.data.loader import Batch
from gradcam_batch.data.prefetch import DecodeBalance, DevicePrefetcher, Preprocess, device_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP = 32


def jpeg(height, width, seed) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_batch(index: int, decoded: int, payloads: list[bytes], shard: str = "s0", last: bool = False) -> Batch:
    rng = np.random.default_rng(1000 + index)
    count = decoded + len(payloads)
    boxes = torch.from_numpy(rng.random((count, 4), dtype=np.float32))
    return Batch(shard_id=shard,
                 images=torch.from_numpy(rng.integers(0, 256, (decoded, 3, CROP, CROP), dtype=np.uint8)),
                 labels=torch.arange(count, dtype=torch.int64) + 10 * index,
                 boxes=boxes, sample_ids=[f"b{index}-{i}" for i in range(count)],
                 errors=[(f"b{index}-unreadable", "read", "OSError", "gone")] if index % 3 == 0 else [],
                 last=last, payloads=list(payloads))


def sample_batches() -> list[Batch]:
    broken = b"\xff\xd8 not really a jpeg \xff\xd9"
    return [
        make_batch(0, 3, []),
        make_batch(1, 2, [jpeg(40, 50, 1), jpeg(50, 40, 2)]),
        make_batch(2, 0, [jpeg(40, 50, 3), broken, jpeg(40, 50, 4), jpeg(36, 36, 5)]),
        make_batch(3, 1, [broken], last=True),  # every payload fails
        make_batch(4, 0, [], shard="s1", last=True),  # an empty final batch: only the flag travels
    ]


def synchronous(batches, decoder, preprocess, device):
    """What pipeline._process computed in the main thread, one batch after the other."""
    results = []
    for batch in copy.deepcopy(batches):
        images = device_images(batch, decoder, device)
        results.append((batch, preprocess(images), batch.labels.to(device)))
    return results


def assert_same(ready, expected_batch, expected_images, expected_labels):
    batch = ready.batch
    assert (batch.shard_id, batch.last) == (expected_batch.shard_id, expected_batch.last)
    assert batch.sample_ids == expected_batch.sample_ids
    assert batch.errors == expected_batch.errors
    torch.testing.assert_close(batch.labels, expected_batch.labels, atol=0, rtol=0)
    torch.testing.assert_close(batch.boxes, expected_batch.boxes, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(ready.images, expected_images, atol=0, rtol=0)
    torch.testing.assert_close(ready.labels, expected_labels, atol=0, rtol=0)


def cpu_parts(channels_last=True):
    device = torch.device("cpu")
    return device, DeviceDecoder(resize=40, crop=CROP, device=device), Preprocess(MEAN, STD, device, channels_last)


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_batches_equal_the_synchronous_path(depth):
    device, decoder, preprocess = cpu_parts()
    batches = sample_batches()
    expected = synchronous(batches, decoder, preprocess, device)
    with DevicePrefetcher(iter(batches), device, preprocess, decoder, depth=depth) as prefetcher:
        got = list(prefetcher)
    assert len(got) == len(expected)
    for ready, (batch, images, labels) in zip(got, expected):
        assert_same(ready, batch, images, labels)
    # the broken payloads left their batches as error rows, exactly as device_images writes them
    assert [e[:3] for e in got[2].batch.errors] == [("b2-1", "decode", "CorruptImage")]
    assert got[3].batch.sample_ids == ["b3-0"] and got[3].images.shape == (1, 3, CROP, CROP)
    assert got[4].images.shape == (0, 3, CROP, CROP)
    stats = prefetcher.stats
    assert (stats.batches, stats.images) == (5, sum(len(r.batch.sample_ids) for r in got))
    assert (stats.worker_decoded, stats.device_decoded, stats.decode_failures) == (6, 5, 2)
    assert stats.device_share is None


class RecordingSource:
    """An iterable that records which thread iterates it and whether it was ended."""

    def __init__(self, batches, endless=False, fail_after=None, delay=0.0):
        self.batches, self.endless, self.fail_after, self.delay = batches, endless, fail_after, delay
        self.iter_thread = self.end_thread = None
        self.pulled = 0

    def __iter__(self):
        self.iter_thread = threading.current_thread().name
        try:
            index = 0
            while self.endless or index < len(self.batches):
                if self.fail_after is not None and index == self.fail_after:
                    raise ValueError("shard 7 is unreadable")
                time.sleep(self.delay)
                self.pulled += 1
                yield copy.deepcopy(self.batches[index % len(self.batches)])
                index += 1
        finally:
            self.end_thread = threading.current_thread().name


def test_the_thread_owns_and_ends_its_source():
    device, decoder, preprocess = cpu_parts()
    source = RecordingSource(sample_batches())
    with DevicePrefetcher(source, device, preprocess, decoder) as prefetcher:
        assert len(list(prefetcher)) == 5
    assert source.iter_thread == source.end_thread == "gradcam-batch-prefetch"
    assert not prefetcher._thread.is_alive()


def test_leaving_early_stops_the_thread_and_ends_the_source():
    device, decoder, preprocess = cpu_parts()
    source = RecordingSource(sample_batches(), endless=True)
    with DevicePrefetcher(source, device, preprocess, decoder, depth=1) as prefetcher:
        for _ in prefetcher:
            break
    assert not prefetcher._thread.is_alive()
    assert source.end_thread == "gradcam-batch-prefetch"
    assert source.pulled <= 3  # one handed out, one queued (depth 1), one in hand when stopped
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_ctrl_c_in_the_consumer_stops_the_thread():
    device, decoder, preprocess = cpu_parts()
    source = RecordingSource(sample_batches(), endless=True)
    with pytest.raises(KeyboardInterrupt):
        with DevicePrefetcher(source, device, preprocess, decoder) as prefetcher:
            for _ in prefetcher:
                raise KeyboardInterrupt
    assert not prefetcher._thread.is_alive()
    assert source.end_thread == "gradcam-batch-prefetch"


def test_close_before_iterating_starts_nothing():
    device, decoder, preprocess = cpu_parts()
    source = RecordingSource(sample_batches())
    prefetcher = DevicePrefetcher(source, device, preprocess, decoder)
    prefetcher.close()
    assert list(prefetcher) == [] and source.iter_thread is None


def test_a_source_error_reaches_the_consumer_with_context():
    device, decoder, preprocess = cpu_parts()
    source = RecordingSource(sample_batches(), fail_after=2)
    got = []
    with pytest.raises(ValueError, match="shard 7 is unreadable") as raised:
        with DevicePrefetcher(source, device, preprocess, decoder) as prefetcher:
            for ready in prefetcher:
                got.append(ready.batch.sample_ids[0])
    assert got == ["b0-0", "b1-0"]  # everything before the failure arrived
    assert any("reading batch 2 from the loader" in note for note in raised.value.__notes__)
    assert not prefetcher._thread.is_alive()


def test_a_decoder_error_reaches_the_consumer_with_context():
    device, _, preprocess = cpu_parts()

    def broken_decoder(payloads):
        raise MemoryError("out of device memory")

    with pytest.raises(MemoryError) as raised:
        with DevicePrefetcher(iter(sample_batches()), device, preprocess, broken_decoder) as prefetcher:
            list(prefetcher)
    assert any("preparing batch 1 (shard 's0')" in note for note in raised.value.__notes__)


def test_stop_iteration_inside_the_thread_is_not_a_silent_end():
    device, _, preprocess = cpu_parts()

    def decoder(payloads):
        raise StopIteration

    with pytest.raises(RuntimeError, match="StopIteration raised in the device prefetch thread"):
        with DevicePrefetcher(iter(sample_batches()), device, preprocess, decoder) as prefetcher:
            list(prefetcher)


def test_stats_say_who_waited():
    device, decoder, preprocess = cpu_parts()
    # a slow loader: the thread waits for it, so does the consumer
    source = RecordingSource(sample_batches(), delay=0.05)
    with DevicePrefetcher(source, device, preprocess, decoder) as prefetcher:
        list(prefetcher)
    stats = prefetcher.stats
    assert stats.loader_wait_seconds >= 5 * 0.05 * 0.9
    assert stats.consumer_wait_seconds >= 5 * 0.05 * 0.5
    assert 0 < stats.first_batch_seconds <= stats.consumer_wait_seconds + 0.05
    assert stats.decode_seconds > 0
    assert set(stats.as_dict()) >= {"batches", "consumer_wait_seconds", "decode_seconds", "loader_wait_seconds"}
    # a slow consumer: the thread waits for room in the queue instead
    with DevicePrefetcher(iter(sample_batches()), device, preprocess, decoder, depth=1) as prefetcher:
        for _ in prefetcher:
            time.sleep(0.05)
    assert prefetcher.stats.queue_full_seconds >= 0.05


def test_the_balance_hears_every_batch():
    device, decoder, preprocess = cpu_parts()
    balance = DecodeBalance(share=0.4, warmup=0)
    with DevicePrefetcher(iter(sample_batches()), device, preprocess, decoder, balance=balance) as prefetcher:
        list(prefetcher)
    assert balance.observed == 5
    assert prefetcher.stats.device_share == pytest.approx(0.4)


def test_a_real_loader_with_workers_and_device_payloads(tmp_path):
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.loader import ShardBatches, build_loader
    from gradcam_batch.data.shards import list_shards
    from sample_data import add_member

    for shard in range(2):
        with tarfile.open(tmp_path / f"s{shard}.tar", "w") as tar:
            for index in range(5):
                add_member(tar, f"k{index}.jpg", jpeg(40 + 8 * (index % 2), 50, seed=10 * shard + index))
            add_member(tar, "k9.jpg", b"\xff\xd8 garbage")
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "s*.tar"), resize=40, crop=CROP, batch_size=3,
                     num_workers=2)
    shards = list_shards(cfg)
    device, decoder, preprocess = cpu_parts()
    expected = {(b.shard_id, tuple(b.sample_ids)): (b, images, labels) for b, images, labels in
                synchronous(list(ShardBatches(shards, cfg, device_decode=True)), decoder, preprocess, device)}
    loader = build_loader(shards, cfg, pin_memory=False, device_decode=True)
    with DevicePrefetcher(loader, device, preprocess, decoder) as prefetcher:
        got = list(prefetcher)
    assert len(got) == len(expected)  # two workers interleave shards; match batches by content
    for ready in got:
        assert_same(ready, *expected[(ready.batch.shard_id, tuple(ready.batch.sample_ids))])


# --- data.decode=mixed: the balance -------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.05, 0.25, 0.5, 0.7, 0.93, 1.0])
@pytest.mark.parametrize("start", [0, 12_345, 10**9])
def test_take_device_takes_the_share_of_any_run_of_samples(share, start):
    balance = DecodeBalance(share=share)
    for length in (20, 256, 5000):
        taken = sum(balance.take_device(i) for i in range(start, start + length))
        assert abs(taken - share * length) <= 2.5, (length, taken)


def observe_many(balance, count, loader_wait, busy, blocked):
    for _ in range(count):
        balance.observe(loader_wait=loader_wait, busy=busy, blocked=blocked)
    return balance.share


def test_workers_behind_moves_work_to_the_device():
    balance = DecodeBalance(share=0.5, step=0.05, interval=4, warmup=2)
    assert observe_many(balance, 2, 5.0, 0.1, 0.0) == 0.5  # start-up batches are not evidence
    assert observe_many(balance, 3, 0.02, 0.01, 0.0) == 0.5  # waits 67% of the time, but only 3 batches
    assert observe_many(balance, 1, 0.02, 0.01, 0.0) == pytest.approx(0.55)
    assert observe_many(balance, 4, 0.02, 0.01, 0.0) == pytest.approx(0.55 + 0.0625)  # same way: step grows


def test_device_behind_moves_work_to_the_workers():
    balance = DecodeBalance(share=0.5, step=0.05, interval=4, warmup=0)
    assert observe_many(balance, 4, 0.0, 0.03, 0.001) == pytest.approx(0.45)


@pytest.mark.parametrize("loader_wait, busy, blocked", [
    (0.0, 0.01, 0.02),  # the model sets the pace: both sides have slack
    (0.003, 0.07, 0.027),  # workers and device both just keep up
    (0.002, 0.018, 0.0),  # both saturated: moving work helps neither
    (0.0, 0.0, 0.0),  # no time at all: no evidence
])
def test_balanced_or_saturated_holds(loader_wait, busy, blocked):
    balance = DecodeBalance(share=0.5, interval=2, warmup=0)
    assert observe_many(balance, 50, loader_wait, busy, blocked) == 0.5
    assert balance.history == [(0, 0.5)]


def test_reversals_halve_the_step_so_the_share_settles():
    balance = DecodeBalance(share=0.5, step=0.08, min_step=0.01, interval=1, warmup=0, smoothing=1.0)
    shares = []
    for turn in range(12):  # the evidence flips every move: an overshoot each time
        workers_behind = turn % 2 == 0
        shares.append(observe_many(balance, 1, 0.01 if workers_behind else 0.0, 0.01 if workers_behind else 0.03, 0.0))
    moves = np.abs(np.diff([0.5] + shares))
    assert moves[0] == pytest.approx(0.08)
    assert list(moves[1:5]) == pytest.approx([0.04, 0.02, 0.01, 0.01])  # halved down to min_step
    assert balance.step == pytest.approx(0.01)


def test_the_share_stays_within_bounds():
    balance = DecodeBalance(share=0.9, minimum=0.2, maximum=0.95, step=0.1, max_step=0.1, interval=1, warmup=0)
    assert observe_many(balance, 10, 0.01, 0.001, 0.0) == pytest.approx(0.95)
    assert observe_many(balance, 40, 0.0, 0.03, 0.0) == pytest.approx(0.2)
    assert DecodeBalance(share=3.0).share == 1.0


def test_moving_averages_damp_a_single_outlier():
    balance = DecodeBalance(share=0.5, warmup=0)  # decides every 8 batches
    assert observe_many(balance, 8, 0.0, 0.01, 0.02) == 0.5  # the model sets the pace: hold
    observe_many(balance, 1, 0.05, 0.0, 0.0)  # one batch all waiting (a shard opening) ...
    assert observe_many(balance, 7, 0.0, 0.01, 0.02) == 0.5  # ... is not a trend
    assert observe_many(balance, 8, 0.02, 0.01, 0.02) == pytest.approx(0.55)  # a steady 40% wait is


@pytest.mark.parametrize("bad", [dict(minimum=0.6, maximum=0.5), dict(step=0.0), dict(min_step=0.2, step=0.1),
                                 dict(interval=0), dict(smoothing=0.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        DecodeBalance(**bad)


def _report_share_changes(balance, results):
    deadline = time.monotonic() + 20
    seen = balance.share
    results.put(("first", seen, [balance.take_device(i) for i in range(8)]))
    while balance.share == seen and time.monotonic() < deadline:
        time.sleep(0.005)
    results.put(("then", balance.share, [balance.take_device(i) for i in range(8)]))


def test_forked_workers_see_the_share_the_main_process_sets():
    context = multiprocessing.get_context("fork")
    balance = DecodeBalance(share=0.0)
    results = context.Queue()
    worker = context.Process(target=_report_share_changes, args=(balance, results))
    worker.start()
    try:
        assert results.get(timeout=20) == ("first", 0.0, [False] * 8)
        balance.set_share(1.0)
        assert results.get(timeout=20) == ("then", 1.0, [True] * 8)
    finally:
        worker.join(20)


class _TakeDeviceDataset(torch.utils.data.IterableDataset):
    def __init__(self, balance):
        self.balance = balance

    def __iter__(self):
        yield self.balance.share, [self.balance.take_device(i) for i in range(4)]


@pytest.mark.slow
def test_spawned_dataloader_workers_get_the_balance():
    balance = DecodeBalance(share=1.0)
    loader = torch.utils.data.DataLoader(_TakeDeviceDataset(balance), batch_size=None, num_workers=1,
                                         multiprocessing_context="spawn")
    assert list(loader) == [[1.0, [True] * 4]]  # collation turns the tuple into a list


# --- on a GPU: stream order --------------------------------------------------------------


class SlowPreprocess(Preprocess):
    """Preprocess after a spin of the current stream: the results land well after the thread
    has queued them, so a consumer that does not wait for the event reads unfinished memory."""

    def __call__(self, images):
        torch.cuda._sleep(3_000_000)
        return super().__call__(images)


def gpu_batches(count: int) -> list[Batch]:
    batches = []
    for index in range(count):
        sizes = [(40, 50), (50, 40), (40, 50), (36, 36)][: index % 5]
        payloads = [jpeg(h, w, seed=100 * index + k) for k, (h, w) in enumerate(sizes)]
        if index % 7 == 3:
            payloads.append(b"\xff\xd8 garbage \xff\xd9")
        batch = make_batch(index, decoded=(index * 3) % 5, payloads=payloads, last=index == count - 1)
        batch.pin_memory()
        batches.append(batch)
    return batches


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_prefetch_equals_the_synchronous_path_under_late_reads(depth):
    device = torch.device("cuda", torch.cuda.current_device())
    decoder = DeviceDecoder(resize=40, crop=CROP, device=device)
    preprocess = SlowPreprocess(MEAN, STD, device, channels_last=True)
    batches = gpu_batches(40)
    expected = [(batch, images.cpu(), labels.cpu())
                for batch, images, labels in synchronous(batches, decoder, Preprocess(MEAN, STD, device, True), device)]
    copies = []
    with DevicePrefetcher(iter(batches), device, preprocess, decoder, depth=depth) as prefetcher:
        for ready in prefetcher:
            # The consumer's stream reads late and the batch is dropped at once: without
            # record_stream the thread would reuse the memory before these reads run.
            torch.cuda._sleep(2_000_000)
            copies.append((ready.batch, ready.images.clone(), ready.labels.clone()))
            del ready
    torch.cuda.synchronize()
    assert len(copies) == len(expected)
    for (batch, images, labels), (want_batch, want_images, want_labels) in zip(copies, expected):
        assert batch.sample_ids == want_batch.sample_ids and batch.errors == want_batch.errors
        torch.testing.assert_close(images.cpu(), want_images, atol=0, rtol=0)
        torch.testing.assert_close(labels.cpu(), want_labels, atol=0, rtol=0)
    assert prefetcher.stats.batches == 40


@pytest.mark.gpu
def test_cuda_prefetch_on_a_side_stream_of_the_consumer():
    """The consumer may itself run on a non-default stream: the wait goes to that stream."""
    device = torch.device("cuda", torch.cuda.current_device())
    decoder = DeviceDecoder(resize=40, crop=CROP, device=device)
    batches = gpu_batches(12)
    expected = [images.cpu() for _, images, _ in
                synchronous(batches, decoder, Preprocess(MEAN, STD, device, True), device)]
    consumer_stream = torch.cuda.Stream(device)
    got = []
    with torch.cuda.stream(consumer_stream):
        preprocess = SlowPreprocess(MEAN, STD, device, channels_last=True)
        with DevicePrefetcher(iter(batches), device, preprocess, decoder) as prefetcher:
            for ready in prefetcher:
                got.append(ready.images.sum(dim=(1, 2, 3)))
        torch.cuda.synchronize()
    for sums, want in zip(got, expected):
        torch.testing.assert_close(sums.cpu(), want.sum(dim=(1, 2, 3)))
