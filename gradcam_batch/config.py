"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under conf/ (shipped as gradcam_batch/conf/) only pick defaults. Validation runs in __post_init__ when the
resolved config is turned into these objects (OmegaConf.to_object), so every error names the
bad value and the fix before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from gradcam_batch import UserError
from gradcam_batch.method_names import ALL_METHODS

DATA_FORMATS = ("demo", "imagefolder", "webdataset", "parquet")
DECODE_MODES = ("auto", "workers", "device", "mixed")
MODEL_SOURCES = ("demo", "torchvision", "timm", "huggingface", "checkpoint")
DEMO_MODEL_NAMES = (None, "shortcut")  # model=demo's model.name: the demo CNN, the planted-shortcut one
FUSE_MODES = ("mean", "max")
TARGET_MODES = ("pred", "topk", "label", "classes", "all")
ALL_TARGETS_METHODS = ("gradcam", "hirescam", "cam")
BACKENDS = ("auto", "torch", "triton")
ANALYTIC_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
INTERPOLATIONS = ("bilinear", "bicubic")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not valid; use one of: {', '.join(allowed)}")


def _parquet_codec(name: Any) -> bool:
    """Whether pyarrow can write Parquet with this compression name ("none": uncompressed)."""
    if not isinstance(name, str):
        return False
    if name.lower() == "none":
        return True
    import pyarrow

    try:
        return pyarrow.Codec.is_available(name)
    except (ValueError, TypeError):  # pyarrow raises ArrowInvalid (a ValueError) for unknown names
        return False


def _at_least(name: str, value: int, low: int) -> None:
    if value is None or value < low:
        raise UserError(f"{name}={value!r} is not valid; it must be an integer >= {low}")


def _within(name: str, value: int, low: int, high: int, why: str) -> None:
    """An integer setting with a ceiling: a value past it would allocate gigabytes or fail deep
    inside a library, after the output folder was prepared."""
    if value is None or not low <= value <= high:
        raise UserError(f"{name}={value!r} is not valid; it must be an integer from {low} to {high} ({why})")


# Ceilings of sizes a user sets (one line before anything runs, instead of gigabytes per image).
MAX_IMAGE_SIDE = 4096  # data.resize / data.crop: 4096^2 RGB floats are 200 MB per image already
MAX_CAM_SIDE = 1024  # output.cam_size=[h, w]: maps are upsampled from a grid of a few dozen cells
MAX_CLASS_INDEX = 2**31 - 1
MIN_STD = 1e-4  # data.std: a smaller one turns every pixel into inf or NaN


