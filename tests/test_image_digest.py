"""The image_digest column (issue 18, "the report inlines the reporting user's own images", last
part): each row carries the first 16 hex digits of the SHA-256 of its sample's encoded image as
the worker read it; the report hashes every image it reads back the same way and shows it only
when the digests agree, so a dataset file replaced by other bytes of the same size, its
modification time restored, is caught where the listing's size and time checks pass."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch import report
from gradcam_batch.writer import CAM_SCHEMA, ParquetShardWriter, ShardOutput
from sample_data import add_member, encode, make_imagefolder, make_parquet, make_webdataset
from test_report import Page
# the real ImageFolder and tar runs the hostile-folder tests use (module-scoped: a run per module)
from test_report_hostile import card_reasons, copy_output, edit_manifest, folder_run, notes, tar_run  # noqa: F401

CHANGED = "the file's content changed since the run"
UNVERIFIED = "could not be verified"


def sha16(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def digests_by_sample(out: Path) -> dict[str, set]:
    """sample id -> the image_digest values of all its rows."""
    found: dict[str, set] = {}
    for row in read_cams(out).select(["sample_id", "image_digest"]).to_pylist():
        found.setdefault(row["sample_id"], set()).add(row["image_digest"])
    return found


def tar_images(path: Path) -> dict[str, bytes]:
    """key -> the bytes of its .jpg member."""
    with tarfile.open(path) as tar:
        return {member.name[:-len(".jpg")]: tar.extractfile(member).read()
                for member in tar.getmembers() if member.name.endswith(".jpg")}


# --- the column -----------------------------------------------------------------------------------------


def test_the_column_is_a_string_of_the_schema():
    assert CAM_SCHEMA.field("image_digest").type == pa.string()


@pytest.mark.parametrize("data", ["webdataset", "parquet", "imagefolder"])
def test_rows_carry_the_digest_of_the_encoded_image(tmp_path, data):
    """Every row of a sample (both targets) carries sha256 of the image bytes exactly as the
    shard or file holds them; a sample that fails to decode is an error row, and rows + errors
    are the samples seen."""
    root, out = tmp_path / "data", tmp_path / "out"
    if data == "webdataset":
        make_webdataset(root, shards=2, per_shard=3)
        with tarfile.open(root / "shard-0001.tar", "a") as tar:
            add_member(tar, "s1/broken.jpg", b"\xff\xd8 not an image")
        expected = {key: sha16(payload) for tar in sorted(root.glob("*.tar"))
                    for key, payload in tar_images(tar).items()}
        selection = ["data=webdataset", f"data.shards={root}/shard-*.tar"]
    elif data == "parquet":
        make_parquet(root, shards=2, rows=3)
        expected = {f"{path.stem}/{index}": sha16(payload) for path in sorted(root.glob("*.parquet"))
                    for index, payload in enumerate(pq.read_table(path).column("image").to_pylist())}
        selection = ["data=parquet", f"data.shards={root}/*.parquet"]
    else:
        samples = make_imagefolder(root, per_class=(3, 2))
        expected = {relative: sha16((root / relative).read_bytes()) for relative, _ in samples}
        selection = ["data=imagefolder", f"data.root={root}"]
    summary = run_composed(*TINY_RESNET, *selection, "cam.targets=topk", "cam.topk=2", f"output.dir={out}")
    good = {key: digest for key, digest in expected.items() if key != "s1/broken"}
    assert (summary.images, summary.errors) == (len(good), len(expected) - len(good))
    table = read_cams(out)
    assert table.schema.field("image_digest").type == pa.string()
    assert table.num_rows == 2 * len(good)
    assert digests_by_sample(out) == {key: {digest} for key, digest in good.items()}


def test_a_device_decode_failure_keeps_the_digests_aligned(tmp_path, monkeypatch):
    """data.decode=device on CPU; the decoder fails one payload in the middle of a batch: that
    sample becomes an error row and every other row keeps its own image's digest."""
    from gradcam_batch.data.device_decode import DeviceDecoder

    rng = np.random.default_rng(3)
    payloads = {f"k{index}": encode(rng, size=(48, 64)) for index in range(7)}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, payload in payloads.items():
            add_member(tar, f"{key}.jpg", payload)
    failing = payloads["k1"]
    decode = DeviceDecoder._decode

    def fail_one(self, batch_payloads):
        decoded = decode(self, batch_payloads)
        return [ValueError("planted device decode failure") if payload == failing else image
                for payload, image in zip(batch_payloads, decoded)]

    monkeypatch.setattr(DeviceDecoder, "_decode", fail_one)
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path}/s.tar", "data.batch_size=4",
                           "data.decode=device", "runtime.device=cpu", "cam.targets=topk", "cam.topk=2",
                           f"output.dir={out}")
    assert (summary.images, summary.errors) == (6, 1)
    errors = pq.read_table(out / "errors" / "part-s.parquet").to_pylist()
    assert [(error["sample_id"], error["stage"]) for error in errors] == [("k1", "decode")]
    assert digests_by_sample(out) == {key: {sha16(payload)} for key, payload in payloads.items() if key != "k1"}


