"""Work units: shards split into slices that every worker and rank shares, with exactly-once
output, resume and error rows per unit."""

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_helpers import TINY_RESNET, merged, read_cams, run_composed
from gradcam_batch import UserError, dist
from gradcam_batch.config import DataConfig
from gradcam_batch.data.loader import ShardBatches, build_loader
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.units import list_units, tar_sample_offsets, webdataset_key
from sample_data import add_member, encode, make_imagefolder, make_webdataset

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def units_of(cfg: DataConfig):
    return list_units(list_shards(cfg), cfg.unit_size)


def sample_view(sample):
    return sample.sample_id, sample.label, sample.payload, sample.meta, sample.error


def read_by_unit(cfg: DataConfig):
    """{unit id: [sample view, ...]} reading every unit on its own."""
    return {unit.unit_id: [sample_view(s) for s in iter_samples(unit, cfg)] for unit in units_of(cfg)}


def read_whole(cfg: DataConfig):
    return [sample_view(s) for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]


def tarfile_sample_offsets(path):
    """The reference: tarfile's own member list, grouped as the reader groups it."""
    offsets, key = [], None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile() and webdataset_key(member.name)[0] != key:
                key = webdataset_key(member.name)[0]
                offsets.append(member.offset)
    return offsets


def mixed_tar(path: Path, rng) -> list[str]:
    """Samples of several members in every header flavour tarfile writes, with members that are
    not files in between; returns the sample keys in order."""
    keys = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(12):
            flavour = index % 4
            tar.format = [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT][flavour]
            if flavour == 0:
                key = f"pax/{'long' * 40}-{index:03d}"  # > 100 characters: a pax extended header
            elif flavour == 1:
                key = f"gnu/{'name' * 40}-{index:03d}"  # > 100 characters: a GNU longname member
            elif flavour == 2:
                key = f"{'ustar-prefix/' * 9}k{index:03d}"  # split into the ustar prefix and name fields
            else:
                key = f"plain/caf\u00e9-{index:03d}"  # non-ASCII: a pax header for the name
            add_member(tar, f"{key}.jpg", encode(rng))
            if index % 3 == 0:
                directory = tarfile.TarInfo(f"dirs/{index}")
                directory.type = tarfile.DIRTYPE
                tar.addfile(directory)  # between two members of one sample: skipped, sample goes on
            add_member(tar, f"{key}.cls", str(index % 7).encode())
            add_member(tar, f"{key}.json", json.dumps({"index": index}).encode())
            if index % 5 == 0:
                link = tarfile.TarInfo(f"links/{index}")
                link.type, link.linkname = tarfile.SYMTYPE, "elsewhere"
                tar.addfile(link)
            keys.append(key)
        add_member(tar, "empty.jpg", b"")  # zero-size member: a sample of its own, an error row later
    return [*keys, "empty"]


def test_tar_index_matches_tarfile_for_every_header_flavour(tmp_path):
    keys = mixed_tar(tmp_path / "mixed.tar", np.random.default_rng(0))
    offsets = tar_sample_offsets(str(tmp_path / "mixed.tar"))
    assert offsets == tarfile_sample_offsets(tmp_path / "mixed.tar")
    assert len(offsets) == len(keys)
    make_webdataset(tmp_path / "wds", shards=1, per_shard=7)
    shard = str(tmp_path / "wds" / "shard-0000.tar")
    assert tar_sample_offsets(shard) == tarfile_sample_offsets(shard)


