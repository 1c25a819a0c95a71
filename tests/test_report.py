"""gradcam-batch-report: the HTML page about an output folder (the gradcam_batch.report package)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_helpers import TINY_RESNET, run_composed
from gradcam_batch import report
from gradcam_batch.writer import CAM_SCHEMA
from sample_data import make_imagefolder, make_webdataset

REPO = Path(__file__).resolve().parents[1]
HEADINGS = ("Run summary", "Per-class statistics", "Class-mean maps", "Highest confidence", "Lowest confidence",
            "Most border-focused", "Pointing-game misses", "Errors")
ENGINES = ["pyarrow", pytest.param("duckdb", marks=pytest.mark.skipif(
    not report._duckdb_importable(), reason="duckdb not installed (pip install duckdb)"))]


# --- reading the page back -------------------------------------------------------------------------


class Page(HTMLParser):
    """Sections (by id) with their images, table rows and card ids, and every src/href."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, dict] = {}
        self.links: list[str] = []
        self.images: list[dict] = []
        self._section = None
        self._row = None
        self._cell = None
        self._headings: list[str] = []
        self._heading = None
        self.feed(text)

    @property
    def headings(self) -> list[str]:
        return self._headings

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])
        if tag == "section":
            self._section = self.sections.setdefault(attrs.get("id"), {"images": [], "rows": [], "text": []})
        elif tag == "img":
            self.images.append(attrs)
            if self._section is not None:
                self._section["images"].append(attrs)
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag in ("h1", "h2"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._section is not None:
                self._section["rows"].append(self._row)
            self._row = None
        elif tag in ("h1", "h2") and self._heading is not None:
            self._headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)
        if self._section is not None:
            self._section["text"].append(data)

    def text(self, section: str) -> str:
        return " ".join(self.sections[section]["text"])

    def card_ids(self, section: str) -> list[str]:
        return [img["alt"][len("map of "):] for img in self.sections[section]["images"] if img.get("class") == "cam"]

    def table(self, section: str) -> list[list[str]]:
        return self.sections[section]["rows"][1:]  # without the header


def decode_data_uri(uri: str) -> Image.Image:
    match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", uri)
    assert match, uri[:60]
    image = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
    assert image.format == {"png": "PNG", "jpeg": "JPEG"}[match.group(1)]
    image.load()
    return image


def check_self_contained(text: str, page: Page) -> None:
    assert "http://" not in text and "https://" not in text
    for link in page.links:  # every resource inline, every link an anchor in the page
        assert link.startswith(("data:", "#")), link[:80]
    assert not re.search(r"<(link|script|iframe|object|embed)\b", text)
    assert "url(" not in text
    for image in page.images:
        decode_data_uri(image["src"])


def class_counts(output: Path, layer: str) -> Counter:
    table = pq.read_table(output / "cams", columns=["target_class", "target_rank", "layer"]).to_pylist()
    return Counter(row["target_class"] for row in table if row["target_rank"] == 0 and row["layer"] == layer)


def leading_int(cell: str) -> int:
    return int(re.match(r"\d+", cell).group())


