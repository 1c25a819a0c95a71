"""The HTML page: the run summary, the per-class table, the class-mean maps, the strategies
(rendered by strategies_page), the galleries and the error rows, in one self-contained page
(inline CSS, every picture a data: URI)."""

from __future__ import annotations

import datetime
import html

import numpy as np

from gradcam_batch.report.images import Images
from gradcam_batch.report.maps import MapScan
from gradcam_batch.report.pictures import CARD_SIZE, MEAN_SIZE, colormap, data_uri, heatmap, overlay
from gradcam_batch.report.queries import (GALLERIES, GALLERY_STATISTIC, MEAN_COLUMNS, UNDEFINED_FOR_ZERO_MAPS,
                                          ClassStats, Overview, available, targets_are_predictions)
from gradcam_batch.report.source import ERROR_COLUMNS, MANIFEST_NAME, PROG, Source, run_layer
from gradcam_batch.report.style import CSS


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fraction(part: int, whole: int) -> str:
    return f"{part / whole:.3f} ({part:,}/{whole:,})" if whole else "-"


def _class_label(target_class: int, names: dict[int, str]) -> str:
    name = names.get(target_class)
    return f"{target_class} ({name})" if name is not None else str(target_class)


def _count(value) -> bool:
    """Whether a manifest value is a count as a run writes one (a non-negative integer)."""
    return type(value) is int and value >= 0


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(key)}</th><td>{value}</td></tr>" for key, value in rows)
    return f'<table class="kv">{body}</table>'


def _layer(layer: str) -> str:
    return f"<code>{_e(layer or '(unnamed)')}</code>"


def _run_text(run: dict) -> str:
    parts = [f"{run['images']:,} images" if isinstance(run.get("images"), int) else None,
             f"{run['seconds']:.1f} s" if isinstance(run.get("seconds"), (int, float)) else None,
             f"{run['images_per_second']:,.1f} img/s" if isinstance(run.get("images_per_second"), (int, float))
             else None,
             f"steady {run['steady_images_per_second']:,.1f} img/s"
             if isinstance(run.get("steady_images_per_second"), (int, float)) else None,
             f"first batch after {run['seconds_to_first_batch']:.1f} s"
             if isinstance(run.get("seconds_to_first_batch"), (int, float)) else None]
    return ", ".join(part for part in parts if part)


def _last_run(manifest: dict) -> str:
    """The manifest's this_run, unless that run found nothing to do: then the last run that did
    (the pipeline keeps it as last_run), whose throughput a rerun's zeros must not replace."""
    run, earlier = manifest.get("this_run") or {}, manifest.get("last_run") or {}
    if not (run.get("images") == 0 and run.get("errors") == 0):
        return _e(_run_text(run)) or "-"
    if earlier:
        return _e(f"last run that wrote rows: {_run_text(earlier) or '-'}; a later rerun found nothing to do")
    return "a rerun found nothing to do (every unit was complete); the run that wrote the rows is not recorded"


