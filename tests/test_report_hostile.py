"""gradcam-batch-report on a folder someone else may have sent (issue 18, "Hostile folders"): the
images it inlines come only from data the folder's own listing names, once the files match it;
only the tool's part files are counted; option values and manifests that would make a page of
gigabytes or a traceback are one line, exit code 2."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_helpers import TINY_RESNET, run_composed
from gradcam_batch import report
from sample_data import make_imagefolder, make_webdataset
from test_report import Page, check_self_contained, class_counts, leading_int

PROG = "gradcam-batch-report"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A real run over an ImageFolder of 5 images in shards of 2 files: imagefolder-00000 holds
    c0/000.jpg and c0/001.png, imagefolder-00001 c0/002.jpg and c1/000.jpg, imagefolder-00002 c1/001.png."""
    base = tmp_path_factory.mktemp("folder")
    root, out = base / "data", base / "out"
    make_imagefolder(root, per_class=(3, 2))
    summary = run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={root}", "data.shard_size=2",
                           f"output.dir={out}")
    assert summary.images == 5
    return root, out


@pytest.fixture(scope="module")
def tar_run(tmp_path_factory):
    """A real run over two tar shards of 3 images each."""
    base = tmp_path_factory.mktemp("tars")
    shards, out = base / "shards", base / "out"
    make_webdataset(shards, shards=2, per_shard=3)
    summary = run_composed(*TINY_RESNET, "data=webdataset",
                           f"data.shards=[{shards}/shard-0000.tar,{shards}/shard-0001.tar]", f"output.dir={out}")
    assert summary.images == 6
    return shards, out


def copy_output(out: Path, to: Path) -> Path:
    shutil.copytree(out, to, ignore=shutil.ignore_patterns(".tmp", ".gradcam-batch.lock", "report.html"))
    return to


def edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "_manifest.json").read_text())
    change(manifest)
    (out / "_manifest.json").write_text(json.dumps(manifest))


def edit_rows(part: Path, change) -> None:
    """Rewrite a part file's rows, keeping its schema and metadata."""
    table = pq.read_table(part)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)


def card_reasons(text: str) -> dict[str, str]:
    """sample id -> the reason its card gives for showing the map alone."""
    found = re.findall(r'title="([^"]*) \([^"]*\)">[^<]*</span>(?:<span class="d">[^<]*</span>)*'
                       r'<span class="why">([^<]*)</span>', text)
    return {html_unescape(sample): html_unescape(why) for sample, why in found}


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{PROG}: note: ")]


# --- images only from the data the listing names ------------------------------------------------------


def passport(home: Path) -> Path:
    """The reporting user's own picture, in a home folder beside another folder."""
    (home / "Pictures").mkdir(parents=True)
    (home / "Documents").mkdir()
    picture = home / "Pictures" / "passport.png"
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (255, 0, 255)).save(buffer, format="PNG")
    picture.write_bytes(buffer.getvalue())
    return picture


def forged_listing(picture: Path, label: int, mtime_ns: int) -> dict:
    """A listing whose one shard is the picture, as data.shards.Shard.source() records one: the
    name, label and size right, the modification time `mtime_ns`."""
    names = f"Pictures/{picture.name}\t{label}".encode()
    stats = f"{picture.stat().st_size} {mtime_ns}\n".encode()
    record = {"files": 1, "first": f"Pictures/{picture.name}", "last": f"Pictures/{picture.name}",
              "digest": hashlib.sha256(names).hexdigest()[:16], "stats": hashlib.sha256(stats).hexdigest()[:16]}
    return {"shards": {"imagefolder-00000": record},
            "units": {"imagefolder-00000": {"shard": "imagefolder-00000", "start": 0, "end": None, "samples": 1}}}