@pytest.mark.parametrize("unit_size", [1, 2, 3, 5, 12, 13])
def test_tar_units_cover_every_sample_once_whole(tmp_path, unit_size):
    """Reading unit by unit gives exactly what reading the shard in one go gives: every sample
    once, each with all of its members, so no sample can straddle a unit boundary."""
    mixed_tar(tmp_path / "mixed.tar", np.random.default_rng(1))
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "mixed.tar"), unit_size=unit_size)
    by_unit = read_by_unit(cfg)
    assert len(by_unit) == -(-13 // unit_size)
    assert [s for samples in by_unit.values() for s in samples] == read_whole(cfg)
    ids = [s[0] for samples in by_unit.values() for s in samples]
    assert len(ids) == len(set(ids)) == 13
    for samples in by_unit.values():
        for sample_id, label, payload, meta, error in samples:
            if sample_id != "empty":  # all three members arrived together
                assert payload and label >= 0 and meta == {"index": int(sample_id[-3:])}, sample_id
    if unit_size < 13:
        assert all("@" in unit_id for unit_id in by_unit)
        sizes = [unit.samples for unit in units_of(cfg)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 13  # near-equal


def test_unit_names_and_ranges(tmp_path):
    make_webdataset(tmp_path, shards=1, per_shard=10)
    units = units_of(DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), unit_size=4))
    assert [u.unit_id for u in units] == ["shard-0000@00000000-00000003", "shard-0000@00000003-00000007",
                                          "shard-0000@00000007-00000010"]
    assert [(u.start, u.end, u.samples) for u in units] == [(0, 3, 3), (3, 7, 4), (7, 10, 3)]
    assert units[0].byte_start == 0 and units[-1].byte_end is None  # the last slice reads to the end
    (whole,) = units_of(DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), unit_size=10))
    assert whole.unit_id == "shard-0000" and whole.samples == 10