@dataclass
class DataConfig:
    format: str = "demo"
    """Where images come from: demo (generated offline), imagefolder, webdataset or parquet."""
    root: Optional[str] = None
    """imagefolder: the directory holding one sub-folder per class. (The demo caches its generated
    images under <output.dir>/demo-data and writes nothing outside output.dir.)"""
    shards: Any = None
    """webdataset / parquet: a glob of shard files, several comma-separated in one string, or a
    list of globs (`data.shards=[a.tar,b.tar]`, which needs no quoting on the command line)."""
    shard_size: int = 1000
    """imagefolder: images per shard (the files are listed in sorted order and cut into shards,
    which data.unit_size may split further)."""
    unit_size: int = 334
    """Samples per work unit. A shard with more samples is split into near-equal units (tar
    samples, Parquet row groups, ImageFolder files; a compressed tar stays whole) that all
    workers and ranks share out, each written as its own part file and resumed on its own.
    334 cuts a 1,000-image shard in 3 and 20,000 images in 60, so 1 shard of 20k and 20 shards
    of 1k both give 15 workers 4 equal units each. A resume keeps the split it started with."""
    image_column: str = "image"
    """parquet: column with the encoded image: binary, or a struct with a `bytes` and/or a `path`
    field, as Hugging Face `datasets` writes it. A cell with bytes is read from its bytes; one
    with only a path reads that file, a relative path from the Parquet file's folder (see
    data.follow_links)."""
    label_column: Optional[str] = "label"
    """parquet: integer label column. The default `label` may be missing (labels unknown); any other
    name must be a column of the data, and null reads no labels."""
    boxes_column: Optional[str] = "boxes"
    """parquet: column of object boxes (a list of [x0, y0, x1, y1] in pixels of the original
    image) for the localization metrics. The default `boxes` may be missing; null reads none.
    webdataset: boxes come from `<key>.json` (`boxes`, or one `box`)."""
    id_column: Optional[str] = None
    """parquet: sample id column; without it ids are `<shard stem>/<row index>`."""
    resize: Optional[int] = None
    """Resize the shorter image side to this many pixels before cropping. null: the model's own
    (timm's data config, the Hugging Face processor; 256 for torchvision and checkpoints)."""
    crop: Optional[int] = None
    """Center crop size (square) fed to the model. null: the model's own input size (224 for
    torchvision and checkpoints)."""
    mean: Optional[List[float]] = None
    """Per-channel mean for normalization. null: the model's own (ImageNet's for torchvision)."""
    std: Optional[List[float]] = None
    """Per-channel standard deviation for normalization. null: the model's own (ImageNet's for
    torchvision)."""
    interpolation: Optional[str] = None
    """Resize filter, bilinear or bicubic (both antialiased). null: the model's own (timm and
    most Hugging Face models: bicubic; torchvision: bilinear)."""
    batch_size: int = 64
    """Images per batch on the device."""
    num_workers: int = 2
    """DataLoader worker processes that read and decode shards (0 decodes in the main process)."""
    demo_images: int = 1200
    """demo: how many synthetic images to generate."""
    demo_shortcut_class: Optional[int] = None
    """demo: plant a shortcut in this class (0 circle, 1 square, 2 triangle, 3 cross): a share of
    its images carry a checker mark in the bottom-left corner and a faint shape, and their
    `<key>.json` says `"shortcut": true` (data=demo_shortcut plants 3, which model=demo_shortcut
    learned to read). null: no shortcut."""
    demo_shortcut_share: float = 0.3
    """demo: the share of data.demo_shortcut_class's images that carry the mark, in (0, 1]: of n
    images of that class, exactly round(share * n) (halves up), spread evenly over the shards."""
    decode: str = "auto"
    """Where JPEGs are decoded: workers (CPU processes), device (batched on the model's device,
    nvJPEG on CUDA, a batch ahead of the model on its own stream; other formats still decode in
    the workers), mixed (workers and device each take a share of the JPEGs, balanced at run time
    by which side is ahead), or auto (workers: on an H100 with 15 workers they fed ResNet-50 and
    ResNet-152 faster than device or mixed decoding, which take SMs from the model)."""
    device_share: float = 0.25
    """data.decode=mixed: the share of JPEGs the device decodes at the start (the workers decode
    the rest); the run then moves it towards whichever side has slack. Device decoding shares
    the GPU with the model, so a small share is the safe start."""
    max_bytes: int = 256 * 2**20
    """Encoded images (tar members, files, Parquet cells) larger than this many bytes become
    error rows, refused from the header or file size before they are read. Default 256 MiB."""
    follow_links: bool = False
    """imagefolder: also read images and class folders that are symbolic links leading outside
    data.root (links inside the root are always followed; only regular files are ever read).
    parquet: also read image paths (in struct<bytes, path> cells) that lead outside the Parquet
    file's folder: `..`, absolute paths elsewhere, links."""
    max_pixels: int = 89_478_485
    """Images with more pixels than this (decompression bombs) become error rows. Default:
    Pillow's limit (about 9459 x 9459)."""

    def __post_init__(self) -> None:
        _choice("data.format", self.format, DATA_FORMATS)
        if isinstance(self.shards, (list, tuple)):
            if not self.shards or not all(isinstance(part, str) and part.strip() for part in self.shards):
                raise UserError(f"data.shards={list(self.shards)!r}: each entry must be a non-empty path or glob")
            self.shards = ",".join(part.strip() for part in self.shards)
        elif self.shards is not None and not isinstance(self.shards, str):
            raise UserError(f"data.shards={self.shards!r} is not a path, a glob or a list of them")
        _choice("data.decode", self.decode, DECODE_MODES)
        _within("data.batch_size", self.batch_size, 1, 65536, "images per device batch")
        _within("data.demo_images", self.demo_images, 1, 10_000_000, "synthetic images for the demo")
        if self.demo_shortcut_class is not None:
            _within("data.demo_shortcut_class", self.demo_shortcut_class, 0, 3,  # models.DEMO_CLASSES
                    "a demo class: 0 circle, 1 square, 2 triangle, 3 cross")
        if (isinstance(self.demo_shortcut_share, bool) or not isinstance(self.demo_shortcut_share, (int, float))
                or not 0.0 < self.demo_shortcut_share <= 1.0):
            raise UserError(f"data.demo_shortcut_share={self.demo_shortcut_share!r} is not valid; "
                            "it must be in (0, 1] (the share of the planted class's images stamped)")
        if self.root is not None:
            self.root = os.path.expanduser(self.root)
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.shard_size", self.shard_size, 1)
        _at_least("data.unit_size", self.unit_size, 1)
        _at_least("data.max_pixels", self.max_pixels, 1)
        _at_least("data.max_bytes", self.max_bytes, 1)
        if not isinstance(self.device_share, (int, float)) or not 0.0 <= self.device_share <= 1.0:
            raise UserError(f"data.device_share={self.device_share!r} is not valid; it must be between 0 and 1")
        if self.resize is not None:
            _within("data.resize", self.resize, 1, MAX_IMAGE_SIDE, "pixels of the shorter side")
        if self.crop is not None:
            _within("data.crop", self.crop, 1, MAX_IMAGE_SIDE, "pixels of the crop's side")
        if self.interpolation is not None:
            _choice("data.interpolation", self.interpolation, INTERPOLATIONS)
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (len(values) != 3 or not all(math.isfinite(v) for v in values)
                                       or (name == "std" and min(values) < MIN_STD)):
                raise UserError(f"data.{name}={list(values)} is not valid; it needs 3 finite values"
                                f"{f' >= {MIN_STD}' if name == 'std' else ''} (one per RGB channel)")
        if self.resize is not None and self.crop is not None:
            self._check_crop(self.resize, self.crop, "")
        if self.format == "imagefolder" and not self.root:
            raise UserError("data=imagefolder needs data.root=DIR (a folder of class sub-folders)")
        if self.format in ("webdataset", "parquet") and not self.shards:
            raise UserError(f"data={self.format} needs data.shards='DIR/*.{'tar' if self.format == 'webdataset' else 'parquet'}'")

    def check_settings_used(self) -> None:
        """Refuse a setting that the chosen data source never reads (`data.root=/my/images`
        without `data=imagefolder` would otherwise run the demo and exit 0), naming the source to
        pick. Called once, on the user's config."""
        for name, formats in _FORMAT_SETTINGS.items():
            value, default = getattr(self, name), _DATA_DEFAULTS[name]
            if self.format in formats or value == default:
                continue
            pick = " or ".join(f"data={fmt}" for fmt in formats)
            shown = f"{value!r}" if not isinstance(value, str) or len(value) < 80 else f"'{value[:77]}...'"
            raise UserError(f"data.{name}={shown} is read only by {pick}, but data={self.format} is chosen"
                            f"{' (the default)' if self.format == 'demo' else ''}: add {pick.split(' or ')[0]} "
                            f"to the command line, or leave data.{name} out")

    @staticmethod
    def _check_crop(resize: int, crop: int, origin: str) -> None:
        if crop > resize:
            raise UserError(f"data.crop={crop} is larger than data.resize={resize}{origin}; "
                            "set data.crop <= data.resize")

    def resolved(self, defaults: Optional["Preprocessing"] = None) -> "DataConfig":
        """A copy with every preprocessing value left null taken from `defaults` (the model's
        own), or from torchvision's ImageNet recipe without one. Idempotent."""
        defaults = defaults or Preprocessing()
        resize = self.resize
        if resize is None:  # a crop of the user's own keeps the model's resize-to-crop ratio
            resize = defaults.resize if self.crop is None else round(self.crop * defaults.resize / defaults.crop)
        filled = dataclasses.replace(
            self,
            resize=resize,
            crop=self.crop if self.crop is not None else defaults.crop,
            mean=list(self.mean) if self.mean is not None else list(defaults.mean),
            std=list(self.std) if self.std is not None else list(defaults.std),
            interpolation=self.interpolation or defaults.interpolation)
        if filled.crop > filled.resize:
            origin = f" (from {defaults.source})" if self.crop is None or self.resize is None else ""
            self._check_crop(filled.resize, filled.crop, origin)
        return filled


