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
    pointing_hits: int
    pointing_total: int
    box_energy_sum: float = 0.0  # over the pointing game's maps
    box_iou_sum: float = 0.0
    seconds_to_first_batch: float | None = None  # process start to the first finished batch (slowest rank)
    seconds_to_first_batch_after_imports: float | None = None  # the same from the pipeline's start
    steady_images_per_second: float | None = None  # after the warm-up batches, all ranks together
    stored_rows: int | None = None  # rows and errors in the whole output folder, earlier runs included
    stored_errors: int | None = None
    stored_units: int | None = None

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
            lines = [f"nothing to do: all {self.shards_skipped} units were already complete",
                     f"stored      {self.stored_rows} rows, {self.stored_errors} errors in {self.stored_units} units",
                     f"layer       {self.target_layer}",
                     f"output      {Path(self.output_dir).resolve() / 'cams'}"]
            return lines + self._localization_lines(", stored")
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
        return lines + self._localization_lines("")

    def _localization_lines(self, stored: str) -> list[str]:
        if self.pointing_game is None:
            return []
        return [f"pointing    {self.pointing_game:.3f} ({self.pointing_hits}/{self.pointing_total} "
                f"maps peak inside an object box{stored})",
                f"box energy  {self.box_energy_sum / self.pointing_total:.3f} of the map inside the boxes, "
                f"IoU {self.box_iou_sum / self.pointing_total:.3f} (means over those maps)"]


def combined_clocks(ranks: list[dict]) -> dict:
    """Start-up is the slowest rank's; steady rates add up (None if any rank has none)."""
    def slowest(key):
        values = [r.get(key) for r in ranks]
        return None if any(v is None for v in values) else max(values)

    steady = [r.get("steady_images_per_second") for r in ranks if r.get("images")]
    return {"seconds_to_first_batch": slowest("seconds_to_first_batch"),
            "seconds_to_first_batch_after_imports": slowest("seconds_to_first_batch_after_imports"),
            "steady_images_per_second": None if not steady or None in steady else round(sum(steady), 2)}