def run_report(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gradcam_batch.report", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# --- outputs to report on -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real run over an ImageFolder of 5 images and one undecodable file."""
    base = tmp_path_factory.mktemp("real")
    root, out = base / "data", base / "out"
    make_imagefolder(root, per_class=(3, 2))
    (root / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is no JPEG")
    summary = run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={root}", f"output.dir={out}")
    assert summary.images == 5 and summary.errors == 1
    return root, out


@pytest.fixture(scope="module")
def webdataset_run(tmp_path_factory):
    """A real run over two tar shards with top-2 targets."""
    base = tmp_path_factory.mktemp("wds")
    shards, out = base / "shards", base / "out"
    make_webdataset(shards, shards=2, per_shard=3)
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards=[{shards}/shard-0000.tar,"
                           f"{shards}/shard-0001.tar]", "cam.targets=topk", "cam.topk=2", f"output.dir={out}")
    assert summary.images == 6
    return shards, out


def write_synthetic(out: Path, sample_ids: list[str], shard: str, data: dict, *, classes: int = 6,
                    layers=(("layer3", 6), ("layer4", 4)), topk: int = 2, new_columns: bool = True,
                    files: int = 3, row_group: int | None = None, mixed_class: int | None = None,
                    boxes: bool = True, seed: int = 0, listing: dict | None = None) -> None:
    """An output folder as a run with the columns being added would write it: maps of two layers,
    top-k targets, pred_class, pointing_hit (null for some samples), border_mass, entropy, one
    part file per unit (a slice of the shard). Probs are rounded to 2 decimals, so the galleries
    meet ties. `listing`: the shards' records of the manifest's listing (None: no listing)."""
    rng = np.random.default_rng(seed)
    units = []
    (out / "cams").mkdir(parents=True)
    (out / "errors").mkdir()
    count = len(sample_ids)
    label = [None if i % 7 == 3 else int(v) for i, v in enumerate(rng.integers(0, classes, count))]
    top = rng.integers(0, classes, count)
    hit = [None if i % 5 == 0 or not boxes else bool(v) for i, v in enumerate(rng.random(count) < 0.6)]
    for part, chunk in enumerate(np.array_split(np.arange(count), files)):
        columns: dict[str, list] = {name: [] for name in (*report.REQUIRED_COLUMNS, "score", "cam_mean", "peak_y",
                                                          "peak_x", "pred_class", "pointing_hit", "border_mass",
                                                          "entropy")}
        for layer, size in layers:
            for i in chunk.tolist():
                for rank in range(topk):
                    side = 5 if (mixed_class is not None and rank == 0 and layer == layers[-1][0]
                                 and top[i] == mixed_class and i == np.nonzero(top == mixed_class)[0][0]) else size
                    cam = rng.random(side * side).astype(np.float32)
                    row = dict(sample_id=sample_ids[i], shard=shard, label=label[i],
                               target_class=int((top[i] + rank) % classes), target_rank=rank,
                               prob=round(float(rng.random()) * (0.5 if rank else 1.0), 2), cam=cam.tolist(),
                               cam_height=side, cam_width=side, layer=layer, score=1.0, cam_mean=float(cam.mean()),
                               peak_y=0, peak_x=0, pred_class=int(top[i]), pointing_hit=hit[i],
                               border_mass=round(float(rng.random()), 2), entropy=float(rng.random()))
                    for name, value in row.items():
                        columns[name].append(value)
        types = {"label": pa.int64(), "target_class": pa.int64(), "target_rank": pa.int32(), "prob": pa.float32(),
                 "cam": pa.list_(pa.float32()), "cam_height": pa.int32(), "cam_width": pa.int32(),
                 "score": pa.float32(), "cam_mean": pa.float32(), "peak_y": pa.int32(), "peak_x": pa.int32(),
                 "pred_class": pa.int64(), "pointing_hit": pa.bool_(), "border_mass": pa.float32(),
                 "entropy": pa.float32()}
        if not new_columns:
            for name in ("pred_class", "pointing_hit", "border_mass", "entropy"):
                del columns[name]
        table = pa.table({name: pa.array(values, types.get(name, pa.string())) for name, values in columns.items()})
        table = table.replace_schema_metadata({b"gradcam_batch": json.dumps({"model": "synthetic-net"}).encode()})
        unit = f"{shard}@{chunk[0]:08d}-{chunk[-1] + 1:08d}"
        units.append(unit)
        pq.write_table(table, out / "cams" / f"part-{unit}.parquet", row_group_size=row_group)
    manifest = {"status": "complete", "model": "synthetic-net", "target_layer": ",".join(n for n, _ in layers),
                "method": "gradcam", "config": {"data": data, "model": {"source": "torchvision", "name": "resnet18"},
                                                "cam": {"method": "gradcam", "targets": "topk", "topk": topk,
                                                        "normalize": True}},
                "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                  "interpolation": "bilinear"},
                "this_run": {"images": count, "rows": count * topk * len(layers), "errors": 0, "seconds": 1.5,
                             "images_per_second": count / 1.5, "steady_images_per_second": None}}
    if listing is not None:
        manifest["listing"] = {"shards": listing, "units": {unit: {"shard": shard} for unit in units}}
    (out / "_manifest.json").write_text(json.dumps(manifest))


def imagefolder_listing(root: Path, shard_size: int = 1000) -> dict:
    """The listing's shard records a run over the ImageFolder at `root` writes."""
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.shards import list_shards

    return {shard.shard_id: shard.source()
            for shard in list_shards(DataConfig(format="imagefolder", root=str(root), shard_size=shard_size))}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """24 images in an ImageFolder (resize 32, crop 32) and a synthetic output about them."""
    base = tmp_path_factory.mktemp("synthetic")
    root, out = base / "data", base / "out"
    samples = make_imagefolder(root, per_class=(4,) * 6)
    data = {"format": "imagefolder", "root": str(root), "resize": None, "crop": None, "shard_size": 1000}
    write_synthetic(out, [path for path, _ in samples], "imagefolder-00000", data, mixed_class=2,
                    listing=imagefolder_listing(root))
    return root, out


def rank0(output: Path, layer: str) -> list[dict]:
    rows = pq.read_table(output / "cams").drop_columns(["cam"]).to_pylist()
    return [row for row in rows if row["target_rank"] == 0 and row["layer"] == layer]


# --- a real run -----------------------------------------------------------------------------------------


def test_report_of_a_real_run(real_run, tmp_path, capsys):
    root, out = real_run
    target = tmp_path / "page.html"
    assert report.main([str(out), "--out", str(target)]) == 0
    assert "5 images from the dataset" in capsys.readouterr().out
    text = target.read_text()
    page = Page(text)
    for heading in HEADINGS:
        assert heading in page.headings
    check_self_contained(text, page)
    # the table's counts are the Parquet's
    expected = class_counts(out, "layer4")
    table = page.table("classes")
    assert {leading_int(row[0]): int(row[1].replace(",", "")) for row in table} == dict(expected)
    # galleries: 5 images, so 5 cards in each of the two confidence galleries; the other two
    # need columns that runs write from now on (border_mass; pointing_hit, null without boxes)
    rows = rank0(out, "layer4")
    assert len(page.card_ids("gallery-high")) == len(page.card_ids("gallery-low")) == 5
    assert page.card_ids("gallery-high") == [r["sample_id"] for r in sorted(rows, key=lambda r: (-r["prob"],
                                                                                                r["sample_id"]))]
    assert page.card_ids("gallery-low") == [r["sample_id"] for r in sorted(rows, key=lambda r: (r["prob"],
                                                                                               r["sample_id"]))]
    bordered = sorted((r for r in rows if r.get("border_mass") is not None),
                      key=lambda r: (-r["border_mass"], r["sample_id"]))
    assert page.card_ids("gallery-border") == [r["sample_id"] for r in bordered]
    if not bordered:
        assert "Not available" in page.text("gallery-border")
    misses = sorted((r for r in rows if r.get("pointing_hit") is False), key=lambda r: (-r["prob"], r["sample_id"]))
    assert page.card_ids("gallery-misses") == [r["sample_id"] for r in misses]
    assert not misses and "Not available" in page.text("gallery-misses")  # ImageFolder images have no boxes
    # the cards are the crop-sized images with their maps over them
    for image in page.sections["gallery-high"]["images"]:
        assert decode_data_uri(image["src"]).size == (64, 64)
    assert "Images:" not in text  # every image was read back
    # the undecodable file is in the errors table
    errors = page.table("errors")
    assert [row[0] for row in errors] == ["c1/broken.jpg"]
    assert errors[0][1] == "imagefolder-00000" and errors[0][3] == "CorruptImage"
    # the run summary
    summary = page.text("summary")
    for words in ("resnet18", "layer4", "gradcam", "pred (the top-1 prediction)", "resize 64", "center crop 64"):
        assert words in summary


def test_overlays_are_the_images_the_run_saw(real_run):
    """A card's picture is the run's center crop of the image file, and its map is stretched
    over it the way torch upsamples bilinearly."""
    import torch

    from gradcam_batch.data.transforms import decode_resize_crop

    root, out = real_run
    source = report.open_output(out)
    rows = rank0(out, "layer4")
    wanted = {(row["shard"], row["sample_id"]) for row in rows}
    scan = report.scan_maps(source, "layer4", [], wanted)
    images = report.read_images(source.manifest, out, wanted)
    assert images.note is None and set(images.pictures) == wanted
    assert images.class_names == {0: "c0", 1: "c1"}
    for shard, sample_id in wanted:
        picture, _ = decode_resize_crop((root / sample_id).read_bytes(), 64, 64)
        assert np.array_equal(images.pictures[(shard, sample_id)], picture.permute(1, 2, 0).numpy())
        table = pq.read_table(out / "cams").to_pylist()
        cam = next(np.asarray(r["cam"]).reshape(r["cam_height"], r["cam_width"]) for r in table
                   if r["sample_id"] == sample_id and r["target_rank"] == 0)
        assert np.allclose(scan.maps[(shard, sample_id)], cam)
        # the map is stretched over the crop as torch's bilinear upsampling does it
        expected = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None].double(), size=(64, 64),
                                                   mode="bilinear", align_corners=False)[0, 0].numpy()
        assert np.allclose(report.upsample(cam, 64, 64), expected)
        blended = report.overlay(images.pictures[(shard, sample_id)], cam)
        assert blended.shape == (64, 64, 3) and blended.dtype == np.uint8