def _targets(cam: dict) -> str:
    targets = cam.get("targets")
    if targets == "topk":
        return f"topk (k = {cam.get('topk')})"
    if targets == "classes":
        return f"classes {cam.get('classes')}"
    known = {"pred": "pred (the top-1 prediction)", "label": "label (the sample's label, else the prediction)"}
    if isinstance(targets, str) and targets in known:
        return known[targets]
    return str(targets) if targets is not None else "-"


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
    layers = ", ".join(f"{_layer(name)} {count:,} rows" for name, count in overview.layer_rows.items())
    summarized = run_layer(source)
    if len(overview.layer_rows) < 2:
        why = ""
    elif layer == summarized:
        why = " (the run summary's layer: the fused maps, else the last target layer)"
    elif summarized in overview.layer_rows:
        why = f" (chosen with --layer; the run summary's is {_layer(summarized)})"
    else:
        why = " (the output does not record which layer the run summary speaks of: the first in sorted order)"
    rows.append(("Layer(s)", f"{layers}; this report: {_layer(layer)}{why}"))
    method = manifest.get("method") or cam.get("method")
    normalize = cam.get("normalize")
    rows.append(("Method", _e(method) + ("" if normalize is None else f", normalize = {_e(normalize)}")))
    rows.append(("Targets", _e(_targets(cam))))
    units = (manifest.get("listing") or {}).get("units")
    files = len(source.cam_files)
    unit_text = (f"{files:,} of {len(units):,} complete" if units
                 else f"{files:,} part file{'s' if files != 1 else ''}")
    of_layer = f"<span class='note'>(rank-0 maps of layer {_layer(layer)})</span>"
    zero = overview.zero_maps
    rows += [("Images", f"{images:,} {of_layer}"),
             ("All-zero maps", f"{_e(_fraction(zero, images))} <span class='note'>(rank-0 maps of layer "
                               f"{_layer(layer)} with no positive evidence: cam_max_raw = 0, or every value 0; "
                               "left out of the galleries, the class means and the map statistics)</span>"),
             ("Rows", f"{source.total_rows:,} <span class='note'>(every layer and target)</span>"),
             ("Errors", f"{errors_total:,}"), ("Units", unit_text)]
    correct, labeled = sum(s.correct for s in stats), sum(s.labeled for s in stats)
    if labeled:
        rows.append(("Top-1 accuracy", f"{_e(_fraction(correct, labeled))} {of_layer}"))
    hits, known = sum(s.hits for s in stats), sum(s.hit_known for s in stats)
    pointing = manifest.get("pointing") or {}
    run_hits, run_total = pointing.get("hits", 0), pointing.get("total")
    if not (_count(run_hits) and _count(run_total)):  # not what a run writes: no number to show
        run_hits, run_total = 0, 0
    if known:
        rows.append(("Pointing game", f"{_e(_fraction(hits, known))} <span class='note'>(rank-0 maps of layer "
                                      f"{_layer(layer)} with a box{', all-zero maps left out' if zero else ''})"
                                      "</span>"))
    elif run_total and source.has("pointing_hit") and zero:  # every boxed map is all zero
        rows.append(("Pointing game", f"- <span class='note'>(no rank-0 map of layer {_layer(layer)} with a box "
                                      "has positive evidence)</span>"))
    elif run_total:  # an output without the column: the run's own count, of its summary's layer
        rows.append(("Pointing game", f"{_e(_fraction(run_hits, run_total))} "
                                      f"<span class='note'>(the run's count, maps of layer "
                                      f"{_layer(run_layer(source) or '')})</span>"))
    if manifest.get("this_run"):
        rows.append(("Last run", _last_run(manifest)))
    pre = manifest.get("preprocessing") or {}
    if pre:
        def listed(values):
            if not isinstance(values, list):
                return _e(values)
            return "[" + ", ".join(f"{v:.4g}" if isinstance(v, (int, float)) else _e(v) for v in values) + "]"
        rows.append(("Preprocessing", f"resize {_e(pre.get('resize'))}, center crop {_e(pre.get('crop'))}, "
                                      f"{_e(pre.get('interpolation'))}, mean {listed(pre.get('mean'))}, "
                                      f"std {listed(pre.get('std'))}"))
    if data:
        where = data.get("root") if data.get("format") in ("imagefolder", "demo") else data.get("shards")
        rows.append(("Data", f"{_e(data.get('format'))}" + (f" <code>{_e(where)}</code>" if where else "")))
    versions = manifest.get("versions") or {}
    if versions:
        rows.append(("Versions", _e(", ".join(f"{k} {v}" for k, v in versions.items()))))
    return f'<section id="summary"><h2>Run summary</h2>{_kv_table(rows)}{_skipped(source)}</section>'


SKIPPED_SHOWN = 20


def _skipped(source: Source) -> str:
    """The files in cams/ and errors/ left out, named (a user's own file, a copy or merge of the
    part files would otherwise count rows twice or add a layer of nothing)."""
    if not source.skipped:
        return ""
    count = len(source.skipped)
    items = "".join(f"<li><code>{_e(name)}</code>: {_e(why)}</li>" for name, why in source.skipped[:SKIPPED_SHOWN])
    more = f"<li>and {count - SKIPPED_SHOWN:,} more</li>" if count > SKIPPED_SHOWN else ""
    what = f"{count:,} files in cams/ or errors/ that are" if count != 1 else "1 file in cams/ or errors/ that is"
    return (f'<div class="warn skipped"><p>Not read: {what} not one of this tool\'s part files of this output; the '
            f"numbers on this page leave {'them' if count != 1 else 'it'} out.</p><ul>{items}{more}</ul></div>")