@pytest.mark.parametrize("listing", ["the run's", "none", "forged, mtime to the second"])
def test_a_crafted_root_does_not_put_the_users_own_pictures_in_the_page(folder_run, tmp_path, capsys, listing):
    """A folder whose manifest says data.root=$HOME and whose row names Pictures/passport.png:
    the picture is not read (the listing does not name it, or not with its size and time to the
    nanosecond), the card shows the map alone and why, and no folder name of $HOME reaches the
    page as a class name."""
    root, out = folder_run
    picture = passport(tmp_path / "home")
    sent = copy_output(out, tmp_path / "sent")

    def crafted(manifest):
        manifest["config"]["data"]["root"] = str(tmp_path / "home")
        if listing == "none":
            del manifest["listing"]
        elif listing.startswith("forged"):
            guess = picture.stat().st_mtime_ns // 10**9 * 10**9 - 10**9
            manifest["listing"] = forged_listing(picture, 1, guess)

    edit_manifest(sent, crafted)
    edit_rows(sent / "cams" / "part-imagefolder-00000.parquet",
              lambda rows: [row.update(sample_id="Pictures/passport.png") for row in rows[:1]])
    if listing.startswith("forged"):  # the forged listing names one unit: that part file only
        for part in (sent / "cams").glob("part-imagefolder-0000[12].parquet"):
            part.unlink()
    page_path = tmp_path / "page.html"
    assert report.main([str(sent), "--out", str(page_path), "--per-gallery", "5"]) == 0
    captured = capsys.readouterr()
    assert "0 images from the dataset" in captured.out
    text = page_path.read_text()
    page = Page(text)
    check_self_contained(text, page)
    assert "Pictures/passport.png" in page.card_ids("gallery-high")
    expected = {"the run's": "is gone or was renamed since the run",
                "none": "the manifest holds no listing of the run's data",
                "forged, mtime to the second": "a file's size or modification time changed since the run"}[listing]
    assert expected in html_unescape(text)
    assert "Documents" not in text  # $HOME's folders are not listed as class names
    assert any(expected in line for line in notes(captured.err)), captured.err
    assert not any("read from" in line for line in notes(captured.err))


def test_the_listing_decides_what_is_read(folder_run, tmp_path):
    """The control for the test above: a listing with the picture's exact size and nanosecond
    modification time, and a row with its content digest (all of which only someone with access
    to the file knows), is what lets it be read."""
    root, out = folder_run
    picture = passport(tmp_path / "home")
    sent = copy_output(out, tmp_path / "sent")
    edit_manifest(sent, lambda manifest: (manifest["config"]["data"].update(root=str(tmp_path / "home")),
                                          manifest.update(listing=forged_listing(picture, 1,
                                                                                 picture.stat().st_mtime_ns))))
    digest = hashlib.sha256(picture.read_bytes()).hexdigest()[:16]
    edit_rows(sent / "cams" / "part-imagefolder-00000.parquet",
              lambda rows: [row.update(sample_id="Pictures/passport.png", image_digest=digest) for row in rows[:1]])
    result = report.build_report(sent, tmp_path / "page.html", per_gallery=5)
    assert result.images_shown == 1
    assert result.images_from == f"data.root {tmp_path / 'home'} (listed shard imagefolder-00000)"


def test_a_file_changed_since_the_run_is_not_read_the_others_are(folder_run, tmp_path, capsys):
    """One image rewritten after the run (same name, new time): its shard's cards show the map
    alone and why; the other shards' images are read, and stderr and the page say from where."""
    root, out = folder_run
    data = tmp_path / "data"
    shutil.copytree(root, data)  # copy2: the same sizes and modification times
    sent = copy_output(out, tmp_path / "sent")
    edit_manifest(sent, lambda manifest: manifest["config"]["data"].update(root=str(data)))
    status = (data / "c0" / "002.jpg").stat()
    os.utime(data / "c0" / "002.jpg", ns=(status.st_atime_ns, status.st_mtime_ns + 1))  # in imagefolder-00001
    page_path = tmp_path / "page.html"
    assert report.main([str(sent), "--out", str(page_path), "--per-gallery", "5"]) == 0
    captured = capsys.readouterr()
    assert "3 images from the dataset" in captured.out
    text = page_path.read_text()
    reasons = card_reasons(text)
    why = "a file's size or modification time changed since the run"
    assert set(reasons) == {"c0/002.jpg", "c1/000.jpg"} and all(why in reason for reason in reasons.values())
    read = [line for line in notes(captured.err) if "read from" in line]
    assert read == [f"{PROG}: note: images: 3 gallery images read from data.root {data} (listed shards "
                    "imagefolder-00000, imagefolder-00002) into the page; --no-images leaves the dataset out"]
    assert any("1 shard(s) not read (imagefolder-00001)" in line for line in notes(captured.err))
    lead = Page(text).text("galleries")
    assert f"read back from data.root {data}" in lead and "--no-images" in lead
    # --no-images reads nothing and says nothing of it
    assert report.main([str(sent), "--out", str(page_path), "--no-images"]) == 0
    captured = capsys.readouterr()
    assert "0 images from the dataset" in captured.out and not notes(captured.err)
    assert "read back from" not in page_path.read_text()