def test_compressed_tar_and_global_pax_header_stay_one_unit(tmp_path):
    make_webdataset(tmp_path / "wds", shards=1, per_shard=6)
    plain = (tmp_path / "wds" / "shard-0000.tar").read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar.gz").write_bytes(gzip.compress(plain))
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "gz" / "*.tar.gz"), unit_size=2)
    (unit,) = units_of(cfg)
    assert unit.whole and unit.samples is None
    assert len([s for s in iter_samples(unit, cfg) if s.error is None]) == 6
    rng = np.random.default_rng(2)
    with tarfile.open(tmp_path / "global.tar", "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tar:
        for index in range(4):
            add_member(tar, f"k{index}.jpg", encode(rng))
    assert tar_sample_offsets(str(tmp_path / "global.tar")) is None  # applies to every later member
    (unit,) = units_of(DataConfig(format="webdataset", shards=str(tmp_path / "global.tar"), unit_size=1))
    assert unit.whole


def test_hostile_extended_header_size_is_not_read_into_memory(tmp_path):
    make_webdataset(tmp_path, shards=1, per_shard=3)
    bomb = tarfile.TarInfo("././@PaxHeader")
    bomb.type, bomb.size = tarfile.XHDTYPE, 1 << 40  # a terabyte of pax records, in a few bytes
    path = tmp_path / "shard-0000.tar"
    data = path.read_bytes().rstrip(b"\0")
    path.write_bytes(data + bytes(-len(data) % 512) + bomb.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    assert tar_sample_offsets(str(path)) is None  # not split; the reader streams it as a whole shard


def test_truncated_tar_error_row_once_across_units(tmp_path):
    make_webdataset(tmp_path / "full", shards=1, per_shard=10)
    whole = (tmp_path / "full" / "shard-0000.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "cut.tar").write_bytes(whole[: len(whole) * 2 // 3])  # mid-member
    for unit_size in (2, 3, 100):
        cfg = DataConfig(format="webdataset", shards=str(tmp_path / "cut" / "cut.tar"), unit_size=unit_size)
        by_unit = read_by_unit(cfg)
        samples = [s for part in by_unit.values() for s in part]
        tar_errors = [s for s in samples if s[0].endswith("/<tar>")]
        assert len(tar_errors) == 1, unit_size
        assert tar_errors[0][0] == f"{list(by_unit)[-1]}/<tar>"  # reported by the last unit
        ids = [s[0] for s in samples]
        assert len(ids) == len(set(ids))
        # the same samples as reading the shard in one go, apart from the error row's unit name
        whole_samples = [s for s in read_whole(cfg) if not s[0].endswith("/<tar>")]
        assert [s for s in samples if s not in tar_errors] == whole_samples


def test_a_slice_that_ends_early_reports_it(tmp_path):
    """A shard cut short after it was listed: tarfile would end the first slice quietly at the
    damage; the slice reports it instead of dropping the samples up to its end."""
    make_webdataset(tmp_path, shards=1, per_shard=8)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), unit_size=4)
    first, _ = units_of(cfg)
    path = tmp_path / "shard-0000.tar"
    path.write_bytes(path.read_bytes()[: first.byte_end // 2 // 512 * 512] + bytes(1024))  # clean end mark
    samples = list(iter_samples(first, cfg))
    assert samples[-1].sample_id == f"{first.unit_id}/<tar>" and "changed after it was listed" in samples[-1].error[2]


def test_truncated_split_tar_end_to_end(tmp_path):
    make_webdataset(tmp_path / "full", shards=1, per_shard=12)
    whole = (tmp_path / "full" / "shard-0000.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "cut.tar").write_bytes(whole[: len(whole) * 3 // 4])
    out = tmp_path / "out"
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'cut'}/cut.tar",
                           "data.unit_size=3", "data.batch_size=2", f"output.dir={out}")
    errors = pq.read_table(out / "errors").to_pylist() if (out / "errors").exists() else []
    assert sum(e["sample_id"].endswith("/<tar>") for e in errors) == 1
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["units"]) == 4
    assert sum(c["rows"] + c["errors"] for c in manifest["units"].values()) == summary.images + summary.errors
    assert manifest["shards"] == {"cut": {"rows": summary.rows, "errors": summary.errors}}
    ids = read_cams(out)["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary.images


def parquet_with_row_groups(path: Path, rows: int, row_group_size: int, rng) -> dict:
    images = [encode(rng) for _ in range(rows)]
    labels = [int(v) for v in rng.integers(0, 10, size=rows)]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path,
                   row_group_size=row_group_size)
    return {f"{path.stem}/{index}": label for index, label in enumerate(labels)}


def test_parquet_splits_at_row_groups(tmp_path):
    expected = parquet_with_row_groups(tmp_path / "hf.parquet", rows=10, row_group_size=4, rng=np.random.default_rng(3))
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "hf.parquet"), unit_size=4)
    units = units_of(cfg)
    assert [(u.start, u.end, u.row_groups) for u in units] == [(0, 4, [0]), (4, 8, [1]), (8, 10, [2])]
    by_unit = read_by_unit(cfg)
    assert [s for part in by_unit.values() for s in part] == read_whole(cfg)
    assert {s[0]: s[1] for part in by_unit.values() for s in part} == expected  # row ids count from the file's start
    # cuts go to the nearest row-group start: 5 rows per unit become 4 + 6
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "hf.parquet"), unit_size=5)
    assert [(u.start, u.end, u.row_groups) for u in units_of(cfg)] == [(0, 4, [0]), (4, 10, [1, 2])]
    one_group = tmp_path / "one" / "single.parquet"
    one_group.parent.mkdir()
    parquet_with_row_groups(one_group, rows=10, row_group_size=100, rng=np.random.default_rng(4))
    (unit,) = units_of(DataConfig(format="parquet", shards=str(one_group), unit_size=2))
    assert unit.whole and unit.samples == 10


