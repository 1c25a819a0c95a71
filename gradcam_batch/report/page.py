"""The HTML page: the run summary, the per-class table, the class-mean maps, the galleries and the
error rows, rendered into one self-contained page (inline CSS, every picture a data: URI)."""

from __future__ import annotations

import datetime
import html

import numpy as np

from gradcam_batch.report.images import Images
from gradcam_batch.report.maps import MapScan
from gradcam_batch.report.pictures import CARD_SIZE, MEAN_SIZE, colormap, data_uri, heatmap, overlay
from gradcam_batch.report.queries import (GALLERIES, MEAN_COLUMNS, ClassStats, Overview, available,
                                          targets_are_predictions)
from gradcam_batch.report.source import ERROR_COLUMNS, MANIFEST_NAME, PROG, Source

CSS = """
:root { --ink: #1d2330; --muted: #5d6575; --line: #dde1e8; --soft: #f4f6f9; --accent: #2952a3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p.lead, p.note { color: var(--muted); margin: 4px 0 12px; }
p.warn { background: #fff6e0; border: 1px solid #f0d58c; padding: 6px 10px; border-radius: 4px; margin: 8px 0; }
nav { margin: 8px 0 0; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
table { border-collapse: collapse; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
table.kv th { width: 190px; background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; }
td.msg { max-width: 520px; overflow-wrap: anywhere; color: var(--muted); }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: var(--soft); padding: 1px 4px;
       border-radius: 3px; overflow-wrap: anywhere; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr)); gap: 12px; }
.grid.means { grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 10px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; background: #fff; }
figure img { display: block; width: 100%; height: auto; aspect-ratio: 1 / 1; background: var(--soft); }
figure.missing div.blank { aspect-ratio: 1 / 1; background: var(--soft); display: flex; align-items: center;
       justify-content: center; color: var(--muted); font-size: 12px; padding: 8px; text-align: center; }
figcaption { padding: 6px 8px 8px; font-size: 12px; line-height: 1.35; }
figcaption .id { font-weight: 600; display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
figcaption .d { display: inline-block; margin-right: 8px; white-space: nowrap; }
figcaption .why { color: #a05a00; display: block; }
.means figure img { image-rendering: auto; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px; margin: 4px 0 10px; }
.legend img { width: 160px; height: 12px; border-radius: 2px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fraction(part: int, whole: int) -> str:
    return f"{part / whole:.3f} ({part:,}/{whole:,})" if whole else "-"


def _class_label(target_class: int, names: dict[int, str]) -> str:
    name = names.get(target_class)
    return f"{target_class} ({name})" if name is not None else str(target_class)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(key)}</th><td>{value}</td></tr>" for key, value in rows)
    return f'<table class="kv">{body}</table>'


def _targets(cam: dict) -> str:
    targets = cam.get("targets")
    if targets == "topk":
        return f"topk (k = {cam.get('topk')})"
    if targets == "classes":
        return f"classes {cam.get('classes')}"
    return {"pred": "pred (the top-1 prediction)", "label": "label (the sample's label, else the prediction)"}.get(
        targets, str(targets) if targets is not None else "-")


def summary_section(source: Source, overview: Overview, layer: str, errors_total: int) -> str:
    manifest = source.manifest
    config = manifest.get("config") or {}
    model_cfg, cam, data = config.get("model") or {}, config.get("cam") or {}, config.get("data") or {}
    stats = overview.classes.values()
    images = sum(s.count for s in stats)
    rows: list[tuple[str, str]] = [("Output folder", f"<code>{_e(source.output_dir.resolve())}</code>")]
    status = manifest.get("status")
    if source.manifest_origin != MANIFEST_NAME:
        rows.append(("Status", f"no {MANIFEST_NAME}: read from the part files' metadata"))
    elif status:
        text = _e(status)
        if status != "complete":
            text += " (the run was interrupted or is still running: the report covers the complete units)"
        rows.append(("Status", text))
    model = manifest.get("model") or model_cfg.get("name") or model_cfg.get("source")
    described = _e(model)
    if model_cfg.get("source") == "demo":
        described += " <span class='note'>(the built-in demo CNN)</span>"
    elif model_cfg.get("source"):
        weights = model_cfg.get("weights") or "random init"
        described += f" <span class='note'>({_e(model_cfg.get('source'))}, weights: {_e(weights)})</span>"
    rows.append(("Model", described))
    layers = ", ".join(f"<code>{_e(name or '(unnamed)')}</code> {count:,} rows"
                       for name, count in overview.layer_rows.items())
    rows.append(("Layer(s)", f"{layers}; this report: <code>{_e(layer or '(unnamed)')}</code>"))
    method = manifest.get("method") or cam.get("method")
    normalize = cam.get("normalize")
    rows.append(("Method", _e(method) + ("" if normalize is None else f", normalize = {_e(normalize)}")))
    rows.append(("Targets", _e(_targets(cam))))
    units = (manifest.get("listing") or {}).get("units")
    files = len(source.cam_files)
    unit_text = (f"{files:,} of {len(units):,} complete" if units
                 else f"{files:,} part file{'s' if files != 1 else ''}")
    rows += [("Images", f"{images:,} <span class='note'>(rank-0 maps of this layer)</span>"),
             ("Rows", f"{source.total_rows:,}"), ("Errors", f"{errors_total:,}"), ("Units", unit_text)]
    correct, labeled = sum(s.correct for s in stats), sum(s.labeled for s in stats)
    if labeled:
        rows.append(("Top-1 accuracy", _fraction(correct, labeled)))
    hits, known = sum(s.hits for s in stats), sum(s.hit_known for s in stats)
    pointing = manifest.get("pointing") or {}
    if known:
        rows.append(("Pointing game", _fraction(hits, known)))
    elif pointing.get("total"):
        rows.append(("Pointing game", _fraction(int(pointing.get("hits", 0)), int(pointing["total"]))))
    run = manifest.get("this_run") or {}
    if run:
        parts = [f"{run['images']:,} images" if isinstance(run.get("images"), int) else None,
                 f"{run['seconds']:.1f} s" if isinstance(run.get("seconds"), (int, float)) else None,
                 f"{run['images_per_second']:,.1f} img/s" if isinstance(run.get("images_per_second"), (int, float))
                 else None,
                 f"steady {run['steady_images_per_second']:,.1f} img/s"
                 if isinstance(run.get("steady_images_per_second"), (int, float)) else None,
                 f"first batch after {run['seconds_to_first_batch']:.1f} s"
                 if isinstance(run.get("seconds_to_first_batch"), (int, float)) else None]
        rows.append(("Last run", _e(", ".join(part for part in parts if part)) or "-"))
    pre = manifest.get("preprocessing") or {}
    if pre:
        def listed(values):
            return "[" + ", ".join(f"{v:.4g}" for v in values) + "]" if isinstance(values, list) else _e(values)
        rows.append(("Preprocessing", f"resize {_e(pre.get('resize'))}, center crop {_e(pre.get('crop'))}, "
                                      f"{_e(pre.get('interpolation'))}, mean {listed(pre.get('mean'))}, "
                                      f"std {listed(pre.get('std'))}"))
    if data:
        where = data.get("root") if data.get("format") in ("imagefolder", "demo") else data.get("shards")
        rows.append(("Data", f"{_e(data.get('format'))}" + (f" <code>{_e(where)}</code>" if where else "")))
    versions = manifest.get("versions") or {}
    if versions:
        rows.append(("Versions", _e(", ".join(f"{k} {v}" for k, v in versions.items()))))
    return f'<section id="summary"><h2>Run summary</h2>{_kv_table(rows)}</section>'


MEANING = {
    "box_energy": "box_energy: the share of the map's energy inside the object boxes",
    "box_iou": "box_iou: the IoU of the thresholded map and the boxes",
    "confidence_change": "confidence_change: the target's probability on the image times the map, minus on "
                         "the image",
}
"""What the table's newer mean columns measure, said under the table where it shows them."""