MEANING = {
    "box_energy": "box_energy: the share of the map's energy inside the object boxes",
    "box_iou": "box_iou: the IoU of the thresholded map and the boxes",
    "confidence_change": "confidence_change: the target's probability on the image times the map, minus on "
                         "the image",
}
"""What the table's newer mean columns measure, said under the table where it shows them."""


def _mean(total: float, count: int) -> str:
    return f"{total / count:.3f}" if count else "-"


def class_section(source: Source, overview: Overview, shown: list[ClassStats], names: dict[int, str],
                  layer: str = "") -> str:
    def has(column: str) -> bool:
        return available(source, overview, column)

    head = ["class", "count", "accuracy", "mean prob"]
    means = [(name, prefix) for name, prefix in MEAN_COLUMNS if has(name)]
    zero = overview.zero_maps > 0
    head += ["all-zero maps"] if zero else []
    head += ["pointing hit rate"] if has("pointing_hit") else []
    head += [f"mean {name}" for name, _ in means]
    rows = []
    for stats in shown:
        cells = [f"<td>{_e(_class_label(stats.target_class, names))}</td>", f'<td class="num">{stats.count:,}</td>',
                 f'<td class="num">{_e(_fraction(stats.correct, stats.labeled))}</td>',
                 f'<td class="num">{_mean(stats.prob_sum, stats.count)}</td>']
        if zero:
            cells.append(f'<td class="num">{stats.zero:,}</td>')
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
    if zero:
        undefined = [name for name in UNDEFINED_FOR_ZERO_MAPS if source.has(name)]
        lead += (" All-zero maps: those with no positive evidence"
                 + (f"; they have no {', '.join(undefined)} and are left out of those columns." if undefined else "."))
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
    return (f'<section id="classes"><h2>Per-class statistics</h2><p class="lead">Rank-0 maps of layer '
            f'{_layer(layer)}. {_e(lead)}</p>'
            f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _legend() -> str:
    bar = colormap(np.tile(np.linspace(0, 1, 160), (12, 1)))
    return (f'<div class="legend">low <img class="legend" alt="colour scale" src="{data_uri(bar)}"> high '
            f"<span>(each map scaled to its own min-max)</span></div>")


def means_section(shown: list[ClassStats], scan: MapScan, names: dict[int, str], layer: str = "") -> str:
    tiles = []
    for stats in shown:
        mean = scan.means.get(stats.target_class)
        if mean is None:
            continue
        label = _class_label(stats.target_class, names)
        count = scan.counts.get(stats.target_class, stats.count)
        left_out = scan.zero.get(stats.target_class, 0)
        tiles.append(f'<figure><img class="mean" alt="mean map of class {_e(label)}" '
                     f'src="{data_uri(heatmap(mean, MEAN_SIZE))}"><figcaption><span class="id" tabindex="0" '
                     f'title="{_e(label)}">{_e(label)}</span>{count:,} map{"s" if count != 1 else ""}, '
                     f'{mean.shape[0]}x{mean.shape[1]}'
                     + (f", {left_out:,} all-zero left out" if left_out else "") + "</figcaption></figure>")
    lead = "The mean of each class's rank-0 maps, for the classes of the table above."
    left_out = sum(scan.zero.get(stats.target_class, 0) for stats in shown)
    if left_out:
        lead += (f" {left_out:,} all-zero maps (no positive evidence) are left out of the means: they would only "
                 "dim them.")
    blank = [stats.target_class for stats in shown
             if stats.target_class not in scan.means and stats.target_class not in scan.mixed
             and scan.zero.get(stats.target_class)]
    if blank:
        lead += f" No mean (every map all zero): {', '.join(str(c) for c in blank)}."
    mixed = [stats.target_class for stats in shown if stats.target_class in scan.mixed]
    if mixed:
        lead += f" Skipped (maps of several sizes): {', '.join(str(c) for c in mixed)}."
    return (f'<section id="means"><h2>Class-mean maps</h2><p class="lead">Layer {_layer(layer)}. {_e(lead)}</p>'
            f'{_legend()}'
            f'<div class="grid means">{"".join(tiles)}</div></section>')


def _prediction(row: dict, fallback: bool):
    """The predicted class of a rank-0 gallery row: pred_class, else (cam.targets = pred or topk)
    the rank-0 target, which is the prediction; None where neither is known."""
    if row.get("pred_class") is not None:
        return row["pred_class"]
    return row["target_class"] if fallback else None


def _mispredicted(row: dict, fallback: bool) -> bool:
    predicted = _prediction(row, fallback)
    return row.get("label") is not None and predicted is not None and predicted != row["label"]


def _outlined(row: dict, scan: MapScan, images: Images) -> bool:
    """Whether the card draws the object box: over the dataset's image, not on a stored heatmap."""
    slot = (row["shard"], row["sample_id"])
    return (slot in images.boxes and slot in images.pictures and slot not in images.heatmaps
            and slot in scan.maps)


def _card(row: dict, key: str, scan: MapScan, images: Images, fallback: bool = False) -> str:
    slot = (row["shard"], row["sample_id"])
    cam = scan.maps.get(slot)
    picture = images.pictures.get(slot)
    names = images.class_names
    wrong = _mispredicted(row, fallback)
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
    # the id is cut to the card's width: hovering or focusing it (tab) shows it whole, and so does its title
    caption = (f'<span class="id" tabindex="0" title="{_e(row["sample_id"])} ({_e(row["shard"])})">'
               f'{_e(row["sample_id"])}</span>'
               + "".join(f'<span class="d">{_e(detail)}</span>' for detail in details))
    if wrong:
        caption = ('<span class="wrong" title="the label differs from the predicted class">\u2717 mispredicted'
                   '</span>' + caption)
    stored = images.heatmaps.get(slot)
    classes = ["wrong"] if wrong else []
    if stored is not None:  # the run's own picture of the map over the crop
        src = data_uri(stored, "JPEG", CARD_SIZE)
        classes.insert(0, "stored")
    elif cam is None:
        classes.insert(0, "missing")
        return (f'<figure class="{" ".join(classes)}"><div class="blank">map not readable</div>'
                f"<figcaption>{caption}</figcaption></figure>")
    elif picture is not None:
        src = data_uri(overlay(picture, cam, images.boxes.get(slot)), "JPEG", CARD_SIZE)
    else:
        src = data_uri(heatmap(cam, min(CARD_SIZE, images.crop)), "JPEG")
        reason = images.problems.get(slot)
        if reason and (images.pictures or reason not in (images.note or "")):  # else the page says it once
            caption += f'<span class="why">{_e(reason)}</span>'
    figure = f'<figure class="{" ".join(classes)}">' if classes else "<figure>"
    return (f'{figure}<img class="cam" alt="map of {_e(row["sample_id"])}" src="{src}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _ties(key: str, rows: list[dict], tied_beyond: bool) -> str:
    """A run of equal values is no ranking: say so where the gallery's cards hold one."""
    statistic = GALLERY_STATISTIC[key]
    values = [row[statistic] for row in rows]
    if len(values) > 1 and len(set(values)) == 1:
        more = ", and so do maps not shown" if tied_beyond else ""
        return (f'<p class="warn tie">All {len(values)} cards have the same {statistic} ({values[0]:.4g}){more}: a '
                "tie, not a ranking; they are listed by shard and sample id.</p>")
    if tied_beyond:
        return (f'<p class="note">The last card\'s {statistic} ({values[-1]:.4g}) is shared by maps not shown: '
                "among those, the cards are picked by shard and sample id, not by rank.</p>")
    return ""


def _gallery_notes(rows: list[dict], scan: MapScan, images: Images, fallback: bool) -> str:
    """What the marks on this gallery's cards mean, said where such cards are."""
    notes = []
    if any(_outlined(row, scan, images) for row in rows):
        notes.append("White outlines: the object box of samples that have one.")
    if any((row["shard"], row["sample_id"]) in images.heatmaps for row in rows):
        notes.append("Cards of rows with a heatmap_png show the picture the run stored: its map blended over the "
                     "crop (without box outlines).")
    if any(_mispredicted(row, fallback) for row in rows):
        predicted = "pred_class, else the rank-0 target (the prediction)" if fallback else "pred_class"
        notes.append(f"A red frame and \u2717 mispredicted: the sample's label differs from the predicted class "
                     f"({predicted}).")
    return "".join(f'<p class="note">{_e(note)}</p>' for note in notes)


def gallery_sections(source: Source, overview: Overview, per_gallery: int, scan: MapScan, images: Images,
                     layer: str = "") -> str:
    intro = f"Each gallery shows rank-0 maps of layer {_layer(layer)}; a card's id shows whole on hover or focus."
    if overview.zero_maps:
        intro += (f" The {overview.zero_maps:,} all-zero maps (no positive evidence) are left out: their values "
                  "rank nothing and their pictures show nothing.")
    parts = [f'<section id="galleries"><h2>Galleries</h2><p class="lead">{intro}</p>']
    if images.read_from:
        parts.append(f'<p class="note read-from">The gallery images were read back from {_e(images.read_from)}, '
                     "each file checked against the run's listing (path, size, modification time) before it was "
                     "read and each image's bytes against the <code>image_digest</code> its rows record before "
                     "it was shown. <code>--no-images</code> writes the page without reading the dataset.</p>")
    if images.note:
        parts.append(f'<p class="warn">Images: {_e(images.note)}; cards without an image show the map alone.</p>')
    parts.append("</section>")
    fallback = targets_are_predictions(source)
    for key, heading, what, needs in GALLERIES:
        rows = overview.galleries.get(key) or []
        if needs and not source.has(needs):
            body = f'<p class="note">Not available: this output has no {_e(needs)} column.</p>'
        elif needs and not overview.filled(needs):
            why = ""
            if needs == "pointing_hit":
                why = (" (the samples have no boxes, or every map with one is all zero)" if overview.zero_maps
                       else " (the samples have no boxes)")
            elif needs in UNDEFINED_FOR_ZERO_MAPS and overview.zero_maps:
                why = " (all-zero maps have none)"
            body = f'<p class="note">Not available: no row of this output has a {_e(needs)} value{why}.</p>'
        elif per_gallery == 0:
            body = '<p class="note">Galleries are off (--per-gallery 0).</p>'
        elif not rows:
            left_out = " (all-zero maps are left out)" if overview.zero_maps else ""
            body = f'<p class="note">No maps qualify{left_out}.</p>'
        else:
            cards = "".join(_card(row, key, scan, images, fallback) for row in rows)
            body = (f'<p class="lead">{_e(what.capitalize())}.</p>{_ties(key, rows, overview.tied_beyond.get(key))}'
                    f'{_gallery_notes(rows, scan, images, fallback)}<div class="grid">{cards}</div>')
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
           errors_total: int, errors: list[dict], per_gallery: int, strategies: str = "", crosscheck: str = "") -> str:
    """The page; `strategies`, `crosscheck`: the Strategies and Cross-check sections' HTML
    (strategies_page, crosscheck_page), "" to leave them out."""
    names = images.class_names
    title = f"gradcam-batch report: {source.manifest.get('model') or source.output_dir.name}"
    nav = "".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in
                  [("summary", "Summary"), ("classes", "Classes"), ("means", "Class means"),
                   *([("strategies", "Strategies")] if strategies else []),
                   *([("crosscheck", "Cross-check")] if crosscheck else []), ("galleries", "Galleries"),
                   *((f"gallery-{key}", heading) for key, heading, *_ in GALLERIES), ("errors", "Errors")])
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    alarm = ""
    if overview.zero_maps * 2 > overview.maps:  # most maps say nothing: before anything else on the page
        alarm = (f'<div class="alarm" role="alert"><strong>Warning: {overview.zero_maps:,} of {overview.maps:,} '
                 f"rank-0 maps of layer {_layer(layer)} are all zero</strong> (no positive evidence: "
                 "cam_max_raw = 0). The model's scores do not rise with this layer's activations: often a head "
                 "with zero or untrained weights (a torchvision model without model.weights), or the wrong layer. "
                 "These maps explain nothing; they are left out of the galleries, the class means and the map "
                 "statistics below.</div>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><p class=\"lead\">{_e(source.manifest.get('method') or '')} maps of "
        f"<code>{_e(layer or '(unnamed)')}</code> · generated {_e(generated)}</p>{alarm}<nav>{nav}</nav>"
        + summary_section(source, overview, layer, errors_total)
        + class_section(source, overview, shown, names, layer)
        + means_section(shown, scan, names, layer)
        + strategies
        + crosscheck
        + gallery_sections(source, overview, per_gallery, scan, images, layer)
        + errors_section(errors_total, errors)
        + f"<footer>Written by {PROG} ({_e(overview.engine)}). Self-contained: every picture is inlined."
          "</footer></main></body></html>\n")