# The settings only some data sources read, and which; every other data setting applies to all.
_FORMAT_SETTINGS = {
    "root": ("imagefolder",),
    "shard_size": ("imagefolder",),
    "shards": ("webdataset", "parquet"),
    "image_column": ("parquet",),
    "label_column": ("parquet",),
    "boxes_column": ("parquet",),
    "id_column": ("parquet",),
    "demo_images": ("demo",),
    "demo_shortcut_class": ("demo",),
    "demo_shortcut_share": ("demo",),
    "follow_links": ("imagefolder", "parquet"),
}
_DATA_DEFAULTS = {field.name: field.default for field in dataclasses.fields(DataConfig)}


@dataclass(frozen=True)
class Preprocessing:
    """A model's own input recipe: what data.resize / crop / mean / std / interpolation default to."""
    resize: int = 256
    crop: int = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    source: str = "torchvision's ImageNet recipe"


@dataclass
class ModelConfig:
    source: str = "demo"
    """Where the model comes from: demo (built-in), torchvision, timm, huggingface, or checkpoint
    (a whole-model file)."""
    name: Optional[str] = None
    """torchvision / timm: the model name, e.g. resnet50 or vit_base_patch16_224. huggingface: a
    local folder (save_pretrained) or a hub id already in the local Hugging Face cache. demo: null
    (the demo CNN) or shortcut (the one trained with a planted shortcut: model=demo_shortcut)."""
    weights: Optional[str] = None
    """torchvision: a local state_dict file, a weights enum name (e.g. IMAGENET1K_V2, resolved
    through the torch hub cache), or null for random init. timm: a local weights file (.pth,
    .safetensors), `pretrained` (timm's weights from the local caches), or null for random init.
    checkpoint: the model file. huggingface: unset (the weights sit in model.name's folder)."""
    num_classes: Optional[int] = None
    """torchvision / timm / huggingface: number of output classes when it differs from the model's."""
    target_layer: Any = "auto"
    """Dotted module name of the layer to explain, a list of names (one map per layer, rows carry
    the layer's name), or auto: for vision transformers the first norm of the last block, for
    CNNs the last module with a spatial (B, C, H, W) output. Token outputs (B, N, D) and
    Swin-style (B, H, W, C) outputs are read as maps on the model's patch grid."""
    trust_checkpoint: bool = False
    """checkpoint: allow unpickling a whole-model file. Only for files you trust."""
    seed: int = 0
    """Seed for random-init weights."""

    def __post_init__(self) -> None:
        _choice("model.source", self.source, MODEL_SOURCES)
        if self.source in ("torchvision", "timm", "huggingface") and not self.name:
            example = {"torchvision": "resnet50", "timm": "vit_base_patch16_224",
                       "huggingface": "/models/vit-base-patch16-224"}[self.source]
            raise UserError(f"model={self.source} needs model.name=NAME (e.g. {example})")
        if self.source == "demo" and self.name not in DEMO_MODEL_NAMES:
            raise UserError(f"model.name={self.name!r} is not a demo model; with model=demo use model.name=shortcut "
                            "(the planted-shortcut model, model=demo_shortcut) or leave model.name out")
        if self.source == "checkpoint" and not self.weights:
            raise UserError("model=checkpoint needs model.weights=FILE (a whole-model file)")
        if self.num_classes is not None:
            _at_least("model.num_classes", self.num_classes, 1)
        layers = self.target_layer
        if isinstance(layers, (list, tuple)):
            if not layers or not all(isinstance(name, str) and name for name in layers):
                raise UserError(f"model.target_layer={list(layers)!r}: list one or more module names")
            repeated = sorted({name for name in layers if list(layers).count(name) > 1})
            if repeated:
                raise UserError(f"model.target_layer={list(layers)!r} repeats {repeated}; list each layer once")
            self.target_layer = list(layers) if len(layers) > 1 else layers[0]
        elif not isinstance(layers, str) or not layers:
            raise UserError(f"model.target_layer={layers!r} is not a module name, a list of them, or auto")

    @property
    def target_layers(self) -> list[str]:
        return list(self.target_layer) if isinstance(self.target_layer, list) else [self.target_layer]