def test_imagefolder_splits_into_file_ranges(tmp_path):
    expected = make_imagefolder(tmp_path, per_class=(6, 5))
    cfg = DataConfig(format="imagefolder", root=str(tmp_path), shard_size=8, unit_size=3)
    units = units_of(cfg)
    assert [(u.shard_id, u.start, u.end) for u in units] == [
        ("imagefolder-00000", 0, 3), ("imagefolder-00000", 3, 5), ("imagefolder-00000", 5, 8),
        ("imagefolder-00001", 0, None)]
    assert units[-1].unit_id == "imagefolder-00001"  # 3 files: one unit, the shard's own name
    by_unit = read_by_unit(cfg)
    assert [(s[0], s[1]) for part in by_unit.values() for s in part] == expected


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_one_shard_keeps_every_worker_busy(tmp_path):
    """1 shard, 4 workers: every worker reads an equal share, and batches never span units."""
    make_webdataset(tmp_path, shards=1, per_shard=40)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), unit_size=5, batch_size=2,
                     num_workers=4, resize=32, crop=32)
    units = units_of(cfg)
    assert len(units) == 8
    batches = list(build_loader(units, cfg, pin_memory=False))
    per_worker = Counter()
    for batch in batches:
        per_worker[batch.worker] += len(batch.sample_ids)
    assert per_worker == {0: 10, 1: 10, 2: 10, 3: 10}
    by_unit = {}
    for batch in batches:
        by_unit.setdefault(batch.unit_id, []).append(batch)
    for unit in units:
        parts = by_unit[unit.unit_id]
        assert [b.last for b in parts] == [False] * (len(parts) - 1) + [True]
        assert sum(len(b.sample_ids) for b in parts) == unit.samples
    ids = [i for batch in batches for i in batch.sample_ids]
    assert len(ids) == len(set(ids)) == 40


