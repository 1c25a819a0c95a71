"""Wire the stages together: shards -> loader -> device preprocessing -> engine -> writer.

The loop makes one host copy per batch (finished maps and scores) and hands it to the writer
thread; nothing flows back to an earlier stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import gradcam_batch
from gradcam_batch import UserError, dist
from gradcam_batch.config import Config
from gradcam_batch.data.demo import ensure_demo_shards
from gradcam_batch.data.device_decode import DeviceDecoder
from gradcam_batch.data.loader import build_loader
from gradcam_batch.data.prefetch import DecodeBalance, DevicePrefetcher, Preprocess
from gradcam_batch.data.shards import Shard, check_output_apart, list_shards
from gradcam_batch.data.units import Unit, list_units, listing_change, listing_record
from gradcam_batch.audit import RowExtras, localization_sums, row_extras
from gradcam_batch.engine import CamEngine
from gradcam_batch.models import load_model, resolve_target_layers
from gradcam_batch.summary import Summary, combined_clocks
from gradcam_batch.timing import RunClock
from gradcam_batch.output_folder import (OutputLock, check_entries, check_parts, clean_temporaries, clear_output,
                                         config_hash, config_identity, counts_on_disk, foreign_entry, read_manifest,
                                         write_manifest)
from gradcam_batch.writer import MANIFEST_NAME, OutputWriteError, ParquetShardWriter, ShardOutput, completed_units

log = logging.getLogger("gradcam_batch")


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device=cuda but no CUDA device is available; use runtime.device=auto or cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())


def resolve_amp(requested: str, device: torch.device) -> torch.dtype | None:
    if requested == "off" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested == "fp16" and device.type != "cuda":
        raise UserError("runtime.amp=fp16 needs CUDA; use runtime.amp=bf16 or off on CPU")
    return torch.float16 if requested == "fp16" else torch.bfloat16


def _metadata(cfg: Config, resolved: dict, layer: str) -> dict:
    import pyarrow
    import torchvision

    return {
        "config": resolved,
        "model": cfg.model.name or cfg.model.source,
        "target_layer": layer,
        "method": cfg.cam.method,
        "preprocessing": {key: getattr(cfg.data, key) for key in ("resize", "crop", "mean", "std", "interpolation")},
        "versions": {"gradcam_batch": gradcam_batch.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pyarrow": pyarrow.__version__,
                     "python": platform.python_version()},
    }


def hold_output(output_dir: Path, overwrite: bool) -> OutputLock:
    """Take the output folder for this run: rank 0 locks it before any rank writes, then the
    other ranks join its lock. Refused on rank 0 (another run holds the folder, or overwrite
    would clear a folder that is not ours), every rank raises the same one-line error rather
    than wait at the next collective for a rank that has left."""
    lock, failure = None, None
    if dist.is_main():
        try:
            check_entries(output_dir)  # again: a link planted while the model loaded is refused too
            if overwrite:
                refuse_foreign_folder(output_dir)  # before the lock file, which would be one more file there
            lock = OutputLock(output_dir)
        except (UserError, OutputWriteError) as error:
            failure = error
    failure = dist.gather(failure, "the output folder's lock")[0]
    if failure is not None:
        raise failure
    return lock if lock is not None else OutputLock(output_dir, join=True)


def refuse_foreign_folder(output_dir: Path) -> None:
    """output.overwrite=true deletes only this tool's files, and only in a folder that was an
    output folder: one holding anything else and no manifest is likely a wrong path."""
    if (output_dir / MANIFEST_NAME).is_file():
        return
    foreign = foreign_entry(output_dir)
    if foreign is not None:
        raise UserError(f"output.dir={str(output_dir)!r} holds {foreign} and no {MANIFEST_NAME}: it is not an output "
                        "folder of gradcam-batch, and output.overwrite=true only replaces those; "
                        "use a new or empty output.dir")


def prepare_output(output_dir: Path, overwrite: bool, manifest: dict | None, unit_ids: list[str]) -> dict:
    """Rank 0, holding the lock, before any rank writes: clear the folder (overwrite) or drop
    stale temporaries and the units whose files do not hold up. Returns the rows and errors of
    the complete units, for the manifest, so a resume that is itself interrupted keeps them."""
    if overwrite:
        clear_output(output_dir)
        return {}
    clean_temporaries(output_dir)
    return check_parts(output_dir, unit_ids, (manifest or {}).get("units") or {})


def check_output_dir(output_dir: Path) -> None:
    """output.dir can be created and written: checked before anything else runs, so a wrong
    path is one line, not a traceback after the model was built."""
    existing = output_dir
    while not existing.exists():
        if existing.is_symlink() or existing.parent == existing:  # a dangling link, or no parent at all
            break
        existing = existing.parent
    what = "output.dir" if existing == output_dir else f"output.dir's parent {str(existing)!r}"
    if existing.exists() and not existing.is_dir():
        raise UserError(f"output.dir={str(output_dir)!r}: {what} is a file, not a folder; "
                        "pass a folder path (it is created if missing)")
    if not existing.exists() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output.dir={str(output_dir)!r}: {what} cannot be written by this user; "
                        "pass a folder you can write to")
    if existing == output_dir:
        check_entries(output_dir)  # no link among its own entries: before the demo's data or the lock is written


def check_resume(output_dir: Path, resolved: dict, overwrite: bool) -> dict | None:
    """Refuse to mix rows of different runs in one output directory; returns the manifest a
    resume continues (None for a fresh start)."""
    if overwrite:
        return None
    manifest = read_manifest(output_dir)
    if manifest is None:
        if any((output_dir / "cams").glob("part-*.parquet")):
            raise UserError(f"output.dir={str(output_dir)!r} holds part files but no {MANIFEST_NAME}; "
                            "use another output.dir or output.overwrite=true")
        return None
    if manifest.get("config_hash") == config_hash(resolved):
        return manifest
    if not completed_units(output_dir):
        # a run that completed no unit (a mistake stopped it) holds nothing to protect
        log.info("%s holds no complete unit of its earlier run; starting afresh", output_dir)
        return None
    before, now = manifest.get("identity", {}), config_identity(resolved)
    changed = [f"{group}.{key}" for group in now for key in now[group]
               if before.get(group, {}).get(key) != now[group][key]]
    raise UserError(f"output.dir={str(output_dir)!r} holds results of a different run "
                    f"({', '.join(changed) or 'config'} changed); use another output.dir "
                    "or output.overwrite=true to replace them")


def work_units(cfg: Config, output_dir: Path, shards: list[Shard],
               manifest: dict | None) -> tuple[list[Unit], int | None, dict]:
    """The run's work units, the unit size that made them and their listing record.

    Part files are named by unit, so a resume must cut the shards exactly as the run it
    continues did: it keeps the recorded data.unit_size (a different one only applies to a fresh
    output.dir), and a listing that no longer matches the manifest (a shard changed, added or
    removed) is refused in one line rather than risk a sample written twice or never. A manifest
    without a recorded unit size kept every shard whole."""
    unit_size = cfg.data.unit_size
    if manifest is not None:
        recorded = manifest.get("unit_size")
        if recorded != unit_size:
            log.warning("data.unit_size=%d ignored: %s was started with %s; resuming with that split "
                        "(output.overwrite=true starts over with the new one)", unit_size, output_dir,
                        f"data.unit_size={recorded}" if recorded else "every shard as one unit")
        unit_size = recorded
    units = list_units(shards, unit_size, id_column=cfg.data.id_column)
    listing = listing_record(units)
    if manifest is not None:
        if "listing" in manifest:
            change = listing_change(manifest["listing"], listing)
        else:
            before, now = manifest.get("shard_ids", []), [unit.shard_id for unit in units]
            change = None if before == now else f"the shard list changed ({len(before)} -> {len(now)} shards)"
        if change:
            raise UserError(f"output.dir={str(output_dir)!r} was started on different data: {change}; "
                            "resume on the same data, or use another output.dir or output.overwrite=true")
    return units, unit_size, listing


def _manifest(cfg: Config, resolved: dict, layer: str, unit_size: int | None, listing: dict, status: str,
              **extra) -> dict:
    return {"status": status, "config_hash": config_hash(resolved), "identity": config_identity(resolved),
            "shard_ids": list(listing["shards"]), "unit_size": unit_size, "listing": listing,
            **_metadata(cfg, resolved, layer), "world_size": dist.world_size(), **extra}


def _kept_run(manifest: dict | None, units_written: int) -> dict:
    """A rerun that found every unit complete records its own this_run (0 images, 0 img/s); it
    keeps the last run that did work as last_run, so the folder still says how fast that was."""
    if units_written or not manifest:
        return {}
    earlier = manifest.get("this_run") or {}
    if earlier.get("images") or earlier.get("errors"):
        return {"last_run": earlier}
    return {"last_run": manifest["last_run"]} if manifest.get("last_run") else {}


def _unit_counts(counts: dict[str, dict]) -> dict[str, dict[str, int]]:
    """What the manifest records per unit: its rows and errors. The unit's own totals (pointing
    sums, zero maps) stay in its part file's footer, which the run's totals are summed from."""
    return {unit_id: {"rows": unit["rows"], "errors": unit["errors"]} for unit_id, unit in counts.items()}


def _shard_counts(units: list[Unit], counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Rows and errors per shard, for the shards whose every unit is complete."""
    by_shard: dict[str, list[Unit]] = {}
    for unit in units:
        by_shard.setdefault(unit.shard_id, []).append(unit)
    return {shard_id: {key: sum(counts[unit.unit_id][key] for unit in members) for key in ("rows", "errors")}
            for shard_id, members in by_shard.items() if all(unit.unit_id in counts for unit in members)}


