"""Bad shards and bad samples become error rows; the run goes on and the counts reconcile."""

import io
import json
import tarfile

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cli_helpers import TINY_RESNET, read_cams, run_composed
from sample_data import add_member, encode, make_parquet, make_webdataset


def errors_of(out):
    return ds.dataset(out / "errors", format="parquet").to_table().to_pylist()


def reconciles(out, summary, samples_seen):
    manifest = json.loads((out / "_manifest.json").read_text())
    assert summary.images + summary.errors == samples_seen
    assert manifest["rows"] == summary.rows and manifest["errors"] == summary.errors
    assert sum(c["rows"] + c["errors"] for c in manifest["shards"].values()) == samples_seen


def test_truncated_tar_and_non_integer_cls(tmp_path):
    make_webdataset(tmp_path / "wds", shards=1, per_shard=4)
    rng = np.random.default_rng(5)
    with tarfile.open(tmp_path / "wds" / "shard-0001.tar", "w") as tar:
        add_member(tar, "a.jpg", encode(rng))
        add_member(tar, "a.cls", b"cat")  # not an integer
        add_member(tar, "b.jpg", encode(rng))
        add_member(tar, "c.jpg", encode(rng))
    whole = (tmp_path / "wds" / "shard-0000.tar").read_bytes()
    (tmp_path / "wds" / "shard-0002.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut mid-member
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'wds'}/*.tar",
                           f"output.dir={out}")
    errors = errors_of(out)
    by_shard = {}
    for error in errors:
        by_shard.setdefault(error["shard"], []).append(error)
    assert [e["sample_id"] for e in by_shard["shard-0001"]] == ["a"]
    assert by_shard["shard-0001"][0]["error_type"] == "ValueError"
    assert any(e["stage"] == "read" and e["sample_id"] == "shard-0002/<tar>" for e in by_shard["shard-0002"])
    ids = read_cams(out).to_pylist()
    assert {(r["shard"], r["sample_id"]) for r in ids} >= {("shard-0001", "b"), ("shard-0001", "c")}
    assert summary.images == len(ids)
    seen = summary.images + summary.errors
    reconciles(out, summary, seen)


def test_unreadable_parquet_shard_is_an_error_row(tmp_path):
    expected = make_parquet(tmp_path / "pq", shards=2, rows=3)
    (tmp_path / "pq" / "part0.parquet").write_bytes(b"PAR1 this is not parquet")  # sorts first
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=parquet", f"data.shards={tmp_path / 'pq'}/*.parquet",
                           f"output.dir={out}")
    assert summary.images == 3
    assert [(e["shard"], e["stage"]) for e in errors_of(out)] == [("part0", "read")]
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(k for k in expected if k.startswith("part1"))
    reconciles(out, summary, 4)


def test_hostile_member_and_shard_names_never_become_paths(tmp_path):
    rng = np.random.default_rng(9)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "we ird;name.tar", "w") as tar:
        add_member(tar, "../../escape.jpg", encode(rng))
        add_member(tar, "/abs/evil.jpg", encode(rng))
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={data}/*.tar", f"output.dir={out}")
    assert summary.images == 2
    assert [p.name for p in (out / "cams").iterdir()] == ["part-we_ird_name.parquet"]
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == ["../../escape", "/abs/evil"]  # ids kept as data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