def test_overlay_colours_the_map_and_outlines_the_box():
    picture = np.full((64, 64, 3), 100, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0  # the peak in the top-left cell
    blended = report.overlay(picture, cam, box=[0.25, 0.5, 0.75, 1.0])
    assert blended[2, 2, 0] > blended[40, 10, 0] and blended[40, 10, 2] > blended[2, 2, 2]  # red peak, blue rest
    outline = np.zeros((64, 64), bool)
    outline[32, 16:49] = outline[63, 16:49] = outline[32:64, 16] = outline[32:64, 48] = True
    assert (blended[outline] == 255).all()
    assert not (blended[~outline] == 255).all(axis=-1).any()
    assert report.colormap(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]


def test_webdataset_topk_run_reads_images_from_the_tars(webdataset_run, tmp_path):
    shards, out = webdataset_run
    result = report.build_report(out, tmp_path / "r.html", per_gallery=4)
    assert result.images_shown == 6  # the 4 most and 4 least confident of 6 images: all 6
    assert result.note is None
    page = Page((tmp_path / "r.html").read_text())
    assert len(page.card_ids("gallery-high")) == len(page.card_ids("gallery-low")) == 4
    # rank-1 rows are not counted: one class row per image
    assert sum(int(row[1]) for row in page.table("classes")) == 6
    assert dict(class_counts(out, "layer4")) == {leading_int(r[0]): int(r[1]) for r in page.table("classes")}
    assert "topk (k = 2)" in page.text("summary")


def test_a_moved_dataset_gives_maps_alone_and_one_line_why(real_run, tmp_path):
    root, out = real_run
    moved_out = tmp_path / "out"
    shutil.copytree(out, moved_out)
    manifest = json.loads((moved_out / "_manifest.json").read_text())
    manifest["config"]["data"]["root"] = str(tmp_path / "gone")
    (moved_out / "_manifest.json").write_text(json.dumps(manifest))
    result = report.build_report(moved_out)
    assert result.images_shown == 0
    text = (moved_out / "report.html").read_text()
    page = Page(text)
    assert len(page.card_ids("gallery-high")) == 5
    warnings = re.findall(r'<p class="warn">(.*?)</p>', text)
    assert len(warnings) == 1 and "cannot be read any more" in warnings[0] and "gone" in warnings[0]
    check_self_contained(text, page)


# --- synthetic outputs with the columns being added -----------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_new_columns_feed_the_table_and_the_galleries(synthetic, tmp_path, engine):
    root, out = synthetic
    target = tmp_path / "r.html"
    result = report.build_report(out, target, per_gallery=5, engine=engine)
    text = target.read_text()
    page = Page(text)
    check_self_contained(text, page)
    assert ("DuckDB" if engine == "duckdb" else "pyarrow") in text
    rows = rank0(out, "layer4")  # the manifest's target_layer "layer3,layer4": the run summary's is the last
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["target_class"], []).append(row)
    table = {leading_int(cells[0]): cells for cells in page.table("classes")}
    assert set(table) == set(by_class)
    for target_class, members in by_class.items():
        cells = table[target_class]
        labeled = [r for r in members if r["label"] is not None]
        correct = sum(r["pred_class"] == r["label"] for r in labeled)
        known = [r for r in members if r["pointing_hit"] is not None]
        assert int(cells[1]) == len(members)
        assert cells[2] == (f"{correct / len(labeled):.3f} ({correct}/{len(labeled)})" if labeled else "-")
        assert cells[3] == f"{np.mean([r['prob'] for r in members]):.3f}"
        hits = sum(r["pointing_hit"] for r in known)
        assert cells[4] == (f"{hits / len(known):.3f} ({hits}/{len(known)})" if known else "-")
        assert cells[5] == f"{np.mean([r['border_mass'] for r in members]):.3f}"
        assert cells[6] == f"{np.mean([r['entropy'] for r in members]):.3f}"

    def order(key, candidates):
        return [r["sample_id"] for r in sorted(candidates, key=key)][:5]

    assert page.card_ids("gallery-high") == order(lambda r: (-r["prob"], r["shard"], r["sample_id"]), rows)
    assert page.card_ids("gallery-low") == order(lambda r: (r["prob"], r["shard"], r["sample_id"]), rows)
    assert page.card_ids("gallery-border") == order(lambda r: (-r["border_mass"], r["shard"], r["sample_id"]), rows)
    misses = [r for r in rows if r["pointing_hit"] is False]
    assert page.card_ids("gallery-misses") == order(lambda r: (-r["prob"], r["shard"], r["sample_id"]), misses)
    cards = sum(len(page.card_ids(f"gallery-{key}")) for key in ("high", "low", "border", "misses"))
    assert cards == result.gallery_cards == 15 + min(5, len(misses))
    # images from the ImageFolder, at the manifest's crop (data.crop was null: preprocessing)
    shown = {card for key in ("high", "low", "border", "misses") for card in page.card_ids(f"gallery-{key}")}
    # the synthetic rows record no image_digest, as output of older versions: the page says so
    assert result.images_shown == len(shown) and "could not be verified" in result.note
    assert decode_data_uri(page.sections["gallery-high"]["images"][0]["src"]).size == (32, 32)
    # the legend, then one per class but class 2, whose maps of this layer have two sizes
    assert len(page.sections["means"]["images"]) == 1 + len(by_class) - 1