@pytest.mark.parametrize("change", ["modified", "grown"])
def test_a_tar_changed_since_the_run_is_not_read(tar_run, tmp_path, capsys, change):
    shards, out = tar_run
    moved = tmp_path / "shards"
    shutil.copytree(shards, moved)
    sent = copy_output(out, tmp_path / "sent")

    def moved_listing(manifest):
        for record in manifest["listing"]["shards"].values():
            record["path"] = str(moved / Path(record["path"]).name)
    edit_manifest(sent, moved_listing)
    changed = moved / "shard-0001.tar"
    if change == "grown":
        with changed.open("ab") as handle:
            handle.write(b"\0" * 1024)
    else:
        status = changed.stat()
        os.utime(changed, ns=(status.st_atime_ns, status.st_mtime_ns + 1))
    assert report.main([str(sent), "--out", str(tmp_path / "page.html"), "--per-gallery", "6"]) == 0
    captured = capsys.readouterr()
    assert "3 images from the dataset" in captured.out
    reasons = card_reasons((tmp_path / "page.html").read_text())
    why = f"{changed} {'was modified' if change == 'modified' else 'changed size'} since the run"
    assert set(reasons) == {f"s1/img{i:03d}" for i in range(3)} and all(why in r for r in reasons.values())
    assert f"read from 1 shard file of the run's listing ({moved / 'shard-0000.tar'})" in captured.err
    assert str(changed) not in "".join(line for line in notes(captured.err) if "read from" in line)


def test_samples_the_listing_does_not_name_show_the_map_alone(folder_run, tmp_path):
    """A row naming a file of the root that its shard does not hold, and a unit whose shard the
    listing does not record: their cards show the map alone and why; the others are read."""
    root, out = folder_run
    sent = copy_output(out, tmp_path / "sent")
    edit_rows(sent / "cams" / "part-imagefolder-00000.parquet",
              lambda rows: [row.update(sample_id="c1/001.png") for row in rows if row["sample_id"] == "c0/000.jpg"])
    (sent / "cams" / "part-imagefolder-00002.parquet").rename(sent / "cams" / "part-imagefolder-00099.parquet")
    edit_rows(sent / "cams" / "part-imagefolder-00099.parquet",
              lambda rows: [row.update(shard="imagefolder-00099", sample_id="c0/000.jpg") for row in rows])
    edit_manifest(sent, lambda manifest: manifest["listing"]["units"].update(
        {"imagefolder-00099": {"shard": "imagefolder-00099", "start": 0, "end": None, "samples": 1}}))
    result = report.build_report(sent, tmp_path / "page.html", per_gallery=5)
    assert result.images_shown == 3
    reasons = card_reasons((tmp_path / "page.html").read_text())
    assert reasons == {"c1/001.png": "not a file of shard imagefolder-00000 in the run's listing",
                       "c0/000.jpg": "shard imagefolder-00099 is not in the run's listing; its images are not read"}


