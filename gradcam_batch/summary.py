"""The run summary: what the command prints at the end, and what the manifest records of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def default_layer(target_layer: str, fuse: Optional[str] = None) -> str:
    """The layer whose rows the run summary and the report speak of when an output holds several:
    the fused maps when cam.fuse wrote them, else the last target layer as listed (the deepest, as
    usual for Grad-CAM). `target_layer` is the manifest's comma-joined list of resolved names."""
    names = [name for name in (target_layer or "").split(",") if name]
    if fuse and len(names) > 1:
        return f"{fuse}({','.join(names)})"
    return names[-1] if names else ""


@dataclass
class Summary:
    images: int
    rows: int
    errors: int
    shards_written: int
    shards_skipped: int
    seconds: float
    images_per_second: float
    output_dir: str
    target_layer: str
    # The pointing game and the zero maps speak for the whole output folder (every complete unit,
    # whichever run wrote it; use_folder_totals), the lines above them for this run.
    pointing_hits: int
    pointing_total: int
    box_energy_sum: float = 0.0  # over the pointing game's maps
    box_iou_sum: float = 0.0
    pointing_empty: int = 0  # rank-0 maps of samples with boxes left out of the pointing game: all zero
    boxes_outside_crop: int = 0  # samples whose boxes all lie outside the crop, left out of the box metrics
    zero_maps: int = 0  # maps (every layer and target) with no positive evidence, of maps_checked
    maps_checked: int = 0
    fuse: Optional[str] = None  # cam.fuse: the pointing game is over the fused maps (default_layer)
    seconds_to_first_batch: float | None = None  # process start to the first finished batch (slowest rank)
    seconds_to_first_batch_after_imports: float | None = None  # the same from the pipeline's start
    steady_images_per_second: float | None = None  # after the warm-up batches, all ranks together
    stored_rows: int | None = None  # rows and errors in the whole output folder, earlier runs included
    stored_errors: int | None = None
    stored_units: int | None = None

    def use_folder_totals(self, units: list[dict]) -> tuple[dict, dict]:
        """Take the pointing game's sums and the zero-map count over the output folder's complete
        units (their manifest entries, `rows` and the unit's own `pointing` and `zero_maps` as its
        part file's footer holds them, in a fixed order so the float sums come out the same
        however the units were written); returns them as the manifest records them."""
        pointing = {"hits": 0, "total": 0, "energy_sum": 0.0, "iou_sum": 0.0, "empty": 0, "outside_crop": 0}
        zero_maps = {"zero": 0, "maps": 0}
        for unit in units:
            if "pointing" not in unit:  # written by an earlier version: its own totals are unknown
                continue
            for key in pointing:
                pointing[key] += unit["pointing"].get(key, 0)
            zero_maps["zero"] += unit.get("zero_maps", 0)
            zero_maps["maps"] += unit.get("maps_checked", unit["rows"])  # cam.targets=all: rank 0 only
        self.pointing_hits, self.pointing_total = pointing["hits"], pointing["total"]
        self.box_energy_sum, self.box_iou_sum = pointing["energy_sum"], pointing["iou_sum"]
        self.pointing_empty, self.boxes_outside_crop = pointing["empty"], pointing["outside_crop"]
        self.zero_maps, self.maps_checked = zero_maps["zero"], zero_maps["maps"]
        return pointing, zero_maps

    @property
    def samples_seen(self) -> int:
        return self.images + self.errors

    @property
    def pointing_game(self) -> float | None:
        return self.pointing_hits / self.pointing_total if self.pointing_total else None

    def _start_up_lines(self) -> list[str]:
        lines = []
        if self.steady_images_per_second:
            lines.append(f"steady      {self.steady_images_per_second:.1f} img/s after the first batches")
        if self.seconds_to_first_batch_after_imports is not None:
            since_start = ("" if self.seconds_to_first_batch is None
                           else f"{self.seconds_to_first_batch:.1f} s after process start, ")
            lines.append(f"first batch {since_start}{self.seconds_to_first_batch_after_imports:.1f} s after the imports")
        return lines

    def lines(self) -> list[str]:
        if self.shards_written == 0 and self.shards_skipped and self.stored_rows is not None:
            # a rerun of a finished run: say so, and show what the folder holds
            done = ("the only unit was" if self.shards_skipped == 1
                    else f"all {self.shards_skipped} units were")
            lines = [f"nothing to do: {done} already complete",
                     f"stored      {_count(self.stored_rows, 'row')}, {_count(self.stored_errors, 'error')} "
                     f"in {_count(self.stored_units, 'unit')}",
                     f"layer       {self.target_layer}",
                     f"output      {Path(self.output_dir).resolve() / 'cams'}"]
            return lines + self._zero_lines("stored ") + self._localization_lines(", stored")
        lines = [
            f"images      {self.images}",
            f"rows        {self.rows}",
            f"errors      {self.errors}",
            f"units       {self.shards_written} written, {self.shards_skipped} already complete",
            f"throughput  {self.images_per_second:.1f} img/s ({self.seconds:.1f} s)",
            *self._start_up_lines(),
            f"layer       {self.target_layer}",
            f"output      {Path(self.output_dir).resolve() / 'cams'}",
        ]
        return lines + self._zero_lines("") + self._localization_lines("")

    def _zero_lines(self, stored: str) -> list[str]:
        if not self.maps_checked:
            return []
        return [f"zero maps   {self.zero_maps} of {self.maps_checked} {stored}maps have no positive evidence "
                "(all zero)"]

    def zero_maps_warning(self) -> str | None:
        """A line for stderr when most maps are all zero: the run exits 0 and writes every row,
        which must not be read as a result."""
        if not self.maps_checked or 2 * self.zero_maps <= self.maps_checked:
            return None
        return (f"most maps are empty: {self.zero_maps} of {self.maps_checked} maps are all zero and explain "
                "nothing; usually the model's head has random or zero weights (check model.weights) or "
                "model.target_layer is not a layer the scores depend on")

    def _localization_lines(self, stored: str) -> list[str]:
        layer = default_layer(self.target_layer, self.fuse)
        lines = []
        if self.pointing_game is not None:
            left_out = f"; {self.pointing_empty} boxed maps left out: all zero" if self.pointing_empty else ""
            lines += [f"pointing    {self.pointing_game:.3f} on layer {layer} ({self.pointing_hits}/"
                      f"{self.pointing_total} maps peak inside an object box{left_out}{stored})",
                      f"box energy  {self.box_energy_sum / self.pointing_total:.3f} of the map inside the boxes, "
                      f"IoU {self.box_iou_sum / self.pointing_total:.3f} (means over those maps)"]
        elif self.pointing_empty:
            lines.append(f"pointing    none on layer {layer} "
                         f"(all {self.pointing_empty} boxed maps are all zero{stored})")
        if self.boxes_outside_crop:
            samples = "sample's" if self.boxes_outside_crop == 1 else "samples'"
            lines.append(f"boxes       {self.boxes_outside_crop} {samples} boxes lie outside the crop: "
                         "left out of the box metrics")
        return lines


def combined_clocks(ranks: list[dict]) -> dict:
    """Start-up is the slowest rank's; steady rates add up (None if any rank has none)."""
    def slowest(key):
        values = [r.get(key) for r in ranks]
        return None if any(v is None for v in values) else max(values)

    steady = [r.get("steady_images_per_second") for r in ranks if r.get("images")]
    return {"seconds_to_first_batch": slowest("seconds_to_first_batch"),
            "seconds_to_first_batch_after_imports": slowest("seconds_to_first_batch_after_imports"),
            "steady_images_per_second": None if not steady or None in steady else round(sum(steady), 2)}


def _count(number: int | None, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