def _mean(total: float, count: int) -> str:
    return f"{total / count:.3f}" if count else "-"


def class_section(source: Source, overview: Overview, shown: list[ClassStats], names: dict[int, str]) -> str:
    def has(column: str) -> bool:
        return available(source, overview, column)

    head = ["class", "count", "accuracy", "mean prob"]
    means = [(name, prefix) for name, prefix in MEAN_COLUMNS if has(name)]
    head += ["pointing hit rate"] if has("pointing_hit") else []
    head += [f"mean {name}" for name, _ in means]
    rows = []
    for stats in shown:
        cells = [f"<td>{_e(_class_label(stats.target_class, names))}</td>", f'<td class="num">{stats.count:,}</td>',
                 f'<td class="num">{_e(_fraction(stats.correct, stats.labeled))}</td>',
                 f'<td class="num">{_mean(stats.prob_sum, stats.count)}</td>']
        if has("pointing_hit"):
            cells.append(f'<td class="num">{_e(_fraction(stats.hits, stats.hit_known))}</td>')
        for _, prefix in means:
            mean = _mean(getattr(stats, f"{prefix}_sum"), getattr(stats, f"{prefix}_n"))
            cells.append(f'<td class="num">{mean}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f'<th{" class=num" if i else ""}>{_e(name)}</th>' for i, name in enumerate(head))
    total = len(overview.classes)
    lead = (f"Classes are the rank-0 target classes; the {len(shown)} most frequent of {total:,} are shown."
            if len(shown) < total else f"Classes are the rank-0 target classes ({total:,}).")
    fallback = targets_are_predictions(source)
    if has("pred_class"):
        lead += (" Accuracy: the model's top-1 (pred_class"
                 + (", else the rank-0 target" if fallback else "") + ") = label, over the samples with a label.")
    elif fallback:
        lead += " Accuracy: the rank-0 target (the prediction) = label, over the samples with a label."
    else:
        lead += " Accuracy needs the model's prediction (a pred_class column, or cam.targets = pred / topk)."
    explained = [MEANING[name] for name, _ in means if name in MEANING]
    if explained:
        lead += f" {'; '.join(explained)}."
    missing = [name for name in ("pointing_hit", *(name for name, _ in MEAN_COLUMNS)) if not has(name)]
    if missing:
        lead += f" Not in this output (no column, or no values): {', '.join(missing)}."
    return (f'<section id="classes"><h2>Per-class statistics</h2><p class="lead">{_e(lead)}</p>'
            f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _legend() -> str:
    bar = colormap(np.tile(np.linspace(0, 1, 160), (12, 1)))
    return (f'<div class="legend">low <img class="legend" alt="colour scale" src="{data_uri(bar)}"> high '
            f"<span>(each map scaled to its own min-max)</span></div>")


def means_section(shown: list[ClassStats], scan: MapScan, names: dict[int, str]) -> str:
    tiles = []
    for stats in shown:
        mean = scan.means.get(stats.target_class)
        if mean is None:
            continue
        label = _class_label(stats.target_class, names)
        tiles.append(f'<figure><img class="mean" alt="mean map of class {_e(label)}" '
                     f'src="{data_uri(heatmap(mean, MEAN_SIZE))}"><figcaption><span class="id">{_e(label)}</span>'
                     f"{stats.count:,} maps, {mean.shape[0]}x{mean.shape[1]}</figcaption></figure>")
    lead = "The mean of each class's rank-0 maps, for the classes of the table above."
    mixed = [stats.target_class for stats in shown if stats.target_class in scan.mixed]
    if mixed:
        lead += f" Skipped (maps of several sizes): {', '.join(str(c) for c in mixed)}."
    return (f'<section id="means"><h2>Class-mean maps</h2><p class="lead">{_e(lead)}</p>{_legend()}'
            f'<div class="grid means">{"".join(tiles)}</div></section>')


def _card(row: dict, key: str, scan: MapScan, images: Images) -> str:
    slot = (row["shard"], row["sample_id"])
    cam = scan.maps.get(slot)
    picture = images.pictures.get(slot)
    names = images.class_names
    details = [f"class {_class_label(row['target_class'], names)}"]
    if row.get("prob") is not None:
        details.append(f"prob {row['prob']:.3f}")
    if row.get("label") is not None:
        details.append(f"label {_class_label(row['label'], names)}")
    if row.get("pred_class") is not None and row["pred_class"] != row["target_class"]:
        details.append(f"pred {_class_label(row['pred_class'], names)}")
    if key == "border" and row.get("border_mass") is not None:
        details.append(f"border_mass {row['border_mass']:.3f}")
    elif row.get("entropy") is not None and key != "border":
        details.append(f"entropy {row['entropy']:.3f}")
    caption = (f'<span class="id" title="{_e(row["sample_id"])} ({_e(row["shard"])})">{_e(row["sample_id"])}</span>'
               + "".join(f'<span class="d">{_e(detail)}</span>' for detail in details))
    stored = images.heatmaps.get(slot)
    figure = "<figure>"
    if stored is not None:  # the run's own picture of the map over the crop
        src, figure = data_uri(stored, "JPEG", CARD_SIZE), '<figure class="stored">'
    elif cam is None:
        return (f'<figure class="missing"><div class="blank">map not readable</div>'
                f"<figcaption>{caption}</figcaption></figure>")
    elif picture is not None:
        src = data_uri(overlay(picture, cam, images.boxes.get(slot)), "JPEG", CARD_SIZE)
    else:
        src = data_uri(heatmap(cam, min(CARD_SIZE, images.crop)), "JPEG")
        if slot in images.problems and not images.note:
            caption += f'<span class="why">{_e(images.problems[slot])}</span>'
    return (f'{figure}<img class="cam" alt="map of {_e(row["sample_id"])}" src="{src}">'
            f"<figcaption>{caption}</figcaption></figure>")


def gallery_sections(source: Source, overview: Overview, per_gallery: int, scan: MapScan, images: Images) -> str:
    parts = []
    if images.boxes:
        parts.append('<p class="note">White outlines: the object box of samples that have one.</p>')
    if images.heatmaps:
        parts.append('<p class="note">Cards of rows with a heatmap_png show the picture the run stored: its map '
                     'blended over the crop (without box outlines).</p>')
    if images.note:
        parts.append(f'<p class="warn">Images: {_e(images.note)}; cards without an image show the map alone.</p>')
    for key, heading, what, needs in GALLERIES:
        rows = overview.galleries.get(key) or []
        if needs and not source.has(needs):
            body = f'<p class="note">Not available: this output has no {_e(needs)} column.</p>'
        elif needs and not overview.filled(needs):
            why = " (the samples have no boxes)" if needs == "pointing_hit" else ""
            body = f'<p class="note">Not available: no row of this output has a {_e(needs)} value{why}.</p>'
        elif per_gallery == 0:
            body = '<p class="note">Galleries are off (--per-gallery 0).</p>'
        elif not rows:
            body = '<p class="note">No maps qualify.</p>'
        else:
            cards = "".join(_card(row, key, scan, images) for row in rows)
            body = f'<p class="lead">{_e(what.capitalize())}.</p><div class="grid">{cards}</div>'
        parts.append(f'<section id="gallery-{key}" class="gallery"><h2>{_e(heading)}</h2>{body}</section>')
    return "".join(parts)


def errors_section(total: int, shown: list[dict]) -> str:
    if not total:
        return '<section id="errors"><h2>Errors</h2><p class="note">No error rows: every sample was read.</p></section>'
    header = "".join(f"<th>{name}</th>" for name in ERROR_COLUMNS)
    body = "".join("<tr>" + "".join(f'<td{" class=msg" if name == "message" else ""}>{_e(row.get(name))}</td>'
                                    for name in ERROR_COLUMNS) + "</tr>" for row in shown)
    lead = f"{total:,} sample{'s' if total != 1 else ''} could not be read or decoded" + (f"; the first {len(shown)} are listed." if
                                                               total > len(shown) else ".")
    return (f'<section id="errors"><h2>Errors</h2><p class="lead">{_e(lead)}</p>'
            f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></section>")


def render(source: Source, overview: Overview, layer: str, shown: list[ClassStats], scan: MapScan, images: Images,
           errors_total: int, errors: list[dict], per_gallery: int) -> str:
    names = images.class_names
    title = f"gradcam-batch report: {source.manifest.get('model') or source.output_dir.name}"
    nav = "".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in
                  [("summary", "Summary"), ("classes", "Classes"), ("means", "Class means"),
                   *((f"gallery-{key}", heading) for key, heading, *_ in GALLERIES), ("errors", "Errors")])
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><p class=\"lead\">{_e(source.manifest.get('method') or '')} maps of "
        f"<code>{_e(layer or '(unnamed)')}</code> · generated {_e(generated)}</p><nav>{nav}</nav>"
        + summary_section(source, overview, layer, errors_total)
        + class_section(source, overview, shown, names)
        + means_section(shown, scan, names)
        + gallery_sections(source, overview, per_gallery, scan, images)
        + errors_section(errors_total, errors)
        + f"<footer>Written by {PROG} ({_e(overview.engine)}). Self-contained: every picture is inlined."
          "</footer></main></body></html>\n")