# --- only the tool's part files -------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [True, False])
def test_only_the_tools_part_files_are_read(tar_run, tmp_path, capsys, manifest):
    """A user's file in cams/ (kept by overwrite), a merged copy, a copy without the tool's
    metadata (as DuckDB's COPY writes) and a file of other columns: none is counted, each is
    named on stderr and in the page; the counts are the run's."""
    shards, out = tar_run
    sent = copy_output(out, tmp_path / "sent")
    cams = sent / "cams"
    parts = sorted(cams.glob("part-*.parquet"))
    merged = pa.concat_tables([pq.read_table(part) for part in parts])
    pq.write_table(merged, cams / "part-merged.parquet")
    shutil.copy(parts[0], cams / "mine.parquet")
    pq.write_table(pq.read_table(parts[1]).replace_schema_metadata(None), cams / "part-shard-0001-copy.parquet")
    pq.write_table(pa.table({"note": ["my own notes"]}), cams / "part-notes.parquet")
    if not manifest:
        (sent / "_manifest.json").unlink()
    page_path = tmp_path / "page.html"
    assert report.main([str(sent), "--out", str(page_path), "--no-images"]) == 0
    captured = capsys.readouterr()
    text = page_path.read_text()
    page = Page(text)
    check_self_contained(text, page)
    expected = class_counts(out, "layer4")
    assert {leading_int(row[0]): int(row[1]) for row in page.table("classes")} == dict(expected)
    assert re.search(r"<th>Rows</th><td>6 ", text) and "(unnamed)" not in text
    skipped = {"cams/mine.parquet": "not a part file name",
               "cams/part-merged.parquet": ("not a unit of the run's listing" if manifest else
                                            "holds rows of other shards than merged"),
               "cams/part-shard-0001-copy.parquet": ("not a unit of the run's listing" if manifest else
                                                     "no gradcam-batch metadata"),
               "cams/part-notes.parquet": ("not a unit of the run's listing" if manifest else
                                           "no gradcam-batch metadata")}
    listed = dict(re.findall(r"<li><code>([^<]*)</code>: ([^<]*)</li>", text))
    assert set(listed) == set(skipped)
    for name, why in skipped.items():
        assert html_unescape(listed[name]).startswith(why), (name, listed[name])
    lines = [line for line in notes(captured.err) if "not read" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: note: not read: 4 file(s) that are not this tool's "
                                                   "part files of this output (cams/mine.parquet: ")