def parse_channels(spec: str) -> int | None:
    """cam.channels: "all" -> None, "top:N" -> N."""
    if spec == "all":
        return None
    head, _, count = str(spec).partition(":")
    if head != "top" or not count.isdigit() or int(count) < 1:
        raise UserError(f"cam.channels={spec!r} is not valid; use all or top:N (N >= 1 channels per image)")
    return int(count)


@dataclass
class CamConfig:
    method: str = "gradcam"
    """CAM formula: gradcam, gradcampp, xgradcam, hirescam, layercam, elementwise, finercam,
    shapleycam (the Triton kernel's), eigencam, eigengradcam, kpcacam, fem (PyTorch on any device;
    eigencam, kpcacam and fem are gradient-free: no backward, the K targets of an image share one
    map), cam (Zhou et al.: the final linear layer's weights; needs a pooling-then-linear head),
    scorecam, ablationcam (channel weights measured with extra forwards, see perturbation_batch)."""
    targets: str = "pred"
    """Which classes get a map: pred (top-1), topk, label (the sample's label), classes (a list),
    all (every class, ranked by logit: one matrix product with the final linear layer's weights;
    statistics for every (image, class), maps only for cam.keep_maps)."""
    topk: int = 5
    """Maps per image with targets=topk."""
    classes: List[int] = field(default_factory=list)
    """Class indices with targets=classes."""
    keep_maps: List[int] = field(default_factory=list)
    """With targets=all: the classes whose maps are stored in `cam`; the other rows hold the
    statistics with a null `cam`."""
    normalize: bool = True
    """Per-map min-max to [0, 1] after ReLU; false keeps raw values."""
    backend: str = "auto"
    """auto (Triton kernel on CUDA, PyTorch elsewhere), torch, or triton."""
    analytic: str = "auto"
    """Where the head after the target layer is global average pooling then one linear layer
    (ResNet, RegNet, EfficientNet), the gradients are that layer's weights / HW (with ConvNeXt's
    layer norm between them, its backward of those weights per image): auto takes them without a
    backward where the model's graph proves such a head (logged), on refuses to run without one,
    off always runs the backward."""
    finer_alpha: float = 1.0
    """finercam: how strongly the similar classes' logits are subtracted (pytorch-grad-cam's alpha)."""
    finer_comparison_categories: List[int] = field(default_factory=lambda: [1, 2, 3])
    """finercam: the classes compared with, by rank of logit nearness to the target (1 = nearest)."""
    channels: str = "all"
    """scorecam, ablationcam: all, or top:N to measure only the N channels of largest mean
    activation per image (the others get weight 0): N forwards per image instead of C."""
    perturbation_batch: int = 0
    """scorecam, ablationcam: perturbed inputs per forward; 0 sizes it to memory (1024 on CUDA,
    halved on out-of-memory; 64 on CPU)."""
    fuse: Optional[str] = None
    """With several target layers: mean or max also writes each target's maps fused into one
    (each layer's map upsampled to the largest grid, combined, normalized again), in rows whose
    layer is e.g. `mean(layer3,layer4)`. null: the per-layer maps only."""

    def __post_init__(self) -> None:
        _choice("cam.method", self.method, ALL_METHODS)
        _choice("cam.targets", self.targets, TARGET_MODES)
        _choice("cam.backend", self.backend, BACKENDS)
        _choice("cam.analytic", self.analytic, ANALYTIC_MODES)
        if not isinstance(self.finer_alpha, (int, float)) or isinstance(self.finer_alpha, bool) \
                or not math.isfinite(self.finer_alpha):
            raise UserError(f"cam.finer_alpha={self.finer_alpha!r} is not valid; use a finite number")
        if not self.finer_comparison_categories:
            raise UserError("cam.finer_comparison_categories is empty; list ranks like [1,2,3]")
        for rank in self.finer_comparison_categories:
            _within("cam.finer_comparison_categories[...]", rank, 1, MAX_CLASS_INDEX, "a rank of nearness")
        _within("cam.perturbation_batch", self.perturbation_batch, 0, 1 << 16, "perturbed inputs per forward (0: auto)")
        parse_channels(self.channels)
        if self.fuse is not None:
            _choice("cam.fuse", self.fuse, FUSE_MODES)
        if self.targets == "topk":
            _within("cam.topk", self.topk, 1, MAX_CLASS_INDEX, "maps per image")
        if self.targets == "all":
            if self.method not in ALL_TARGETS_METHODS:
                raise UserError(f"cam.targets=all computes every class's map as one matrix product with the final "
                                f"linear layer's weights: use cam.method={', '.join(ALL_TARGETS_METHODS)} "
                                f"(not {self.method})")
            if self.analytic == "off":
                raise UserError("cam.targets=all needs the analytic head (one matrix product); use cam.analytic=auto")
        if self.keep_maps and self.targets != "all":
            raise UserError(f"cam.keep_maps={list(self.keep_maps)} applies to cam.targets=all; with "
                            f"cam.targets={self.targets} every row keeps its map")
        for index in self.keep_maps:
            _within("cam.keep_maps[...]", index, 0, MAX_CLASS_INDEX, "a class index")
        if self.targets == "classes":
            if not self.classes:
                raise UserError("cam.targets=classes needs cam.classes=[i,j,...] (class indices)")
            for index in self.classes:
                _within("cam.classes[...]", index, 0, MAX_CLASS_INDEX, "a class index")
            repeated = sorted({index for index in self.classes if list(self.classes).count(index) > 1})
            if repeated:
                raise UserError(f"cam.classes={list(self.classes)} repeats {repeated}: each class would get "
                                "the same map twice; list each class once")

    @property
    def num_targets(self) -> int:
        return {"topk": self.topk, "classes": len(self.classes)}.get(self.targets, 1)