def test_device_images_drops_the_failed_samples_digest(tmp_path):
    """The prefetcher's drop of a payload that fails on the device takes its digest with it."""
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.device_decode import DeviceDecoder
    from gradcam_batch.data.loader import ShardBatches
    from gradcam_batch.data.prefetch import device_images
    from gradcam_batch.data.shards import list_shards

    rng = np.random.default_rng(5)
    png = io.BytesIO()
    Image.new("RGB", (30, 30), (0, 255, 0)).save(png, format="PNG")
    payloads = {"a": png.getvalue(), **{key: encode(rng, size=(40, 50)) for key in "bcd"}}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, payload in payloads.items():
            add_member(tar, f"{key}.{'png' if key == 'a' else 'jpg'}", payload)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "s.tar"), resize=32, crop=32)
    (batch,) = list(ShardBatches(list_shards(cfg), cfg, device_decode=True))
    assert batch.sample_ids == ["a", "b", "c", "d"] and len(batch.payloads) == 3
    assert batch.image_digests == [sha16(payloads[key]) for key in batch.sample_ids]
    real = DeviceDecoder(resize=32, crop=32, device=torch.device("cpu"))

    def decoder(batch_payloads):
        images, _ = real(batch_payloads[:1] + batch_payloads[2:])
        return images, {1: ValueError("planted")}  # "c", the second payload

    images = device_images(batch, decoder, torch.device("cpu"))
    assert len(images) == 3 and batch.sample_ids == ["a", "b", "d"]
    assert batch.image_digests == [sha16(payloads[key]) for key in ("a", "b", "d")]
    assert [error[0] for error in batch.errors] == ["c"]


def test_the_writer_refuses_digests_of_other_samples(tmp_path):
    """A digest list that does not match the samples would put one image's digest on another's rows."""
    cams = np.zeros((2, 1, 2, 2), np.float32)
    out = ShardOutput("s0", ["a", "b"], np.array([1, 2]), np.zeros((2, 1), np.int64), np.zeros((2, 1), np.float32),
                      np.zeros((2, 1), np.float32), cams, np.zeros((2, 1)), np.zeros((2, 1), np.int64), last=True,
                      image_digests=["0123456789abcdef"])
    writer = ParquetShardWriter(tmp_path, {})
    writer.submit(out)
    with pytest.raises(RuntimeError, match="1 image digests for 2 samples"):
        writer.close()


# --- the report -----------------------------------------------------------------------------------------


def same_size_other_image(original: bytes) -> bytes:
    """A valid JPEG of other pixels (one colour), padded after its end marker to `original`'s size."""
    buffer = io.BytesIO()
    Image.new("RGB", (52, 40), (255, 0, 255)).save(buffer, format="JPEG")
    other = buffer.getvalue()
    assert len(other) < len(original)
    return other + bytes(len(original) - len(other))