@pytest.mark.skipif(not report._duckdb_importable(), reason="duckdb not installed (pip install duckdb)")
def test_both_engines_agree(synthetic):
    root, out = synthetic
    source = report.open_output(out)
    for layer in ("layer3", "layer4"):
        arrow = report.overview_arrow(source, layer, 6)
        duck = report.overview_duckdb(source, layer, 6)
        assert arrow.layer_rows == duck.layer_rows == {"layer3": 48, "layer4": 48}
        assert set(arrow.classes) == set(duck.classes)
        for target_class, stats in arrow.classes.items():
            other = duck.classes[target_class]
            for name in ("count", "labeled", "correct", "hit_known", "hits", "border_n", "entropy_n"):
                assert getattr(stats, name) == getattr(other, name), name
            for name in ("prob_sum", "border_sum", "entropy_sum"):
                assert getattr(stats, name) == pytest.approx(getattr(other, name), rel=1e-6), name
        for key in arrow.galleries:
            assert [(r["shard"], r["sample_id"]) for r in arrow.galleries[key]] == \
                   [(r["shard"], r["sample_id"]) for r in duck.galleries[key]], key


def test_class_means_are_the_means_of_the_rank0_maps(synthetic, tmp_path):
    root, out = synthetic
    source = report.open_output(out)
    table = pq.read_table(out / "cams").to_pylist()
    maps: dict[int, list[np.ndarray]] = {}
    for row in table:
        if row["target_rank"] == 0 and row["layer"] == "layer4":
            maps.setdefault(row["target_class"], []).append(np.asarray(row["cam"], np.float64))
    scan = report.scan_maps(source, "layer4", sorted(maps), set())
    assert scan.mixed == [2]  # one of class 2's maps is 5x5, the others 4x4
    assert set(scan.means) == set(maps) - {2}
    for target_class, mean in scan.means.items():
        assert mean.shape == (4, 4)
        assert np.allclose(mean.reshape(-1), np.mean(maps[target_class], axis=0))
    page = tmp_path / "r.html"
    report.build_report(out, page, layer="layer4", images=False)
    assert "Skipped (maps of several sizes): 2." in Page(page.read_text()).text("means")


def test_options_layer_per_gallery_and_max_classes(synthetic, tmp_path):
    root, out = synthetic
    target = tmp_path / "r.html"
    assert report.main([str(out), "--out", str(target), "--layer", "layer4", "--per-gallery", "2",
                        "--max-classes", "3", "--no-images"]) == 0
    page = Page(target.read_text())
    counts = class_counts(out, "layer4")
    most = sorted(counts, key=lambda c: (-counts[c], c))[:3]
    assert [leading_int(row[0]) for row in page.table("classes")] == most
    assert "3 most frequent of 6" in page.text("classes")
    assert [img.get("class") for img in page.sections["means"]["images"]].count("mean") == len(
        [c for c in most if c != 2])
    for key in ("high", "low", "border", "misses"):
        assert len(page.card_ids(f"gallery-{key}")) == 2
    assert "not read (--no-images)" in target.read_text()
    assert report.main([str(out), "--out", str(target), "--per-gallery", "0"]) == 0
    page = Page(target.read_text())
    assert not [img for img in page.images if img.get("class") == "cam"]
    assert "Galleries are off" in page.text("gallery-high")


def test_an_output_without_the_new_columns_still_reports(tmp_path):
    out = tmp_path / "out"
    ids = [f"k{i:03d}" for i in range(12)]
    data = {"format": "webdataset", "shards": str(tmp_path / "gone" / "*.tar")}
    write_synthetic(out, ids, "shard-0000", data, new_columns=False, layers=(("layer4", 3),), topk=1)
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["config"]["cam"]["targets"] = "label"  # no prediction known: no accuracy
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert report.main([str(out)]) == 0
    text = (out / "report.html").read_text()
    page = Page(text)
    check_self_contained(text, page)
    assert all(row[2] == "-" for row in page.table("classes"))
    assert len(page.table("classes")[0]) == 4  # class, count, accuracy, mean prob
    assert "Not in this output (no column, or no values): pointing_hit, border_mass, entropy" in page.text("classes")
    assert len(page.card_ids("gallery-high")) == 8
    warnings = re.findall(r'<p class="warn">(.*?)</p>', text)
    assert len(warnings) == 1 and "the manifest holds no listing of the run" in warnings[0]  # nothing to check against


