"""The Cross-check section of the page: agreement with another output's method per class, per
strategy cluster of the classes the Strategies section shows, and the pairs that disagree most
with both maps side by side."""

from __future__ import annotations

from typing import Optional

from gradcam_batch.report.crosscheck import AGREE, Agreement, CrossCheck
from gradcam_batch.report.images import Images
from gradcam_batch.report.page import _class_label, _e, _layer
from gradcam_batch.report.pictures import CARD_SIZE, data_uri, heatmap, overlay
from gradcam_batch.report.strategies_page import StrategyView, colour


def _r(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "0.00" if abs(value) < 0.005 else f"{value:+.2f}"  # never "-0.00"


def _share(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _cells(result: Agreement) -> str:
    low = result.median is not None and result.median < AGREE
    return (f'<td class="num">{result.pairs:,}</td><td class="num">{result.rated:,}</td>'
            f'<td class="num{" low" if low else ""}">{_r(result.median)}</td>'
            f'<td class="num">{_share(result.agreeing)}</td>')


HEADER = "<th>maps paired</th><th>rated</th><th>median r</th><th>agreeing</th>"


def _pair(row: dict, check: CrossCheck, images: Images) -> str:
    slot = (row["shard"], row["sample_id"])
    picture = images.pictures.get(slot)
    tiles = []
    for method, values in ((check.method, row["map"]), (check.other_method, row["other_map"])):
        pixels = overlay(picture, values) if picture is not None else heatmap(values, min(CARD_SIZE, images.crop))
        tiles.append(f'<img class="cam" alt="{_e(method)} map of {_e(row["sample_id"])}" title="{_e(method)}" '
                     f'src="{data_uri(pixels, "JPEG", CARD_SIZE)}">')
    caption = (f'<span class="id" tabindex="0" title="{_e(row["sample_id"])} ({_e(row["shard"])})">'
               f'{_e(row["sample_id"])}</span><span class="d">class '
               f'{_class_label(row["target_class"], images.class_names)}</span>'
               f'<span class="d">r {row["agreement"]:+.2f} ({_e(check.method)} | {_e(check.other_method)})</span>')
    return f'<figure class="pair"><div class="pair">{"".join(tiles)}</div><figcaption>{caption}</figcaption></figure>'


def crosscheck_section(check: CrossCheck, shown: list[int], strategies: Optional[StrategyView],
                       images: Images) -> str:
    names = images.class_names
    kinds = f"{_e(check.method)} ({_e(check.kind(check.method))})"
    other_kinds = f"{_e(check.other_method)} ({_e(check.kind(check.other_method))})"
    lead = (f"Each rank-0 map of layer {_layer(check.layer)}, {kinds}, paired with the map of the same image and "
            f"class from <code>{_e(check.other_dir)}</code>, {other_kinds}, layer {_layer(check.other_layer)}: "
            f"{check.pairs:,} of {check.maps:,} maps paired. Agreement r: the Pearson correlation of the two maps on "
            f"the finer grid (1: the same places, 0: unrelated, below 0: opposite places); a pair agrees at r &ge; "
            f"{AGREE}; maps that are constant (all zero: no evidence) are not rated. Overall: median r "
            f"{_r(check.overall.median)}, {_share(check.overall.agreeing)} of {check.overall.rated:,} rated pairs "
            f"agree. Written to <code>{_e(check.path)}</code>.")
    note = ""
    if check.same_kind:
        note = ('<p class="note">Both methods rest on the same kind of evidence: agreement here says little about '
                "whether the evidence is real. Compare with a method of another kind (eigencam or fem: no gradients; "
                "scorecam or ablationcam: perturbation).</p>")
    rows = [f"<tr><td>{_class_label(target_class, names)}</td>{_cells(check.classes[target_class])}</tr>"
            for target_class in shown if target_class in check.classes]
    parts = [f'<section id="crosscheck"><h2>Cross-check: {kinds} against {other_kinds}</h2>'
             f'<p class="lead">{lead}</p>{note}',
             f"<h3>Per class</h3><table><thead><tr><th>class</th>{HEADER}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>" if rows else ""]
    if strategies is not None and strategies.detailed and check.clusters:
        cluster_rows = []
        for view in strategies.detailed:
            for cluster in view.clusters:
                result = check.clusters.get((view.result.target_class, cluster.cluster))
                if result is None:
                    continue
                swatch = f'<span class="swatch" style="background:{colour(cluster.cluster)}"></span>'
                cluster_rows.append(
                    f"<tr><td>{_class_label(view.result.target_class, names)}</td><td>{swatch}{cluster.cluster}"
                    f"{' (tight)' if cluster.tight else ''}</td><td class=\"num\">{cluster.size:,}</td>"
                    f"{_cells(result)}</tr>")
        if cluster_rows:
            parts.append("<h3>Per strategy</h3><p class=\"lead\">The clusters of the Strategies section: a tight "
                         "cluster that another kind of method also sees is a strategy of the model, not of the "
                         "explanation method.</p><table><thead><tr><th>class</th><th>cluster</th><th>maps</th>"
                         f"{HEADER}</tr></thead><tbody>{''.join(cluster_rows)}</tbody></table>")
    if check.disputed:
        figures = "".join(_pair(row, check, images) for row in check.disputed)
        parts.append(f"<h3>Most disputed maps</h3><p class=\"lead\">The pairs of lowest r, {_e(check.method)} "
                     f"left, {_e(check.other_method)} right.</p><div class=\"grid pairs\">{figures}</div>")
    parts.append("</section>")
    return "".join(parts)
