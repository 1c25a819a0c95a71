"""No silent wrong results in gradcam-batch-report: all-zero maps counted, warned about and left
out of what would present them as findings; ties not shown as rankings; the run summary's layer
by default and named wherever a number is of it; the last run that did work kept through a
rerun with nothing to do; marks explained where they are drawn; long ids readable; mispredicted
samples marked."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_helpers import TINY_RESNET, run_composed
from gradcam_batch import report
from gradcam_batch.report.images import Images
from gradcam_batch.writer import CAM_SCHEMA
from sample_data import make_imagefolder
from test_report import ENGINES, Page, check_self_contained, gone_data

ZERO = [0.0] * 9


def cam_of(index: int) -> list[float]:
    """A 3x3 map with positive evidence, different for each index."""
    return [float(v) for v in (np.arange(9) + index) % 9 / 8]


def row(sample_id: str, target_class: int, prob: float, cam: list[float], *, rank: int = 0, layer: str = "layer4",
        raw="auto", **extra) -> dict:
    """A row in the writer's schema; cam_max_raw follows the map unless given (None: null)."""
    raw_max = (max(cam) * 3.0 if raw == "auto" else raw)
    return dict(sample_id=sample_id, shard="shard-0000", label=target_class, target_class=target_class,
                target_rank=rank, prob=prob, cam=cam, cam_height=3, cam_width=3, layer=layer, cam_max_raw=raw_max,
                **extra)


def write_output(out: Path, rows: list[dict], data: dict, *, drop: tuple[str, ...] = (), manifest: dict | None = None,
                 metadata: dict | None = None, files: int = 2) -> None:
    """An output folder of `rows` in CAM_SCHEMA (less the `drop` columns), with `manifest`
    (None: none) and `metadata` embedded in the part files (None: metadata that records nothing)."""
    (out / "cams").mkdir(parents=True)
    (out / "errors").mkdir()
    schema = pa.schema([field for field in CAM_SCHEMA if field.name not in drop])
    schema = schema.with_metadata({b"gradcam_batch": json.dumps(metadata or {}).encode()})
    for part in range(files):
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in drop} for r in rows[part::files]],
                                     schema=schema)
        pq.write_table(table, out / "cams" / f"part-shard-0000@{part:08d}-{part + 1:08d}.parquet", row_group_size=5)
    if manifest is not None:
        (out / "_manifest.json").write_text(json.dumps(manifest))


def schema_manifest(data: dict, **cam) -> dict:
    return {"status": "complete", "model": "schema-net", "method": "gradcam", "target_layer": "layer3,layer4",
            "config": {"data": data, "cam": {"targets": "topk", "topk": 2, **cam}},
            "preprocessing": {"resize": 32, "crop": 32}}


def alarm(text: str) -> str | None:
    found = re.search(r'<div class="alarm"[^>]*>(.*?)</div>', text, re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1))) if found else None


def summary_cell(page: Page, key: str) -> str:
    return next(cells[1] for cells in page.sections["summary"]["rows"] if cells[0] == key)


def zero_output(tmp_path: Path, zero_ids: set[int], raw: str = "column") -> tuple[Path, list[dict]]:
    """12 rank-0 maps of layer4 over classes 0-2 (probs 0.10 ... 0.65), those in `zero_ids` all
    zero; every zero map has pointing_hit = false and box values, as older writers wrote them for
    the arbitrary peak of an all-zero map. raw: "column" (cam_max_raw as the engine gives it),
    "null" (the column, no values) or "absent" (no such column). Rank-1 rows and layer3 rows,
    all zero, must not count."""
    rows = []
    for i in range(12):
        zero = i in zero_ids
        rows.append(row(f"s{i:02d}", i % 3, round(0.10 + i * 0.05, 2), ZERO if zero else cam_of(i),
                        raw=None if raw != "column" else "auto", pointing_hit=False if zero else i % 4 == 0,
                        box_energy=0.0 if zero else 0.5, box_iou=0.0 if zero else 0.25,
                        border_mass=None if zero else 0.3))
        rows.append(row(f"s{i:02d}", (i + 1) % 3, 0.01, ZERO, rank=1, raw=None if raw != "column" else "auto"))
        rows.append(row(f"s{i:02d}", i % 3, 0.5, ZERO, layer="layer3", raw=None if raw != "column" else "auto"))
    out = tmp_path / "out"
    write_output(out, rows, gone_data(tmp_path), drop=("cam_max_raw",) if raw == "absent" else (),
                 manifest=schema_manifest(gone_data(tmp_path)))
    return out, [r for r in rows if r["target_rank"] == 0 and r["layer"] == "layer4"]


