"""Shard listing and readers for every format, plus decode/transform geometry."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sample_data import add_member, encode, make_imagefolder, make_parquet, make_webdataset
from gradcam_batch import UserError
from gradcam_batch.config import DataConfig
from gradcam_batch.data.loader import ShardBatches
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards, safe_shard_id
from gradcam_batch.data.transforms import decode_rgb, resize_crop


def read_all(cfg):
    return [sample for shard in list_shards(cfg) for sample in iter_samples(shard, cfg)]


def test_imagefolder_labels_ids_and_shards(tmp_path):
    expected = make_imagefolder(tmp_path, per_class=(3, 2, 4))
    cfg = DataConfig(format="imagefolder", root=str(tmp_path), shard_size=4)
    shards = list_shards(cfg)
    assert [s.shard_id for s in shards] == ["imagefolder-00000", "imagefolder-00001", "imagefolder-00002"]
    assert [len(s.files) for s in shards] == [4, 4, 1]
    samples = read_all(cfg)
    assert [(s.sample_id, s.label) for s in samples] == expected
    assert samples[0].payload == (tmp_path / expected[0][0]).read_bytes()


def test_webdataset_groups_members_by_key(tmp_path):
    expected = make_webdataset(tmp_path, shards=2, per_shard=3)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"))
    samples = read_all(cfg)
    assert {s.sample_id: s.label for s in samples} == expected
    assert [s.meta for s in samples[:2]] == [{"index": 0}, {"index": 1}]
    assert [s.shard_id for s in list_shards(cfg)] == ["shard-0000", "shard-0001"]


def test_webdataset_unlabeled_and_missing_image(tmp_path):
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add_member(tar, "x.seg.png", encode(rng, "PNG"))  # extension starts at the first dot: key x
        add_member(tar, "y.json", json.dumps({}).encode())  # no image at all
    samples = read_all(DataConfig(format="webdataset", shards=str(tmp_path / "a.tar")))
    assert samples[0].sample_id == "x" and samples[0].payload is None  # 'seg.png' is no image extension
    assert samples[0].error[1] == "MissingImage"
    assert samples[1].sample_id == "y" and samples[1].error is not None


@pytest.mark.parametrize("struct", [False, True])
@pytest.mark.parametrize("with_ids", [False, True])
def test_parquet_binary_and_struct_columns(tmp_path, struct, with_ids):
    expected = make_parquet(tmp_path, shards=2, rows=3, struct=struct, with_ids=with_ids)
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "*.parquet"), id_column="key" if with_ids else None)
    samples = read_all(cfg)
    assert {s.sample_id: s.label for s in samples} == expected
    assert all(s.payload and s.error is None for s in samples)


def test_parquet_without_label_column(tmp_path):
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"img": [encode(rng), encode(rng)]}), tmp_path / "p.parquet")
    samples = read_all(DataConfig(format="parquet", shards=str(tmp_path / "p.parquet"), image_column="img"))
    assert [(s.sample_id, s.label) for s in samples] == [("p/0", -1), ("p/1", -1)]


@pytest.mark.parametrize("cfg, message", [
    (dict(format="imagefolder", root="/nonexistent/dir"), "data.root='/nonexistent/dir' is not a directory"),
    (dict(format="webdataset", shards="/nonexistent/*.tar"), "matches no file"),
    (dict(format="parquet", shards="{tmp}/*.parquet", image_column="pixels"), "data.image_column='pixels'"),
])
def test_listing_errors_name_the_value(tmp_path, cfg, message):
    make_parquet(tmp_path, shards=1, rows=1)
    cfg = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in cfg.items()}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list_shards(DataConfig(**cfg))


def test_safe_shard_ids():
    for hostile in ("../../etc/passwd", "/abs/path", ".hidden", "a\x00b"):
        cleaned = safe_shard_id(hostile)
        assert "/" not in cleaned and "\x00" not in cleaned and not cleaned.startswith(".")
    assert safe_shard_id("a b/c?d") == "a_b_c_d"
    assert safe_shard_id("...") == "shard"


def test_decode_resize_crop_and_box():
    rng = np.random.default_rng(3)
    for fmt in ("JPEG", "PNG", "WEBP"):
        image = decode_rgb(encode(rng, fmt, size=(30, 60)))
        assert image.shape == (3, 30, 60) and image.dtype == torch.uint8
    gray = io.BytesIO()
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(gray, format="PNG")
    assert decode_rgb(gray.getvalue()).shape == (3, 9, 9)
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    out, box = resize_crop(image, 50, 50, box=[50, 0, 150, 100])  # the central square of a 2:1 image
    assert out.shape == (3, 50, 50)
    np.testing.assert_allclose(box, [0.0, 0.0, 1.0, 1.0], atol=1e-6)
    _, box = resize_crop(image, 50, 50, box=[75, 25, 125, 75])  # the middle half of that square
    np.testing.assert_allclose(box, [0.25, 0.25, 0.75, 0.75], atol=1e-6)
    _, box = resize_crop(image, 50, 50, box=[0, 0, 10, 10])  # left of the crop: clamps to an empty box
    assert box[2] == 0.0


def test_batches_never_span_shards_and_flag_the_last(tmp_path):
    make_webdataset(tmp_path, shards=2, per_shard=5)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), batch_size=2, resize=32, crop=32)
    batches = list(ShardBatches(list_shards(cfg), cfg))
    assert [(b.shard_id, len(b.sample_ids), b.last) for b in batches] == [
        ("shard-0000", 2, False), ("shard-0000", 2, False), ("shard-0000", 1, True),
        ("shard-0001", 2, False), ("shard-0001", 2, False), ("shard-0001", 1, True)]
    assert batches[0].images.shape == (2, 3, 32, 32) and batches[0].images.dtype == torch.uint8