@dataclass
class OutputConfig:
    dir: str = "gradcam-out"
    """Output directory: cams/part-<shard>.parquet, errors/part-<shard>.parquet."""
    compression: str = "zstd"
    """Parquet compression codec."""
    queue_size: int = 8
    """Finished batches the writer thread may hold before the device waits."""
    cam_size: Any = "layer"
    """Also store each map upsampled (bilinear, after normalization) as float16 in `cam_resized`:
    layer (no: the `cam` column at the layer's resolution only), input (the crop fed to the
    model, e.g. 224x224) or [h, w]. Costs 2*h*w bytes per row before compression."""
    heatmap_png: bool = False
    """Store an 8-bit PNG of the coloured map blended over the crop in `heatmap_png`, ready for a
    dashboard to show (about 60-100 kB per row at 224x224)."""
    overwrite: bool = False
    """Delete the earlier output in dir before running. Without it, a rerun resumes, and a
    rerun with a different model, layer, method, targets or data is refused."""

    def __post_init__(self) -> None:
        _within("output.queue_size", self.queue_size, 1, 1024, "finished batches held for the writer")
        self.dir = os.path.expanduser(self.dir)  # `output.dir=~/x` would otherwise be a folder named ~
        size = self.cam_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or not all(isinstance(side, int) and not isinstance(side, bool)
                                         and 1 <= side <= MAX_CAM_SIDE for side in size):
                raise UserError(f"output.cam_size={list(size)} is not valid; use layer, input or [height, width] "
                                f"with sides from 1 to {MAX_CAM_SIDE}")
            self.cam_size = [int(size[0]), int(size[1])]
        elif size not in ("layer", "input"):
            raise UserError(f"output.cam_size={size!r} is not valid; use layer, input or [height, width]")
        if not _parquet_codec(self.compression):
            known = [codec for codec in ("zstd", "snappy", "gzip", "brotli", "lz4", "none") if _parquet_codec(codec)]
            raise UserError(f"output.compression={self.compression!r} is not a Parquet codec this pyarrow has; "
                            f"use one of: {', '.join(known)}")