def test_a_folder_of_no_part_file_of_the_tool_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "cams").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1, 2]}), out / "cams" / "mine.parquet")
    assert report.main([str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{PROG}: error: {out / 'cams'} does not hold gradcam-batch maps (no part file of this tool; "
                   "skipped cams/mine.parquet: not a part file name (part-<unit>.parquet))"]


@pytest.mark.parametrize("entry", ["_manifest.json", "cams", "a part file"])
def test_links_planted_in_the_folder_are_not_read_through(tar_run, tmp_path, capsys, entry):
    """The run never makes its manifest, cams/ or a part file a link: one planted there (to the
    user's own files) is not read through."""
    shards, out = tar_run
    sent = copy_output(out, tmp_path / "sent")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if entry == "a part file":
        part = sent / "cams" / "part-shard-0001.parquet"
        shutil.move(part, elsewhere / part.name)
        part.symlink_to(elsewhere / part.name)
        assert report.main([str(sent), "--out", str(tmp_path / "page.html"), "--no-images"]) == 0
        assert re.search(r"<th>Rows</th><td>3 ", (tmp_path / "page.html").read_text())
        assert (f"{PROG}: note: not read: 1 file(s) that are not this tool's part files of this output "
                "(cams/part-shard-0001.parquet: a link or not a regular file)") in capsys.readouterr().err
        return
    shutil.move(sent / entry, elsewhere / entry)
    (sent / entry).symlink_to(elsewhere / entry)
    assert report.main([str(sent), "--no-images"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"_manifest.json": f"{sent / '_manifest.json'} is a link, not the file a run writes; the report does "
                                  "not read through it (put the manifest itself there, or remove the link)",
                "cams": f"{sent / 'cams'} does not hold gradcam-batch maps (no part file of this tool; skipped "
                        "cams/: a link, not the folder a run writes)"}[entry]
    assert err == [f"{PROG}: error: {expected}"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The built-in demo, on 24 images: its shards live in <output.dir>/demo-data."""
    out = tmp_path_factory.mktemp("demo") / "out"
    assert run_composed(f"output.dir={out}", "data.demo_images=24").images == 24
    return out


@pytest.mark.parametrize("linked", [False, True])
def test_the_demos_shards_are_read_only_from_the_folders_own_demo_data(demo_run, tmp_path, linked):
    """A demo output's shards are read from its own demo-data, wherever the folder was moved; a
    demo-data that is a link (to tars of the right names, sizes and times) is not read through."""
    sent = copy_output(demo_run, tmp_path / "sent")
    if linked:
        shutil.move(sent / "demo-data", tmp_path / "elsewhere")
        (sent / "demo-data").symlink_to(tmp_path / "elsewhere")
    result = report.build_report(sent, tmp_path / "page.html", per_gallery=3)
    if linked:
        assert result.images_shown == 0
        assert f"{sent / 'demo-data'} is a link, not the folder a run writes" in result.note
    else:
        assert result.images_shown > 0 and result.note is None  # every gallery sample, each read once
        assert result.images_from.startswith(f"1 shard file of the run's listing ({sent / 'demo-data'}/demo-")


# --- bounds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, ceiling", [("--per-gallery", "20000", 100), ("--per-gallery", "101", 100),
                                                    ("--max-classes", "1001", 1000)])
def test_options_past_their_ceiling_are_one_line(tar_run, capsys, option, value, ceiling):
    shards, out = tar_run
    with pytest.raises(SystemExit) as exit_code:
        report.main([str(out), option, value])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: argument {option}: {value} is over the ceiling of "
                                               f"{ceiling} ("), err
    assert report.parser().parse_args([str(out), option, str(ceiling)])  # the ceiling itself is allowed
    with pytest.raises(report.ReportError, match=f"give .* to {ceiling} "):
        report.build_report(out, **{option[2:].replace("-", "_"): int(value)})


# --- manifests that are not a run's ------------------------------------------------------------------------


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content, words", [
    ("", "is empty"), (" \n", "is empty"), ("[]", "it holds an array, not a JSON object"),
    ('"x"', "it holds a string, not a JSON object"), ("null", "it holds null, not a JSON object"),
    ("{not json", "cannot read"), (DEEP, "JSON nested too deeply"),
    ('{"config": {"data": 5}}', "config.data is a number, not a JSON object"),
    ('{"listing": 3}', "listing is a number, not a JSON object"),
    ('{"listing": {"shards": []}}', "listing.shards is an array, not a JSON object"),
    ('{"this_run": "fast"}', "this_run is a string, not a JSON object"),
])
def test_a_manifest_that_is_not_a_runs_is_one_line(tar_run, tmp_path, capsys, content, words):
    shards, out = tar_run
    sent = copy_output(out, tmp_path / "sent")
    (sent / "_manifest.json").write_text(content)
    assert report.main([str(sent), "--no-images"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: ") and words in err[0], err
    assert "_manifest.json" in err[0]


def test_an_oversized_manifest_is_refused_from_its_size(tar_run, tmp_path, capsys):
    shards, out = tar_run
    sent = copy_output(out, tmp_path / "sent")
    with (sent / "_manifest.json").open("r+b") as handle:
        handle.truncate(65 << 20)  # sparse: nothing is written, and nothing may be read
    assert report.main([str(sent), "--no-images"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{PROG}: error: {sent / '_manifest.json'} holds {65 << 20:,} bytes, over the 64 MiB a manifest "
                   "can take; it is not one gradcam-batch wrote"]


@pytest.mark.parametrize("field, value", [("config.cam.targets", ["a"]), ("pointing.total", "x"),
                                          ("pointing.hits", float("nan")), ("preprocessing.mean", ["a"])])
def test_values_of_other_types_in_the_manifest_do_not_break_the_page(tar_run, tmp_path, field, value):
    """Values no run writes are shown as they are, or not at all; never a traceback."""
    shards, out = tar_run
    sent = copy_output(out, tmp_path / "sent")

    def put(manifest):
        inner = manifest
        *path, last = field.split(".")
        for key in path:
            inner = inner.setdefault(key, {})
        inner[last] = value
        if field == "pointing.hits":
            inner["total"] = 4
    edit_manifest(sent, put)
    report.build_report(sent, tmp_path / "page.html", images=False)
    text = (tmp_path / "page.html").read_text()
    check_self_contained(text, Page(text))