@pytest.mark.parametrize("engine", ENGINES)
def test_a_column_without_values_is_not_available(tmp_path, engine):
    """Runs write pointing_hit for every row, null where the sample has no box: without any box
    there is no hit rate and no misses gallery."""
    out = tmp_path / "out"
    data = {"format": "webdataset", "shards": str(tmp_path / "gone" / "*.tar")}
    write_synthetic(out, [f"k{i:03d}" for i in range(10)], "shard-0000", data, layers=(("layer4", 3),),
                    topk=1, boxes=False)
    report.build_report(out, engine=engine, images=False)
    page = Page((out / "report.html").read_text())
    assert "pointing hit rate" not in page.sections["classes"]["rows"][0]
    assert "mean border_mass" in page.sections["classes"]["rows"][0]
    assert "no row of this output has a pointing_hit value (the samples have no boxes)" in page.text("gallery-misses")
    assert len(page.card_ids("gallery-border")) == 8


def test_without_duckdb_the_pyarrow_engine_is_used(synthetic, tmp_path, monkeypatch):
    root, out = synthetic
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb raises ImportError
    assert not report._duckdb_importable()
    report.build_report(out, tmp_path / "r.html", images=False)
    assert f"pyarrow {pa.__version__}" in (tmp_path / "r.html").read_text()


# --- the columns runs write now: box metrics, faithfulness, stored heatmaps ------------------------------


def write_schema_output(out: Path, rows: list[dict], data: dict, files: int = 2) -> None:
    """An output folder of `rows` (dicts; absent columns null) in the writer's CAM_SCHEMA."""
    (out / "cams").mkdir(parents=True)
    (out / "errors").mkdir()
    schema = CAM_SCHEMA.with_metadata({b"gradcam_batch": json.dumps({"model": "schema-net"}).encode()})
    for part in range(files):
        table = pa.Table.from_pylist(rows[part::files], schema=schema)
        pq.write_table(table, out / "cams" / f"part-shard-0000@{part:08d}-{part + 1:08d}.parquet", row_group_size=7)
    manifest = {"status": "complete", "model": "schema-net", "method": "gradcam",
                "config": {"data": data, "cam": {"targets": "topk", "topk": 2}},
                "preprocessing": {"resize": 32, "crop": 32}}
    (out / "_manifest.json").write_text(json.dumps(manifest))


def schema_row(sample_id: str, target_class: int, rank: int, layer: str, prob: float, **extra) -> dict:
    cam = [float(v) for v in np.linspace(0, 1, 9) * (1 + target_class)]
    return dict(sample_id=sample_id, shard="shard-0000", label=target_class, target_class=target_class,
                target_rank=rank, prob=prob, cam=cam, cam_height=3, cam_width=3, layer=layer, **extra)


def gone_data(tmp_path: Path) -> dict:
    return {"format": "webdataset", "shards": str(tmp_path / "gone" / "*.tar")}