@dataclass
class MetricsConfig:
    threshold: float = 0.5
    """box_iou: the map (upsampled to the crop) counts as "on" where it is >= this."""
    faithfulness: bool = False
    """Also measure, per row, the target's probability after keeping only the top fraction of the
    map (insertion) and after removing it (deletion), for each of `fractions`, and the change of
    confidence with the image multiplied by the map (pytorch-grad-cam's
    CamMultImageConfidenceChange). Costs (2 * len(fractions) + 1) extra forwards per target."""
    fractions: List[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    """Fractions of the image (by map rank) kept or removed by the faithfulness metrics."""
    road: bool = False
    """Also score each row with ROAD (remove and debias, pytorch-grad-cam's ROADMostRelevantFirst /
    ROADLeastRelevantFirst): the target's probability after the pixels at or above each
    percentile of the map (road_morf) or of 1 - map (road_lerf) are replaced by noisy linear
    imputation, minus before; road_combined = (mean lerf - mean morf) / 2. Costs
    2 * len(road_percentiles) extra forwards per target, plus the imputation."""
    road_percentiles: List[float] = field(default_factory=lambda: [20.0, 40.0, 60.0, 80.0])
    """Percentiles (0, 100) of the map at which ROAD removes pixels."""
    road_noise: float = 0.01
    """The imputer's noise (pytorch-grad-cam's 0.01; 0: the exact imputation), drawn from a
    generator seeded 0 at every batch, so a rerun gives the same scores."""

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"metrics.threshold={self.threshold!r} is not valid; it must be between 0 and 1")
        if not self.fractions or not all(isinstance(p, (int, float)) and 0.0 < p <= 1.0 for p in self.fractions):
            raise UserError(f"metrics.fractions={list(self.fractions)!r} is not valid; list fractions in (0, 1]")
        self.fractions = [float(p) for p in self.fractions]
        if not self.road_percentiles or not all(isinstance(p, (int, float)) and not isinstance(p, bool)
                                                and 0.0 < p < 100.0 for p in self.road_percentiles):
            raise UserError(f"metrics.road_percentiles={list(self.road_percentiles)!r} is not valid; "
                            "list percentiles strictly between 0 and 100")
        self.road_percentiles = [float(p) for p in self.road_percentiles]
        if not isinstance(self.road_noise, (int, float)) or isinstance(self.road_noise, bool) \
                or not 0.0 <= self.road_noise <= 1.0:
            raise UserError(f"metrics.road_noise={self.road_noise!r} is not valid; use a number from 0 to 1")