def replace_keeping_size_and_time(path: Path, offset: int, payload: bytes) -> None:
    status = path.stat()
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(payload)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (status.st_size, status.st_mtime_ns)


def test_a_same_size_replacement_with_its_time_restored_is_not_shown(folder_run, tmp_path, capsys):
    """c0/002.jpg rewritten with another picture of the same size, its mtime put back: the
    listing's checks pass, the digest does not; its card shows the map alone and why, the other
    four images are read, and nothing says their content was unverified."""
    root, out = folder_run
    data = tmp_path / "data"
    shutil.copytree(root, data)  # copy2: the same sizes and modification times
    sent = copy_output(out, tmp_path / "sent")
    edit_manifest(sent, lambda manifest: manifest["config"]["data"].update(root=str(data)))
    target = data / "c0" / "002.jpg"
    replace_keeping_size_and_time(target, 0, same_size_other_image(target.read_bytes()))
    page_path = tmp_path / "page.html"
    assert report.main([str(sent), "--out", str(page_path), "--per-gallery", "5"]) == 0
    captured = capsys.readouterr()
    assert "4 images from the dataset" in captured.out
    text = page_path.read_text()
    reasons = card_reasons(text)
    assert set(reasons) == {"c0/002.jpg"} and CHANGED in reasons["c0/002.jpg"]
    assert "not read" not in captured.err  # no shard was refused: the listing's checks passed
    assert UNVERIFIED not in captured.err and UNVERIFIED not in text
    result = report.build_report(sent, tmp_path / "again.html", per_gallery=5)
    assert result.images_shown == 4


def test_a_tar_member_replaced_in_place_is_not_shown(tar_run, tmp_path):
    """One image inside a tar shard replaced by other bytes of its size, the tar's mtime restored:
    that card shows the map alone and why; the shard's other images and the other shard's load."""
    shards, out = tar_run
    moved = tmp_path / "shards"
    shutil.copytree(shards, moved)
    sent = copy_output(out, tmp_path / "sent")

    def moved_listing(manifest):
        for record in manifest["listing"]["shards"].values():
            record["path"] = str(moved / Path(record["path"]).name)
    edit_manifest(sent, moved_listing)
    changed = moved / "shard-0001.tar"
    with tarfile.open(changed) as tar:
        member = tar.getmember("s1/img001.jpg")
        original = tar.extractfile(member).read()
    replace_keeping_size_and_time(changed, member.offset_data, same_size_other_image(original))
    result = report.build_report(sent, tmp_path / "page.html", per_gallery=6)
    assert result.images_shown == 5
    reasons = card_reasons((tmp_path / "page.html").read_text())
    assert set(reasons) == {"s1/img001"} and CHANGED in reasons["s1/img001"]
    assert result.note is None


@pytest.mark.parametrize("older", ["absent", "null"])
def test_an_output_without_digests_falls_back_and_says_so(folder_run, tmp_path, capsys, older):
    """An older version's output (no image_digest column, or one of nulls): the images are read
    after the listing's checks, as before, and the page and stderr say their content could not
    be verified."""
    root, out = folder_run
    sent = copy_output(out, tmp_path / "sent")
    for part in (sent / "cams").glob("*.parquet"):
        table = pq.read_table(part)
        index = table.schema.get_field_index("image_digest")
        if older == "absent":
            table = table.remove_column(index)
        else:
            table = table.set_column(index, "image_digest", pa.nulls(table.num_rows, pa.string()))
        pq.write_table(table, part)
    page_path = tmp_path / "page.html"
    assert report.main([str(sent), "--out", str(page_path), "--per-gallery", "5"]) == 0
    captured = capsys.readouterr()
    assert "5 images from the dataset" in captured.out
    text = page_path.read_text()
    assert not card_reasons(text)
    lead = Page(text).text("galleries")
    assert f"the content of 5 images shown {UNVERIFIED}" in lead and "image_digest" in lead
    assert any(UNVERIFIED in line for line in notes(captured.err)), captured.err