# --- all-zero maps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("raw", ["column", "null", "absent"])
def test_most_maps_all_zero_warns_counts_and_leaves_them_out(tmp_path, engine, raw, capsys):
    """8 of 12 maps all zero: a warning box before the summary, the count in the summary and per
    class, no zero map in a gallery, a class mean or a map statistic. Whether a map is all zero
    comes from cam_max_raw, else (null or absent) from the map's values."""
    zero_ids = {0, 1, 2, 3, 5, 7, 9, 11}
    out, rank0 = zero_output(tmp_path, zero_ids, raw)
    assert report.main([str(out), "--engine", engine, "--no-images", "--per-gallery", "6"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "all zero" in line]
    assert warnings == ["gradcam-batch-report: warning: 8 of 12 rank-0 maps of layer layer4 are all zero (no "
                        "positive evidence; see the page)"]
    assert "(layer layer4: " in captured.out
    text = (out / "report.html").read_text()
    page = Page(text)
    check_self_contained(text, page)
    warning = alarm(text)
    assert warning is not None and warning.startswith("Warning: 8 of 12 rank-0 maps of layer layer4 are all zero")
    assert text.index('class="alarm"') < text.index('<section id="summary">')
    assert summary_cell(page, "All-zero maps").startswith("0.667 (8/12) (rank-0 maps of layer layer4")
    # the class table counts them per class and leaves them out of the hit rate and the box means
    header = page.sections["classes"]["rows"][0]
    table = {int(cells[0]): dict(zip(header, cells)) for cells in page.table("classes")}
    for target_class, cells in table.items():
        members = [r for r in rank0 if r["target_class"] == target_class]
        kept = [r for r in members if int(r["sample_id"][1:]) not in zero_ids]
        assert int(cells["count"]) == len(members)
        assert int(cells["all-zero maps"]) == len(members) - len(kept)
        hits = sum(r["pointing_hit"] for r in kept)
        assert cells["pointing hit rate"] == (f"{hits / len(kept):.3f} ({hits}/{len(kept)})" if kept else "-")
        assert cells["mean box_energy"] == ("0.500" if kept else "-")
    # galleries: only maps with evidence; no zero map among the misses though each has pointing_hit false
    nonzero = sorted((r for r in rank0 if int(r["sample_id"][1:]) not in zero_ids), key=lambda r: -r["prob"])
    assert page.card_ids("gallery-high") == [r["sample_id"] for r in nonzero]
    assert page.card_ids("gallery-low") == [r["sample_id"] for r in nonzero[::-1]]
    assert page.card_ids("gallery-misses") == [r["sample_id"] for r in nonzero if not r["pointing_hit"]]
    assert "The 8 all-zero maps (no positive evidence) are left out" in page.text("galleries")
    # class means over the maps with evidence only, and the page says how many were left out
    source = report.open_output(out)
    assert source.raw_max_known == (raw == "column")
    scan = report.scan_maps(source, "layer4", [0, 1, 2], set())
    assert scan.zero == {c: sum(1 for i in zero_ids if i % 3 == c) for c in (0, 1, 2)}
    for target_class in (0, 1, 2):
        kept = [np.asarray(r["cam"]) for r in rank0 if r["target_class"] == target_class
                and int(r["sample_id"][1:]) not in zero_ids]
        assert scan.counts[target_class] == len(kept)
        assert np.allclose(scan.means[target_class].reshape(-1), np.mean(kept, axis=0))
    means = page.text("means")
    assert "8 all-zero maps (no positive evidence) are left out of the means" in means
    assert "1 map, 3x3, 3 all-zero left out" in means and "2 maps, 3x3, 2 all-zero left out" in means


def test_a_few_zero_maps_are_counted_without_the_warning_box(tmp_path, capsys):
    out, _ = zero_output(tmp_path, {0, 4, 8})
    assert report.main([str(out), "--no-images"]) == 0
    assert "all zero" not in capsys.readouterr().err
    text = (out / "report.html").read_text()
    page = Page(text)
    assert alarm(text) is None
    assert summary_cell(page, "All-zero maps").startswith("0.250 (3/12) (rank-0 maps of layer layer4")
    assert len(page.card_ids("gallery-high")) == 8 and not {"s00", "s04", "s08"} & set(page.card_ids("gallery-high"))


def test_none_all_zero_says_so(tmp_path):
    out, _ = zero_output(tmp_path, set())
    report.build_report(out, images=False)
    text = (out / "report.html").read_text()
    page = Page(text)
    assert alarm(text) is None
    assert summary_cell(page, "All-zero maps").startswith("0.000 (0/12)")
    assert "all-zero maps" not in page.sections["classes"]["rows"][0]  # no column of zeros


def zero_head(path: Path) -> Path:
    """resnet18 weights (10 classes) whose last Linear is zero: every class scores 0 whatever the
    image, so every Grad-CAM map is all zero, as with torchvision's vit_b_16 built without weights."""
    import torch
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    torch.save(model.state_dict(), path)
    return path


def test_a_run_whose_head_is_zero(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    make_imagefolder(root, per_class=(3, 2))
    run_composed(*TINY_RESNET, "model.num_classes=10", f"model.weights={zero_head(tmp_path / 'zero.pt')}",
                 "data=imagefolder", f"data.root={root}", f"output.dir={out}")
    assert report.main([str(out)]) == 0
    assert "5 of 5 rank-0 maps of layer layer4 are all zero" in capsys.readouterr().err
    text = (out / "report.html").read_text()
    page = Page(text)
    check_self_contained(text, page)
    assert alarm(text).startswith("Warning: 5 of 5 rank-0 maps of layer layer4 are all zero")
    assert summary_cell(page, "All-zero maps").startswith("1.000 (5/5)")
    for key in ("high", "low"):
        assert page.card_ids(f"gallery-{key}") == []
        assert "No maps qualify (all-zero maps are left out)" in page.text(f"gallery-{key}")
    assert [img for img in page.sections["means"]["images"] if img.get("class") == "mean"] == []
    assert "No mean (every map all zero)" in page.text("means")


# --- ties ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_of_equal_values_is_not_presented_as_a_ranking(tmp_path, engine):
    """Every prob the same (a head that scores every class alike): the confidence galleries say
    their order is a tie, not a ranking. Border masses whose cut at the gallery's end splits
    equal values: the page says the cards among those are not picked by rank."""
    rows = [row(f"s{i:02d}", i % 3, 0.25, cam_of(i), border_mass=[0.9, 0.8, 0.7, 0.7, 0.7, 0.1][i % 6])
            for i in range(12)]
    out = tmp_path / "out"
    write_output(out, rows, gone_data(tmp_path), manifest=schema_manifest(gone_data(tmp_path)))
    report.build_report(out, per_gallery=4, engine=engine, images=False)
    page = Page((out / "report.html").read_text())
    for key in ("high", "low"):
        assert ("All 4 cards have the same prob (0.25), and so do maps not shown: a tie, not a ranking"
                in page.text(f"gallery-{key}"))
    border = page.text("gallery-border")
    assert page.card_ids("gallery-border") == ["s00", "s06", "s01", "s07"]
    assert "a tie, not a ranking" not in border and "The last card's border_mass" not in border
    report.build_report(out, per_gallery=5, engine=engine, images=False)
    page = Page((out / "report.html").read_text())
    border = page.text("gallery-border")
    assert page.card_ids("gallery-border") == ["s00", "s06", "s01", "s07", "s02"]
    assert "The last card's border_mass (0.7) is shared by maps not shown" in border
    source = report.open_output(out)
    overview = (report.overview_duckdb if engine == "duckdb" else report.overview_arrow)(source, None, 5)
    assert overview.tied_beyond == {"high": True, "low": True, "border": True, "misses": False}


# --- the layer ----------------------------------------------------------------------------------------------


def two_layer_rows(names: tuple[str, ...]) -> list[dict]:
    """Four samples; each layer's rank-0 prob differs (0.1 * layer index + ...), so the table's
    mean prob tells which layer the report covers."""
    rows = []
    for index, name in enumerate(names):
        for i in range(4):
            rows.append(row(f"s{i}", i % 2, round(0.1 * (index + 1) + 0.01 * i, 2), cam_of(i), layer=name))
    return rows


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("where", ["manifest", "metadata", "manifest without target_layer", "neither"])
def test_the_default_layer_is_the_run_summarys(tmp_path, engine, where):
    """summary.default_layer over the manifest's (else the part files') target_layer and cam.fuse:
    the fused maps when there are; the first name in sorted order only where the output does not
    record its layers."""
    names = ("layer4", "layer3", "mean(layer4,layer3)")
    recorded = {"model": "schema-net", "method": "gradcam", "target_layer": "layer4,layer3",
                "config": {"data": gone_data(tmp_path), "cam": {"targets": "pred", "fuse": "mean"}}}
    manifest = {"manifest": recorded, "metadata": None, "manifest without target_layer":
                {**recorded, "target_layer": None}, "neither": {**recorded, "target_layer": None}}[where]
    metadata = None if where in ("manifest", "neither") else recorded
    out = tmp_path / "out"
    write_output(out, two_layer_rows(names), gone_data(tmp_path), manifest=manifest, metadata=metadata)
    report.build_report(out, engine=engine, images=False)
    text = (out / "report.html").read_text()
    page = Page(text)
    expected = "layer3" if where == "neither" else "mean(layer4,layer3)"
    layers = summary_cell(page, "Layer(s)")
    assert f"this report: {expected} (" in layers
    probs = {name: [round(0.1 * (index + 1) + 0.01 * i, 2) for i in range(4)] for index, name in enumerate(names)}
    table = {int(cells[0]): cells for cells in page.table("classes")}
    assert table[0][3] == f"{np.mean(probs[expected][0::2]):.3f}"
    # the layer is named with every number of it
    assert f"4 (rank-0 maps of layer {expected})" == summary_cell(page, "Images")
    assert f"(rank-0 maps of layer {expected}" in summary_cell(page, "All-zero maps")
    assert f"(rank-0 maps of layer {expected})" in summary_cell(page, "Top-1 accuracy")
    assert page.text("classes").startswith(f"Per-class statistics Rank-0 maps of layer  {expected}")
    assert f"Layer  {expected}" in page.text("means")
    assert f"rank-0 maps of layer  {expected}" in page.text("galleries")
    # --layer still chooses, and the page says which the run summary's is
    report.build_report(out, engine=engine, images=False, layer="layer4")
    layers = summary_cell(Page((out / "report.html").read_text()), "Layer(s)")
    if where == "neither":
        assert "this report: layer4 (the output does not record" in layers
    else:
        assert f"this report: layer4 (chosen with --layer; the run summary's is {expected})" in layers


def test_without_fusion_the_last_listed_layer(tmp_path):
    out = tmp_path / "out"
    manifest = schema_manifest(gone_data(tmp_path))
    manifest["target_layer"] = "layer2,layer4,layer3"  # the last listed is neither first nor last in sorted order
    write_output(out, two_layer_rows(("layer2", "layer4", "layer3")), gone_data(tmp_path), manifest=manifest)
    result = report.build_report(out, images=False)
    assert result.layer == "layer3"


# --- the last run ---------------------------------------------------------------------------------------------


def test_a_rerun_with_nothing_to_do_keeps_the_last_run_that_did_work(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    make_imagefolder(root, per_class=(3, 2))
    args = (*TINY_RESNET, "data=imagefolder", f"data.root={root}", f"output.dir={out}")
    first = run_composed(*args)
    assert first.images == 5
    done = json.loads((out / "_manifest.json").read_text())["this_run"]
    for _ in range(2):  # a second no-op rerun keeps it too
        assert run_composed(*args).images == 0
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["this_run"]["images"] == 0 and manifest["last_run"] == done
    report.build_report(out, images=False)
    cell = summary_cell(Page((out / "report.html").read_text()), "Last run")
    assert cell.startswith(f"last run that wrote rows: 5 images, {done['seconds']:.1f} s, "
                           f"{done['images_per_second']:,.1f} img/s")
    assert cell.endswith("; a later rerun found nothing to do") and "0 images" not in cell
    # a folder written before last_run was kept says what it cannot know
    del manifest["last_run"]
    (out / "_manifest.json").write_text(json.dumps(manifest))
    report.build_report(out, images=False)
    cell = summary_cell(Page((out / "report.html").read_text()), "Last run")
    assert cell.startswith("a rerun found nothing to do") and "0.0 img/s" not in cell


# --- marks on the cards ------------------------------------------------------------------------------------------


def with_pictures(monkeypatch, boxes: dict[str, list[float]]) -> None:
    """Every gallery sample 'read back' as a grey 32x32 crop; `boxes` by sample id."""
    def read(manifest, output_dir, wanted):
        images = Images(crop=32)
        for slot in wanted:
            images.pictures[slot] = np.full((32, 32, 3), 128, np.uint8)
            if slot[1] in boxes:
                images.boxes[slot] = boxes[slot[1]]
        return images

    monkeypatch.setattr("gradcam_batch.report.build.read_images", read)


OUTLINES = "White outlines: the object box of samples that have one."


def test_the_outline_note_is_where_outlines_are_drawn(tmp_path, monkeypatch):
    rows = [row(f"s{i:02d}", i % 2, round(0.1 + i / 10, 2), cam_of(i)) for i in range(6)]
    out = tmp_path / "out"
    write_output(out, rows, gone_data(tmp_path), manifest=schema_manifest(gone_data(tmp_path)))
    with_pictures(monkeypatch, {"s05": [0.1, 0.1, 0.6, 0.6]})  # the most confident: the "high" gallery only
    report.build_report(out, per_gallery=2)
    text = (out / "report.html").read_text()
    page = Page(text)
    assert page.card_ids("gallery-high") == ["s05", "s04"] and "s05" not in page.card_ids("gallery-low")
    assert text.count(OUTLINES) == 1 and OUTLINES in page.text("gallery-high")
    with_pictures(monkeypatch, {})
    report.build_report(out, per_gallery=2)
    assert OUTLINES not in (out / "report.html").read_text()


def test_long_ids_are_cut_but_readable_whole(tmp_path):
    long_id = "a_class_folder_with_a_rather_long_name/" + "x" * 80 + ".jpg"
    rows = [row(long_id if i == 0 else f"s{i}", 0, 0.9 - i / 10, cam_of(i)) for i in range(3)]
    out = tmp_path / "out"
    write_output(out, rows, gone_data(tmp_path), manifest=schema_manifest(gone_data(tmp_path)))
    report.build_report(out, images=False)
    text = (out / "report.html").read_text()
    spans = re.findall(r'<span class="id"([^>]*)>([^<]*)</span>', text)
    card = [attributes for attributes, shown in spans if html.unescape(shown) == long_id]
    assert len(card) == 2  # high and low gallery: the whole id is the text, cut by CSS only
    for attributes in card:
        assert f'title="{html.escape(long_id)} (shard-0000)"' in attributes and 'tabindex="0"' in attributes
    css = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert re.search(r"figcaption \.id:hover, figcaption \.id:focus \{ white-space: normal;", css)


@pytest.mark.parametrize("engine", ENGINES)
def test_mispredictions_are_marked_and_explained(tmp_path, engine):
    """A card is marked where the label is known and differs from the prediction: pred_class,
    else (targets = pred or topk) the rank-0 target."""
    cases = {  # sample: (label, pred_class, target_class)
        "right": (1, 1, 1), "wrong": (2, 1, 1), "no-label": (None, 1, 1),
        "wrong-by-target": (0, None, 1), "right-by-target": (1, None, 1)}
    rows = []
    for index, (sample_id, (label, pred, target)) in enumerate(cases.items()):
        rows.append({**row(sample_id, target, round(0.9 - index / 10, 2), cam_of(index)), "label": label,
                     "pred_class": pred})
    out = tmp_path / "out"
    write_output(out, rows, gone_data(tmp_path), manifest=schema_manifest(gone_data(tmp_path)))
    report.build_report(out, engine=engine, images=False)
    text = (out / "report.html").read_text()
    section = re.search(r'<section id="gallery-high".*?</section>', text, re.S).group()
    figures = dict(re.findall(r'<figure( class="[^"]*")?>.*?alt="map of ([^"]+)"', section, re.S)[i][::-1]
                   for i in range(len(cases)))
    assert {sample_id for sample_id, classes in figures.items() if "wrong" in classes} == {"wrong",
                                                                                           "wrong-by-target"}
    assert section.count("\u2717 mispredicted</span>") == 2
    assert ("A red frame and \u2717 mispredicted: the sample's label differs from the predicted class "
            "(pred_class, else the rank-0 target (the prediction)).") in html.unescape(section)
    # without cam.targets = pred/topk the rank-0 target is no prediction: only pred_class counts
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["config"]["cam"]["targets"] = "label"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    report.build_report(out, engine=engine, images=False)
    section = re.search(r'<section id="gallery-high".*?</section>', (out / "report.html").read_text(), re.S).group()
    assert section.count("\u2717 mispredicted</span>") == 1
    assert "(pred_class)." in html.unescape(section)
