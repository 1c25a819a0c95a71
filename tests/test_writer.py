"""Parquet output: schema, values, metadata, atomic completion, errors, failure reporting."""

import errno
import json

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from gradcam_batch import writer as writer_module
from gradcam_batch.writer import METADATA_KEY, ParquetShardWriter, ShardOutput, completed_units


def output(shard, n=3, k=2, h=2, w=3, last=False, errors=(), seed=0):
    rng = np.random.default_rng(seed)
    cams = rng.random((n, k, h, w), dtype=np.float32)
    flat = cams.reshape(n, k, -1)
    return ShardOutput(shard, [f"{shard}/{i}" for i in range(n)], np.array([1, -1, 4][:n]),
                       rng.integers(0, 10, (n, k)), rng.standard_normal((n, k)).astype(np.float32),
                       rng.random((n, k), dtype=np.float32), cams, flat.mean(2), flat.argmax(2),
                       list(errors), last)


def test_rows_columns_and_metadata(tmp_path):
    batch = output("s0", last=True)
    with ParquetShardWriter(tmp_path, {"method": "gradcam"}) as writer:
        writer.submit(batch)
    table = pq.read_table(tmp_path / "cams" / "part-s0.parquet")
    assert table.num_rows == 6
    rows = table.to_pylist()
    assert [r["sample_id"] for r in rows] == ["s0/0", "s0/0", "s0/1", "s0/1", "s0/2", "s0/2"]
    assert [r["target_rank"] for r in rows] == [0, 1] * 3
    assert [r["label"] for r in rows] == [1, 1, None, None, 4, 4]
    assert rows[3]["target_class"] == batch.target_classes[1, 1]
    np.testing.assert_array_equal(np.array(rows[3]["cam"], np.float32), batch.cams[1, 1].reshape(-1))
    assert (rows[3]["cam_height"], rows[3]["cam_width"]) == (2, 3)
    peak = int(batch.peak[1, 1])
    assert (rows[3]["peak_y"], rows[3]["peak_x"]) == (peak // 3, peak % 3)
    file = pq.ParquetFile(tmp_path / "cams" / "part-s0.parquet")
    assert json.loads(file.schema_arrow.metadata[METADATA_KEY]) == {"method": "gradcam"}
    assert file.metadata.row_group(0).column(0).compression == "ZSTD"
    assert completed_units(tmp_path) == {"s0"}


def test_part_file_appears_only_when_complete(tmp_path):
    writer = ParquetShardWriter(tmp_path, {})
    writer.submit(output("s0", last=False))
    writer.submit(output("s1", last=True, errors=[("s1/x", "decode", "ValueError", "bad")]))
    writer.close()  # s0 never got its last batch: interrupted, so no part file and no leftovers
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["part-s1.parquet"]
    assert ds.dataset(tmp_path / "cams").to_table().num_rows == 6
    errors = pq.read_table(tmp_path / "errors" / "part-s1.parquet").to_pylist()
    assert errors == [{"sample_id": "s1/x", "shard": "s1", "stage": "decode", "error_type": "ValueError",
                       "message": "bad"}]
    assert writer.unit_counts == {"s1": {"rows": 6, "errors": 1}}


def test_temporaries_live_outside_the_folders_readers_glob(tmp_path):
    writer = ParquetShardWriter(tmp_path, {})
    writer.submit(output("s0", last=True))
    writer.submit(output("s1", last=False, errors=[("s1/x", "decode", "ValueError", "bad")]))
    writer.flush()
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["part-s0.parquet"]
    assert not list((tmp_path / "errors").iterdir())
    for path in (tmp_path / "cams").iterdir():  # what DuckDB's glob of cams/* reads: whole files only
        pq.read_table(path)
    assert ds.dataset(tmp_path / "cams", format="parquet").to_table().num_rows == 6
    in_progress = [p.name for p in (tmp_path / ".tmp").iterdir()]
    assert len(in_progress) == 1 and in_progress[0].startswith("cams.part-s1.parquet.")
    assert not in_progress[0].endswith(".parquet")  # nor does a recursive glob of **/*.parquet find it
    writer.close()
    assert not list((tmp_path / ".tmp").iterdir())


def test_writer_failure_reaches_the_caller(tmp_path):
    writer = ParquetShardWriter(tmp_path, {})
    broken = output("s0", last=True)
    broken.scores = np.zeros((1, 1))  # wrong length: the table cannot be built
    writer.submit(broken)
    with pytest.raises(RuntimeError, match="Parquet writer failed"):
        writer.close()


def test_a_codec_pyarrow_lacks_is_refused_before_any_file_exists(tmp_path):
    with pytest.raises(ValueError, match="output.compression='bogus'"):
        ParquetShardWriter(tmp_path, {}, compression="bogus")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_full_disk_names_the_path_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    def full(self, table, *args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    writer = ParquetShardWriter(tmp_path, {})
    writer.submit(output("s0", last=True, errors=[("s0/x", "decode", "ValueError", "bad")]))
    writer.flush()
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    writer.submit(output("s1", last=True, errors=[("s1/x", "decode", "ValueError", "bad")]))
    with pytest.raises(writer_module.OutputWriteError,
                       match=rf"^cannot write {tmp_path}/\.tmp/cams\.part-s1\.parquet\.\S+: No space left on device"):
        writer.close()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["cams/part-s0.parquet", "errors/part-s0.parquet"]