@pytest.mark.parametrize("engine", ENGINES)
def test_box_metrics_and_confidence_change_means_in_the_class_table(tmp_path, engine):
    """Mean box_energy, box_iou and confidence_change per class, over the rank-0 rows of the layer
    that hold a value (null rows skipped; a class without values shows "-")."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(40):
        target_class = i % 4
        values = {name: float(rng.integers(-64, 65) / 64) for name in ("box_energy", "box_iou", "confidence_change")}
        if i % 3 == 0:
            values["box_energy"] = values["box_iou"] = None  # a sample without boxes
        if target_class == 3:
            values["confidence_change"] = None  # a class without any value
        rows.append(schema_row(f"s{i:02d}", target_class, 0, "layer4", 0.5, **values))
        # rank-1 rows and another layer's rows must not count
        rows.append(schema_row(f"s{i:02d}", (target_class + 1) % 4, 1, "layer4", 0.25, box_energy=9.0, box_iou=9.0,
                               confidence_change=9.0))
        rows.append(schema_row(f"s{i:02d}", target_class, 0, "layer3", 0.5, box_energy=-9.0, box_iou=-9.0,
                               confidence_change=-9.0))
    out = tmp_path / "out"
    write_schema_output(out, rows, gone_data(tmp_path))
    report.build_report(out, layer="layer4", engine=engine, images=False)
    text = (out / "report.html").read_text()
    page = Page(text)
    header = page.sections["classes"]["rows"][0]
    names = ("box_energy", "box_iou", "confidence_change")
    assert header[-3:] == [f"mean {name}" for name in names]
    table = {leading_int(cells[0]): cells for cells in page.table("classes")}
    assert set(table) == {0, 1, 2, 3}
    for target_class, cells in table.items():
        members = [r for r in rows if r["layer"] == "layer4" and r["target_rank"] == 0
                   and r["target_class"] == target_class]
        for name, cell in zip(names, cells[-3:]):
            values = [r[name] for r in members if r[name] is not None]
            assert cell == (f"{sum(values) / len(values):.3f}" if values else "-"), (target_class, name)
    assert table[3][-1] == "-"
    lead = html.unescape(re.search(r'<section id="classes">.*?<p class="lead">(.*?)</p>', text).group(1))
    assert "box_energy: the share of the map's energy inside the object boxes" in lead
    assert lead.endswith("Not in this output (no column, or no values): pointing_hit, border_mass, entropy.")


@pytest.mark.parametrize("engine", ENGINES)
def test_null_box_metrics_and_confidence_change_are_not_shown(tmp_path, engine):
    """The columns are there (the writer writes every column) but null: no column in the table,
    the lead names them, and nothing fails."""
    rows = [schema_row(f"s{i:02d}", i % 3, 0, "layer4", 0.5 + i / 100) for i in range(12)]
    out = tmp_path / "out"
    write_schema_output(out, rows, gone_data(tmp_path))
    assert pq.read_schema(next((out / "cams").iterdir())).names == CAM_SCHEMA.names
    report.build_report(out, engine=engine, images=False)
    page = Page((out / "report.html").read_text())
    assert page.sections["classes"]["rows"][0] == ["class", "count", "accuracy", "mean prob"]
    assert ("Not in this output (no column, or no values): pointing_hit, border_mass, entropy, box_energy, "
            "box_iou, confidence_change.") in page.text("classes")
    assert len(page.card_ids("gallery-high")) == 8


def solid_png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_of(index: int) -> tuple[int, int, int]:
    return (20 + 9 * index, 230 - 7 * index, 60 + 5 * index)


def card_colours(page: Page, section: str) -> dict[str, np.ndarray]:
    return {img["alt"][len("map of "):]: np.asarray(decode_data_uri(img["src"]).convert("RGB"), np.float64)
            for img in page.sections[section]["images"] if img.get("class") == "cam"}


def test_stored_heatmaps_are_shown_without_the_dataset(tmp_path, monkeypatch, capsys):
    """Rows with a heatmap_png: their cards show that picture (the rank-0 row's of the reported
    layer), and the dataset, gone since the run, is not read at all."""
    rows = []
    for i in range(10):
        rows.append(schema_row(f"s{i:02d}", i % 3, 0, "layer4", round(0.05 + i / 20, 2),
                               heatmap_png=solid_png(colour_of(i))))
        rows.append(schema_row(f"s{i:02d}", (i + 1) % 3, 1, "layer4", 0.01, heatmap_png=solid_png((0, 0, 0))))
        rows.append(schema_row(f"s{i:02d}", i % 3, 0, "layer3", 0.5, heatmap_png=solid_png((255, 255, 255))))
    out = tmp_path / "out"
    write_schema_output(out, rows, gone_data(tmp_path))

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr("gradcam_batch.report.build.read_images", no_dataset)
    for images in (True, False):
        result = report.build_report(out, tmp_path / "r.html", per_gallery=4, layer="layer4", images=images)
        text = (tmp_path / "r.html").read_text()
        page = Page(text)
        check_self_contained(text, page)
        high = [f"s{i:02d}" for i in (9, 8, 7, 6)]
        low = [f"s{i:02d}" for i in (0, 1, 2, 3)]
        assert page.card_ids("gallery-high") == high and page.card_ids("gallery-low") == low
        assert result.images_shown == 0 and result.heatmaps_shown == 8
        for section in ("gallery-high", "gallery-low"):
            for sample_id, pixels in card_colours(page, section).items():
                assert pixels.shape == (32, 32, 3)
                expected = np.array(colour_of(int(sample_id[1:])), np.float64)
                assert np.abs(pixels - expected).max() <= 4, (sample_id, pixels.mean(axis=(0, 1)), expected)
        assert text.count('<figure class="stored">') == 8
        assert "heatmap_png show the picture the run stored" in text
        if images:
            assert result.note is None and '<p class="warn">' not in text
    assert report.main([str(out), "--layer", "layer4", "--per-gallery", "4"]) == 0
    assert "0 images from the dataset, 8 stored heatmaps" in capsys.readouterr().out


def test_rows_without_a_readable_heatmap_fall_back_to_the_map(tmp_path):
    """Null or undecodable heatmap_png: that card draws the map itself (over the dataset's image
    when readable; here the dataset is gone, so the map alone, with the page's one-line why)."""
    rows = []
    for i in range(6):
        png = solid_png(colour_of(i)) if i % 3 == 0 else (b"\x89PNG not really" if i % 3 == 1 else None)
        rows.append(schema_row(f"s{i:02d}", i % 2, 0, "layer4", round(0.1 + i / 10, 2), heatmap_png=png))
    out = tmp_path / "out"
    write_schema_output(out, rows, gone_data(tmp_path))
    result = report.build_report(out, per_gallery=6)
    text = (out / "report.html").read_text()
    page = Page(text)
    check_self_contained(text, page)
    assert result.heatmaps_shown == 2 and result.images_shown == 0
    assert text.count('<figure class="stored">') == 2 * 2  # s00 and s03, in the high and the low gallery
    colours = card_colours(page, "gallery-high")
    assert set(colours) == {f"s{i:02d}" for i in range(6)}
    for i in (0, 3):
        assert np.abs(colours[f"s{i:02d}"] - np.array(colour_of(i))).max() <= 4
    for i in (1, 2, 4, 5):  # the map alone: the colour scale over the crop, not one solid colour
        assert colours[f"s{i:02d}"].std(axis=(0, 1)).max() > 20
    warnings = re.findall(r'<p class="warn">(.*?)</p>', text)
    assert len(warnings) == 1 and "the manifest holds no listing of the run" in warnings[0]  # nothing to check against


def test_a_run_with_heatmap_png_and_faithfulness(tmp_path):
    """A real run storing heatmap_png and confidence_change: the cards are the run's own PNGs,
    the table holds the mean confidence_change, and the images are not read back."""
    root, out = tmp_path / "data", tmp_path / "out"
    make_imagefolder(root, per_class=(3, 2))
    summary = run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={root}", f"output.dir={out}",
                           "output.heatmap_png=true", "metrics.faithfulness=true")
    assert summary.images == 5
    result = report.build_report(out, per_gallery=5)
    assert result.heatmaps_shown == 5 and result.images_shown == 0 and result.note is None
    text = (out / "report.html").read_text()
    page = Page(text)
    check_self_contained(text, page)
    rows = [row for row in pq.read_table(out / "cams").to_pylist() if row["target_rank"] == 0]
    stored = {row["sample_id"]: np.asarray(Image.open(io.BytesIO(row["heatmap_png"])).convert("RGB"), np.float64)
              for row in rows}
    cards = card_colours(page, "gallery-high")
    assert set(cards) == set(stored)
    def blocks(pixels):  # 8x8 block means: what a JPEG keeps of a noise image
        return pixels.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    for sample_id, pixels in cards.items():
        assert pixels.shape == stored[sample_id].shape == (64, 64, 3)
        assert np.abs(blocks(pixels) - blocks(stored[sample_id])).max() < 8, sample_id
        match = {other: np.corrcoef(pixels.ravel(), picture.ravel())[0, 1] for other, picture in stored.items()}
        assert match[sample_id] > 0.95 and max(match, key=match.get) == sample_id, (sample_id, match)
    table = {leading_int(cells[0]): cells for cells in page.table("classes")}
    header = page.sections["classes"]["rows"][0]
    column = header.index("mean confidence_change")
    for target_class, cells in table.items():
        values = [np.float64(r["confidence_change"]) for r in rows if r["target_class"] == target_class]
        assert cells[column] == f"{np.mean(values):.3f}"