def test_device_decode_payloads_carry_their_unit(tmp_path):
    make_webdataset(tmp_path, shards=1, per_shard=6)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), unit_size=3, resize=32, crop=32)
    batches = list(ShardBatches(units_of(cfg), cfg, device_decode=True))
    assert [(b.unit_id, len(b.payloads), len(b.images), b.last) for b in batches] == [
        ("shard-0000@00000000-00000003", 3, 0, True), ("shard-0000@00000003-00000006", 3, 0, True)]
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path}/*.tar", "data.decode=device",
                           "data.unit_size=2", f"output.dir={tmp_path / 'out'}")
    assert (summary.images, summary.errors) == (6, 0)
    assert sorted(p.name for p in (tmp_path / "out" / "cams").iterdir()) == [
        "part-shard-0000@00000000-00000002.parquet", "part-shard-0000@00000002-00000004.parquet",
        "part-shard-0000@00000004-00000006.parquet"]


def test_units_are_dealt_to_ranks_disjoint_and_covering(tmp_path):
    make_webdataset(tmp_path, shards=2, per_shard=9)
    units = units_of(DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), unit_size=3))
    ranks = [dist.assign(units, rank, 4) for rank in range(4)]
    assert sorted(u.unit_id for part in ranks for u in part) == sorted(u.unit_id for u in units)
    assert {u.shard_id for u in ranks[0]} == {"shard-0000", "shard-0001"}  # one shard's slices spread over ranks


def test_manifest_records_units_and_a_changed_unit_size_resumes_the_recorded_split(tmp_path, caplog):
    expected = make_webdataset(tmp_path / "wds", shards=1, per_shard=12)
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'wds'}/*.tar", "data.batch_size=5",
            f"output.dir={out}"]
    run_composed(*args, "data.unit_size=4")
    manifest = json.loads((out / "_manifest.json").read_text())
    shard = tmp_path / "wds" / "shard-0000.tar"
    assert manifest["unit_size"] == 4
    assert manifest["listing"]["shards"] == {"shard-0000": {"path": str(shard), "size": shard.stat().st_size,
                                                            "mtime_ns": shard.stat().st_mtime_ns}}
    units = manifest["listing"]["units"]
    assert [(u["shard"], u["start"], u["end"], u["samples"]) for u in units.values()] == [
        ("shard-0000", 0, 4, 4), ("shard-0000", 4, 8, 4), ("shard-0000", 8, 12, 4)]
    assert all(len(u["bytes"]) == 2 for u in units.values())
    assert manifest["units"] == {unit_id: {"rows": 4, "errors": 0} for unit_id in units}

    middle = out / "cams" / "part-shard-0000@00000004-00000008.parquet"
    middle.unlink()  # as if the run had stopped while that unit was open
    with caplog.at_level("WARNING", logger="gradcam_batch"):
        summary = run_composed(*args, "data.unit_size=6")  # would cut 2 units of 6: the resume keeps 3 of 4
    assert "data.unit_size=6 ignored" in caplog.text and "data.unit_size=4" in caplog.text
    assert (summary.images, summary.shards_written, summary.shards_skipped) == (4, 1, 2)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(expected)
    assert json.loads((out / "_manifest.json").read_text())["unit_size"] == 4

    summary = run_composed(*args, "data.unit_size=6", "output.overwrite=true")  # starting over re-splits
    assert summary.shards_written == 2
    assert sorted(p.name for p in (out / "cams").iterdir()) == [
        "part-shard-0000@00000000-00000006.parquet", "part-shard-0000@00000006-00000012.parquet"]
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(expected)


def test_resume_on_changed_data_is_refused_naming_the_shard(tmp_path):
    make_webdataset(tmp_path / "wds", shards=2, per_shard=4)
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'wds'}/*.tar", "data.unit_size=2",
            f"output.dir={out}"]
    run_composed(*args)
    shard = tmp_path / "wds" / "shard-0001.tar"
    with tarfile.open(shard, "a") as tar:  # a sample more: the old cut points no longer hold
        add_member(tar, "extra.jpg", encode(np.random.default_rng(5)))
    with pytest.raises(UserError, match=r"was started on different data: shard shard-0001 changed \(size"):
        run_composed(*args)
    make_webdataset(tmp_path / "wds2", shards=1, per_shard=4)
    (tmp_path / "wds2" / "shard-0000.tar").rename(tmp_path / "wds" / "shard-0002.tar")
    shard.unlink()
    with pytest.raises(UserError, match="shard shard-0001 is no longer listed"):
        run_composed(*args)


def test_unit_size_is_validated():
    with pytest.raises(UserError, match="data.unit_size=0 is not valid"):
        DataConfig(unit_size=0)


@pytest.mark.slow
def test_kill_nine_then_resume_one_split_shard_exactly_once(tmp_path):
    expected = make_webdataset(tmp_path / "wds", shards=1, per_shard=120)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gradcam_batch", *merged(*TINY_RESNET, "data=webdataset",
            f"data.shards={tmp_path / 'wds'}/*.tar", "data.unit_size=6", "data.batch_size=3",
            "data.num_workers=2", f"output.dir={out}")]
    rng = random.Random(7)
    progress = []
    for wait_for_parts in (3, 10):  # 20 units: kills land mid-unit, mid-rename or between units
        process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.monotonic() + 120
        while (process.poll() is None and time.monotonic() < deadline
               and len(list((out / "cams").glob("part-*.parquet"))) < wait_for_parts):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(process.pid, signal.SIGKILL)  # the main process and its DataLoader workers
        process.wait()
        for part in (out / "cams").glob("part-*.parquet"):
            pq.read_table(part)  # whatever is visible is whole
        progress.append(len(list((out / "cams").glob("part-*.parquet"))))
    assert any(0 < done < 20 for done in progress), progress
    final = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    ids = read_cams(out)["sample_id"].to_pylist()
    assert sorted(ids) == sorted(expected)  # every sample exactly once
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 120 and len(manifest["units"]) == 20
    assert len(list((out / "cams").glob("part-shard-0000@*.parquet"))) == 20
    assert not list((out / "cams").glob(".*.tmp"))


@pytest.mark.slow
def test_torchrun_two_ranks_share_the_units_of_one_shard(tmp_path):
    expected = make_webdataset(tmp_path / "wds", shards=1, per_shard=21)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
         "-m", "gradcam_batch", *TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'wds'}/*.tar",
         "data.unit_size=3", f"output.dir={out}"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(expected)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["units"]) == 7
    assert [r["images"] for r in manifest["this_run"]["ranks"]] == [12, 9]  # units 0,2,4,6 / 1,3,5