@dataclass
class RuntimeConfig:
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    amp: str = "auto"
    """Autocast: auto (bf16 on CUDA, off on CPU), bf16, fp16, off."""
    channels_last: bool = True
    """Run the model in the NHWC memory layout (faster convolutions on CUDA and on CPU)."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 0
    """Torch intra-op threads on CPU (0 keeps torch's default)."""
    dist_timeout_minutes: int = 30
    """torchrun: how long a rank waits for the others at a collective (start, end of the run)
    before the job stops with an error naming the ranks that did not arrive."""

    def __post_init__(self) -> None:
        _at_least("runtime.dist_timeout_minutes", self.dist_timeout_minutes, 1)
        _choice("runtime.device", self.device, DEVICES)
        _choice("runtime.amp", self.amp, AMP_MODES)
        _within("runtime.threads", self.threads, 0, 4 * (os.cpu_count() or 1),
                "torch threads; 0 keeps torch's default, at most 4 per core of this machine")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def check_all_targets(self) -> None:
        """cam.targets=all makes one row per class per image: what costs per row (extra forwards,
        upsampled maps, PNGs) is refused with it, in one line."""
        if self.cam.targets != "all":
            return
        costly = [name for name, on in (("metrics.faithfulness", self.metrics.faithfulness),
                                        ("metrics.road", self.metrics.road),
                                        ("output.heatmap_png", self.output.heatmap_png),
                                        (f"output.cam_size={self.output.cam_size}", self.output.cam_size != "layer"))
                  if on]
        if costly:
            raise UserError(f"cam.targets=all writes a row per class per image: {', '.join(costly)} would cost that "
                            "much per class; turn it off, or list the classes with cam.targets=classes")


def register_configs() -> None:
    # Only the whole schema is stored: config.yaml lists it first, so it types every group's
    # YAML, and no group offers a "schema" option (in --help, or as data=schema).
    ConfigStore.instance().store(name="schema", node=Config)