# --- scale: the maps are streamed ------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import sys
    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import pyarrow.dataset as ds
    import gradcam_batch.data.transforms  # torch: imported before the baseline, as a report may import it
    from gradcam_batch import report
    if report._duckdb_importable():
        import duckdb
    out, mode = sys.argv[1], sys.argv[2]
    before = peak_mb()
    if mode == "load-all":
        table = ds.dataset(out + "/cams").to_table()
    else:
        result = report.build_report(out, engine=mode)
        assert result.classes == 50, result
    print(peak_mb() - before)
""")


def peak_growth_mb(out: Path, mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(out), mode], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def write_big_output(out: Path, files: int, rows_per_file: int = 2_500, side: int = 48) -> None:
    """Part files of rank-0 rows over 80 classes, 256-row row groups (a run writes one per batch)."""
    (out / "cams").mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.random((64, side * side), dtype=np.float32)
    for part in range(files):
        n = rows_per_file
        pick = rng.integers(0, len(base), n)
        offsets = np.arange(n + 1, dtype=np.int32) * side * side
        table = pa.table({
            "sample_id": pa.array([f"s{part}-{i}" for i in range(n)]), "shard": pa.array([f"shard{part}"] * n),
            "label": pa.array(rng.integers(0, 80, n)), "target_class": pa.array(pick % 80, pa.int64()),
            "target_rank": pa.array(np.zeros(n, np.int32)), "prob": pa.array(rng.random(n, dtype=np.float32)),
            "cam": pa.ListArray.from_arrays(pa.array(offsets), pa.array(base[pick].reshape(-1))),
            "cam_height": pa.array(np.full(n, side, np.int32)), "cam_width": pa.array(np.full(n, side, np.int32)),
            "layer": pa.array(["layer4"] * n)})
        table = table.replace_schema_metadata({b"gradcam_batch": b'{"model": "big"}'})
        pq.write_table(table, out / "cams" / f"part-shard{part}.parquet", row_group_size=256)
    manifest = {"status": "complete", "model": "big", "method": "gradcam",
                "config": {"data": {"format": "webdataset", "shards": str(out / "gone" / "*.tar")},
                           "cam": {"targets": "pred"}},
                "preprocessing": {"resize": 256, "crop": 224}}
    (out / "_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)")
def test_20000_rows_report_in_bounded_memory(tmp_path):
    """20,000 rows of 48x48 maps (176 MiB of floats) in 8 part files: the report's peak memory
    (VmHWM, in a fresh process, over the imports) is what it is for 5,000 rows in 2 files of the
    same size, and a fraction of what loading the maps takes (about 460 MB; the report's peak
    is mostly the Parquet reader's and the allocator's fixed cost, about 60 MB)."""
    small, big = tmp_path / "small", tmp_path / "big"
    write_big_output(small, files=2)
    write_big_output(big, files=8)
    from concurrent.futures import ThreadPoolExecutor

    cam_mb = 20_000 * 48 * 48 * 4 / 2**20
    engines = ["pyarrow"] + (["duckdb"] if report._duckdb_importable() else [])
    probes = [(big, "load-all")] + [(out, engine) for engine in engines for out in (small, big)]
    with ThreadPoolExecutor(2) as pool:  # each probe is a process of its own; its peak is its own
        growth = dict(zip(probes, pool.map(lambda probe: peak_growth_mb(*probe), probes)))
    loaded = growth[(big, "load-all")]
    assert loaded > 0.9 * cam_mb  # the probe sees a load of the maps
    for engine in engines:
        growth_small, growth_big = growth[(small, engine)], growth[(big, engine)]
        assert growth_big < growth_small + 0.1 * cam_mb, (engine, growth_small, growth_big)
        assert growth_big < 0.35 * loaded, (engine, growth_big, loaded)
    page = Page((big / "report.html").read_text())
    counts = class_counts(big, "layer4")
    assert sum(counts.values()) == 20_000
    shown = {leading_int(row[0]): int(row[1].replace(",", "")) for row in page.table("classes")}
    assert shown == {c: counts[c] for c in sorted(counts, key=lambda c: (-counts[c], c))[:50]}
    assert len(page.card_ids("gallery-high")) == 8
    assert "Rows</th><td>20,000" in (big / "report.html").read_text()


# --- bad input --------------------------------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradcam-batch-report: error: ") and words in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_bad_folders_are_one_line_exit_2(tmp_path, synthetic):
    (tmp_path / "empty").mkdir()
    one_line_error(run_report(str(tmp_path / "empty")), "is not a gradcam-batch output folder")
    one_line_error(run_report(str(tmp_path / "missing")), "does not exist")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(run_report(str(tmp_path / "file.txt")), "is not a directory")
    # a manifest and no rows: a run that has written nothing yet, or whose samples all failed
    norows = tmp_path / "norows"
    (norows / "cams").mkdir(parents=True)
    (norows / "errors").mkdir()
    (norows / "_manifest.json").write_text(json.dumps({"status": "running"}))
    one_line_error(run_report(str(norows)), "holds no maps")
    pq.write_table(pa.table({name: ["x"] for name in report.ERROR_COLUMNS}), norows / "errors" / "part-a.parquet")
    one_line_error(run_report(str(norows)), "holds no maps")
    # part files that are not this tool's
    foreign = tmp_path / "foreign"
    (foreign / "cams").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1, 2]}), foreign / "cams" / "x.parquet")
    one_line_error(run_report(str(foreign)), "does not hold gradcam-batch maps")
    (foreign / "cams" / "part-x.parquet").write_bytes(b"not parquet at all")
    one_line_error(run_report(str(foreign)), "cannot read")
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "_manifest.json").write_text("{}")
    one_line_error(run_report(str(sweep)), f"holds the output folders of a sweep, not one output; pass one of "
                                           f"them (e.g. {sweep / '0'})")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "_manifest.json").write_text("{not json")
    one_line_error(run_report(str(tmp_path / "badjson")), "cannot read")
    # bad options
    root, out = synthetic
    one_line_error(run_report(str(out), "--layer", "layer9", "--no-images"), "'layer9' is not a layer")
    one_line_error(run_report(str(out), "--per-gallery", "-1"), "less than 0")
    one_line_error(run_report(str(out), "--out", str(tmp_path / "no" / "r.html"), "--no-images"), "does not exist")


# --- the page in a browser ---------------------------------------------------------------------------------

CHECK_SCRIPT = ("<script>addEventListener('load', function () { var images = Array.from(document.images);"
                "document.body.setAttribute('data-images', images.length);"
                "document.body.setAttribute('data-broken', images.filter(function (i) {"
                " return !(i.complete && i.naturalWidth > 0); }).length); });</script>")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def chromium():
    """Chromium's path; requested before the output fixtures, so a missing browser skips at once."""
    found = find_chromium()
    if found is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return found