def _rounded(values) -> list:
    return [round(float(value), 4) for value in values]


def _target_layers(model, requested, sample: torch.Tensor):
    """resolve_target_layers, with a model that cannot take the input size said in one line."""
    try:
        return resolve_target_layers(model, requested, sample)
    except (RuntimeError, ValueError, AssertionError) as error:
        first = " ".join(str(error).split())[:200]
        raise UserError(f"the model cannot run on {sample.shape[-1]}x{sample.shape[-1]} inputs ({first}); "
                        "set data.crop to the size it was built for, or leave data.crop unset to use its own") from error


def _prepare(cfg: Config, device: torch.device):
    """Everything that can fail on user input, before anything is written."""
    check_output_apart(cfg.data, cfg.output.dir)  # first: it takes a moment, the model takes seconds
    # the data is listed before the model is built: a missing data.root or shard is said at once,
    # not after seconds of loading weights (the demo's data is generated once the rest is known good)
    shards = None if cfg.data.format == "demo" else list_shards(cfg.data)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    amp_dtype = resolve_amp(cfg.runtime.amp, device)
    channels_last = cfg.runtime.channels_last  # NHWC convolutions are faster on CPU too (1.2-1.4x measured)
    model, recipe = load_model(cfg.model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # data.resize, crop, mean, std and interpolation left null take the model's own recipe
    cfg.data = cfg.data.resolved(recipe)
    sample = torch.zeros(1, 3, cfg.data.crop, cfg.data.crop, device=device)
    layers = _target_layers(model, cfg.model.target_layer, sample)
    with torch.no_grad():
        num_classes = model(sample).shape[1]
    engine = CamEngine(model, layers, cfg.cam, device, amp_dtype, num_classes=num_classes)
    layer_name = ",".join(layer.name for layer in layers)
    _check_resized_maps_fit(cfg, len(layers) + (cfg.cam.fuse is not None))
    if shards is None:
        root = Path(cfg.output.dir) / "demo-data"  # never outside output.dir
        demo_settings = (cfg.data.demo_images, cfg.data.demo_shortcut_class, cfg.data.demo_shortcut_share)
        if dist.is_main():
            ensure_demo_shards(root, *demo_settings)
        dist.barrier()
        shards = list_shards(cfg.data, files=ensure_demo_shards(root, *demo_settings))
    if cfg.model.source in ("timm", "huggingface"):  # the model's recipe, not the familiar ImageNet one
        log.info("preprocessing: resize %d, crop %d, %s, mean %s, std %s (defaults from %s)", cfg.data.resize,
                 cfg.data.crop, cfg.data.interpolation, _rounded(cfg.data.mean), _rounded(cfg.data.std),
                 recipe.source)
    return channels_last, engine, layer_name, shards


# What the resized maps of the batches in flight may take in host memory (float32 while made,
# float16 stored, the writer's queue plus the batch in hand): the README promises < 2 GB a run.
RESIZED_MAPS_BUDGET = 1 << 30


def _check_resized_maps_fit(cfg: Config, layer_count: int) -> None:
    """output.cam_size=[1000,1000] with a batch of 100 held 4.5 GB in the writer's queue: refuse a
    combination whose maps in flight exceed the budget, naming the settings that shrink it."""
    if cfg.output.cam_size == "layer":
        return
    height, width = ((cfg.data.crop, cfg.data.crop) if cfg.output.cam_size == "input"
                     else tuple(cfg.output.cam_size))
    rows = cfg.data.batch_size * cfg.cam.num_targets * layer_count
    in_flight = (cfg.output.queue_size + 2) * rows * height * width * 6
    if in_flight > RESIZED_MAPS_BUDGET:
        raise UserError(f"output.cam_size={cfg.output.cam_size!r} ({height}x{width}) with data.batch_size="
                        f"{cfg.data.batch_size}, {rows // cfg.data.batch_size} maps per image and output.queue_size="
                        f"{cfg.output.queue_size} would hold {in_flight / 2**30:.1f} GiB of resized maps; lower one "
                        f"of them (at most {RESIZED_MAPS_BUDGET / 2**30:.0f} GiB)")


def run(cfg: Config, resolved: dict | None = None) -> Summary:
    clock = RunClock()
    start = clock.started
    resolved = resolved or {}
    # output.dir may be a link (the user's choice): followed once, here, so every later step works
    # in one real folder; links inside it are refused (check_entries), never followed
    output_dir = Path(os.path.realpath(cfg.output.dir))
    cfg.output.dir = str(output_dir)
    device = resolve_device(cfg.runtime.device)
    dist.init(device, cfg.runtime.dist_timeout_minutes)
    lock = None
    try:
        cfg.data.check_settings_used()
        cfg.check_all_targets()
        check_output_dir(output_dir)
        channels_last, engine, layer_name, shards = _prepare(cfg, device)
        lock = hold_output(output_dir, cfg.output.overwrite)
        manifest = check_resume(output_dir, resolved, cfg.output.overwrite)
        units, unit_size, listing = work_units(cfg, output_dir, shards, manifest)
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        if len(set(dist.gather(digest, "the start (listing the data)"))) > 1:  # each rank lists for itself
            raise UserError("the ranks listed different data (a shard changed while the job started); rerun")
        all_ids = [unit.unit_id for unit in units]
        dist.barrier("the start (reading the old manifest)")  # every rank has read it before rank 0 replaces it
        if dist.is_main():
            verified = prepare_output(output_dir, cfg.output.overwrite, manifest, all_ids)
            write_manifest(output_dir, _manifest(cfg, resolved, layer_name, unit_size, listing, "running",
                                                 units=_unit_counts(verified)))
        dist.barrier("the start (the output folder prepared)")
        mine = dist.assign(units, dist.rank(), dist.world_size())
        done = completed_units(output_dir)
        todo = [unit for unit in mine if unit.unit_id not in done]
        if len(todo) < len(mine):
            log.info("resuming: %d of %d units already complete", len(mine) - len(todo), len(mine))
        if cfg.model.source in ("torchvision", "timm") and cfg.model.weights is None and dist.is_main():
            log.warning("model.weights=null: %s has random weights (seed %d); its maps explain nothing real",
                        cfg.model.name, cfg.model.seed)
        local = _process(cfg, resolved, device, channels_last, engine, layer_name, todo, clock)
        local["shards_skipped"] = len(mine) - len(todo)
        local["seconds"] = time.perf_counter() - start
        local.update(clock.as_dict())
        ranks = dist.gather(local, "the end of the run (every rank's last unit)")
        summary = Summary(
            images=sum(r["images"] for r in ranks), rows=sum(r["rows"] for r in ranks),
            errors=sum(r["errors"] for r in ranks), shards_written=sum(r["shards_written"] for r in ranks),
            shards_skipped=sum(r["shards_skipped"] for r in ranks), seconds=max(r["seconds"] for r in ranks),
            images_per_second=0.0, output_dir=str(output_dir), target_layer=layer_name,
            pointing_hits=0, pointing_total=0,  # the folder's totals, filled in on rank 0 below
            fuse=cfg.cam.fuse, **combined_clocks(ranks))
        summary.images_per_second = summary.images / summary.seconds if summary.seconds else 0.0
        if dist.is_main():
            counts = counts_on_disk(output_dir, all_ids)
            missing = [unit_id for unit_id in all_ids if unit_id not in counts]
            # The pointing game and the zero maps over exactly the units in cams/, each unit's own
            # totals read from its part file: a unit finished by a killed run counts, a redone one
            # counts once, whichever run wrote it.
            present = [counts[unit_id] for unit_id in all_ids if unit_id in counts]
            without = sum(1 for unit in present if "pointing" not in unit)
            if without:
                log.warning("%d units carry no totals of their own (written by an earlier version): the pointing and "
                            "zero-map totals leave them out; output.overwrite=true redoes them", without)
            pointing, zero_maps = summary.use_folder_totals(present)
            summary.stored_rows = sum(c["rows"] for c in counts.values())
            summary.stored_errors = sum(c["errors"] for c in counts.values())
            summary.stored_units = len(counts)
            write_manifest(output_dir, _manifest(
                cfg, resolved, layer_name, unit_size, listing, "complete" if not missing else "incomplete",
                shards=_shard_counts(units, counts), units=_unit_counts(counts), rows=summary.stored_rows,
                **_kept_run(manifest, summary.shards_written),
                errors=summary.stored_errors, pointing=pointing, zero_maps=zero_maps,
                this_run={"images": summary.images, "rows": summary.rows, "errors": summary.errors,
                          "seconds": round(summary.seconds, 3),
                          "images_per_second": round(summary.images_per_second, 2),
                          "seconds_to_first_batch": summary.seconds_to_first_batch,
                          "seconds_to_first_batch_after_imports": summary.seconds_to_first_batch_after_imports,
                          "steady_images_per_second": summary.steady_images_per_second,
                          "ranks": [{k: r.get(k) for k in ("images", "errors", "seconds", "seconds_to_first_batch",
                                                           "steady_images_per_second", "input")}
                                    for r in ranks]}))
            warning = summary.zero_maps_warning()
            if warning:
                log.warning(warning)
        dist.barrier("the end of the run (the manifest written)")
        return summary
    finally:
        dist.shutdown()
        if lock is not None:
            lock.release()  # after every rank is done: a new run may take the folder now


def _note_unreadable_unit(unit_counts: dict, batch, images: int) -> None:
    """Say on stderr when a unit ends with every sample an error: usually the wrong data format
    or reader settings (data=webdataset on Parquet files), which error rows alone would hide."""
    counts = unit_counts.setdefault(batch.unit_id or batch.shard_id, [0, 0, None])
    counts[0] += images
    counts[1] += len(batch.errors)
    if counts[2] is None and batch.errors:
        counts[2] = batch.errors[0]
    if batch.last:
        del unit_counts[batch.unit_id or batch.shard_id]
        if counts[0] == 0 and counts[1]:
            _, stage, error_type, message = counts[2]
            log.warning("nothing could be read from %s: all %d samples are errors (first: %s %s: %s)",
                        batch.unit_id or batch.shard_id, counts[1], stage, error_type, message[:200])


def _process(cfg: Config, resolved: dict, device, channels_last, engine: CamEngine, layer_name: str, todo,
             clock: RunClock) -> dict:
    """This rank's work units through the device and into the writer; returns its counts."""
    from tqdm import tqdm

    total = sum(unit.samples for unit in todo) if all(unit.samples is not None for unit in todo) else None
    preprocess = Preprocess(cfg.data.mean, cfg.data.std, device, channels_last)
    mode = cfg.data.decode
    if mode == "auto":
        # Measured on an H100 with 15 workers (benchmarks/results/h100-decode-modes-2026-11-27.md):
        # the workers alone fed ResNet-50 and ResNet-152 faster than any share of device decoding,
        # which takes its SMs from the model.
        mode = "workers"
    decoder = (DeviceDecoder(cfg.data.resize, cfg.data.crop, device, max_pixels=cfg.data.max_pixels,
                             interpolation=cfg.data.interpolation)
               if mode in ("device", "mixed") else None)
    balance = DecodeBalance(share=cfg.data.device_share) if mode == "mixed" else None
    loader = build_loader(todo, cfg.data, pin_memory=device.type == "cuda", device_decode=decoder is not None,
                          balance=balance)
    images = rows = errors = 0
    unit_counts: dict[str, list] = {}  # unit id -> [images, errors, first error] while it is read
    # The prefetcher comes last, so it is the first to stop when the loop ends or fails.
    with ParquetShardWriter(cfg.output.dir, _metadata(cfg, resolved, layer_name),
                            cfg.output.compression, cfg.output.queue_size) as writer, \
            tqdm(total=total, unit="img", disable=not cfg.runtime.progress or not dist.is_main(),
                 dynamic_ncols=True, leave=False) as bar, \
            DevicePrefetcher(loader, device, preprocess, decoder, depth=2, balance=balance) as prefetcher:
        for ready in prefetcher:
            batch = ready.batch  # device-decode failures are already among its error rows
            count = len(batch.sample_ids)
            errors += len(batch.errors)
            if count:
                result = engine.explain(ready.images, ready.labels)
                extras = [extra.to_host() for extra in row_extras(cfg, result, ready.images, batch.boxes, engine,
                                                                   preprocess)]
                result = result.to_host()  # one synchronisation for the maps and their extras
                # what the batch adds to its unit's totals, kept in the unit's part file: the
                # pointing game over the fused maps where there are, else the last layer's
                # (summary.default_layer); the zero maps of every layer
                totals = {"pointing": localization_sums(extras[-1]),
                          "zero_maps": sum(int(extra.map_empty.sum()) for extra in extras)}
                if cfg.cam.targets == "all":
                    # most classes have no positive evidence in an image: the zero maps that say
                    # something about the run are those of the top-ranked class
                    totals["zero_maps"] = sum(int(extra.map_empty[:, 0].sum()) for extra in extras)
                    totals["maps_checked"] = count * len(extras)
                rows += result.target_classes.numel() * len(result.layers)
                images += count
                out = ShardOutput(batch.shard_id, batch.sample_ids, batch.labels.numpy(),
                                  result.target_classes.numpy(), result.scores.numpy(), result.probs.numpy(),
                                  [maps.cams.numpy() for maps in result.layers],
                                  [maps.cam_mean.numpy() for maps in result.layers],
                                  [maps.peak.numpy() for maps in result.layers],
                                  batch.errors, batch.last, unit_id=batch.unit_id,
                                  layers=[maps.name for maps in result.layers],
                                  predictions=result.predictions.numpy(),
                                  layer_columns=[{"cam_max_raw": maps.raw_max.numpy(),
                                                  **{key: value.numpy() for key, value in maps.statistics.items()},
                                                  **extra.numpy()}
                                                 for maps, extra in zip(result.layers, extras)],
                                  totals=totals, image_digests=batch.image_digests)
            else:
                empty = np.empty((0, 1))
                out = ShardOutput(batch.shard_id, [], np.empty(0, np.int64), empty, empty, empty,
                                  np.empty((0, 1, 1, 1), np.float32), empty, empty, batch.errors, batch.last,
                                  unit_id=batch.unit_id,
                                  totals={"pointing": localization_sums(RowExtras()), "zero_maps": 0})
            writer.submit(out)
            _note_unreadable_unit(unit_counts, batch, count)
            clock.batch_done(count)
            bar.update(count + len(batch.errors))
        input_side = prefetcher.stats.as_dict()
    input_side["decode"] = mode
    if balance is not None:
        input_side["balance"] = balance.summary()
    return {"images": images, "rows": rows, "errors": errors, "shards_written": len(todo), "input": input_side}