def browse(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={profile}", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def images_loaded(page: Path, profile: Path) -> tuple[int, int]:
    """(images in the page, images that did not load) as Chromium sees them after the load event."""
    checked = page.with_name(f"checked-{page.name}")
    checked.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    result = browse(checked, profile, "--virtual-time-budget=10000", "--dump-dom")
    body = re.search(r"<body[^>]*>", result.stdout)
    assert body, result.stderr[-2000:]
    images = re.search(r'data-images="(\d+)"', body.group())
    broken = re.search(r'data-broken="(\d+)"', body.group())
    assert images and broken, f"the check script did not run: {body.group()}"
    return int(images.group(1)), int(broken.group(1))


@pytest.mark.slow
def test_the_page_renders_in_chromium_with_every_image(chromium, real_run, tmp_path):
    root, out = real_run
    page = tmp_path / "report.html"
    assert report.main([str(out), "--out", str(page)]) == 0
    expected = len(Page(page.read_text()).images)
    shot = tmp_path / "shot.png"
    result = browse(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert images_loaded(page, tmp_path / "profile") == (expected, 0)
    # the check notices a picture that does not decode
    broken = tmp_path / "broken.html"
    text = page.read_text()
    first = re.search(r'class="cam" alt="[^"]*" src="(data:image/jpeg;base64,[^"]+)"', text).group(1)
    broken.write_text(text.replace(first, "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAA==", 1))
    assert images_loaded(broken, tmp_path / "profile") == (expected, 1)


def test_engines_agree_when_an_all_zero_map_has_no_statistics(tmp_path):
    """An all-zero map has no border mass or entropy (the writer stores null, never NaN): both
    engines leave it out of the means."""
    pytest.importorskip("duckdb")
    from gradcam_batch.report import overview_arrow, overview_duckdb, open_output

    out = tmp_path / "out"
    (out / "cams").mkdir(parents=True)
    rows = 4
    columns = {field.name: pa.nulls(rows, field.type) for field in CAM_SCHEMA}
    columns.update({
        "sample_id": pa.array([f"s{i}" for i in range(rows)]), "shard": pa.array(["a"] * rows),
        "target_class": pa.array([1, 1, 2, 2], pa.int64()), "target_rank": pa.array([0] * rows, pa.int32()),
        "score": pa.array([1.0] * rows, pa.float32()), "prob": pa.array([0.5] * rows, pa.float32()),
        "cam": pa.array([[0.0] * 4, [1.0, 0, 0, 0], [0.5] * 4, [0.0] * 4], pa.list_(pa.float32())),
        "cam_height": pa.array([2] * rows, pa.int32()), "cam_width": pa.array([2] * rows, pa.int32()),
        "cam_mean": pa.array([0.0, 0.25, 0.5, 0.0], pa.float32()), "layer": pa.array(["layer4"] * rows),
        "border_mass": pa.array([None, 1.0, 1.0, None], pa.float32()),
        "entropy": pa.array([None, 0.0, 1.0, None], pa.float32()),
    })
    schema = CAM_SCHEMA.with_metadata({b"gradcam_batch": b"{}"})
    pq.write_table(pa.table(columns, schema=schema), out / "cams" / "part-a.parquet")
    (out / "_manifest.json").write_text(json.dumps({"config": {}, "status": "complete"}))
    source = open_output(out)
    arrow, duck = overview_arrow(source, None, 4), overview_duckdb(source, None, 4)
    for overview in (arrow, duck):
        stats = overview.classes
        assert stats[1].border_n == 1 and stats[1].border_sum == pytest.approx(1.0)
        assert stats[2].entropy_n == 1 and stats[2].entropy_sum == pytest.approx(1.0)
