"""Which layer to explain, and how its output becomes (B, C, h, w) maps.

A convolutional layer gives (B, C, H, W) maps as they are. A vision transformer gives tokens
(B, N, D): a few leading tokens (class, distillation, registers) that belong to no place, then
one token per patch in row-major order. Swin-style layers give (B, H, W, C). `MapView` turns
each of these into a (B, C, h, w) view of the same memory (no copy: the kernel reads the strides
as they are), and does the same to the gradients, whatever leading dimensions they carry.

`model.target_layer=auto` picks, per family:
- transformers (a block holds two or more norm layers whose outputs are tokens or NHWC maps):
  the first norm of the last such block, as the literature does (pytorch-grad-cam's
  `blocks[-1].norm1`); the final norm after the blocks is not a choice, since only the class
  token reaches the head from there and the patch tokens get no gradient;
- everything else: the last module whose output is a (B, C, H, W) map with more than one place.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from gradcam_batch import UserError

log = logging.getLogger("gradcam_batch")

MAX_PREFIX_TOKENS = 8  # class + distillation + up to 6 registers, when the model does not say


@dataclass(frozen=True)
class MapView:
    """How one layer's output is read as maps: layout "nchw", "nhwc" or "tokens"."""
    layout: str
    prefix: int = 0  # tokens: leading tokens dropped (class, distillation, register)
    grid: tuple[int, int] = (0, 0)  # tokens: the patch grid (h, w)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """(..., C, h, w) view of an output, or of its gradients with extra leading dimensions."""
        if self.layout == "nchw":
            return output
        if self.layout == "nhwc":
            return output.movedim(-1, -3)
        return output[..., self.prefix:, :].unflatten(-2, self.grid).movedim(-1, -3)

    def describe(self) -> str:
        if self.layout == "tokens":
            dropped = f", {self.prefix} leading token(s) dropped" if self.prefix else ""
            return f"tokens as a {self.grid[0]}x{self.grid[1]} grid{dropped}"
        return {"nchw": "(B, C, H, W) maps", "nhwc": "(B, H, W, C) maps, read channels-last"}[self.layout]


@dataclass(frozen=True)
class TargetLayer:
    name: str
    module: nn.Module
    view: MapView


def known_prefix_tokens(model: nn.Module) -> Optional[int]:
    """Leading non-patch tokens, where the model says how many (timm, torchvision, Hugging Face)."""
    prefix = getattr(model, "num_prefix_tokens", None)  # timm ViT, DeiT, EVA, ...
    if isinstance(prefix, int):
        return prefix
    if isinstance(getattr(model, "class_token", None), torch.Tensor):  # torchvision VisionTransformer
        return 1
    config = getattr(model, "config", None)  # Hugging Face
    model_type = getattr(config, "model_type", None)
    if model_type in ("vit", "beit", "data2vec-vision", "dinov2", "dinov2_with_registers"):
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    if model_type == "deit":
        return 2  # class and distillation tokens
    if model_type in ("swin", "swinv2", "convnext", "convnextv2", "resnet"):
        return 0
    return None


def _patch_grid(model: nn.Module) -> Optional[tuple[int, int]]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)  # timm
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(side, int) for side in grid):
        return int(grid[0]), int(grid[1])
    return None


def map_view(model: nn.Module, shape: tuple) -> tuple[Optional[MapView], str]:
    """How an output of this shape reads as maps, or (None, why not). The model's inputs are
    square crops, so a 4-D output whose two middle sides are equal and differ from the last is
    (B, H, W, C); one whose two last sides are equal is (B, C, H, W)."""
    if len(shape) == 4:
        _, first, second, third = shape
        if second == third or first != second:
            layout, places = "nchw", second * third
        else:
            layout, places = "nhwc", first * second
        if places <= 1:
            return None, f"outputs 1x1 maps (shape {shape}): a map of one cell shows no location"
        return MapView(layout), ""
    if len(shape) == 3:
        tokens = shape[1]
        grid = _patch_grid(model)
        prefix = known_prefix_tokens(model)
        if grid is not None and prefix is not None and grid[0] * grid[1] + prefix == tokens:
            return MapView("tokens", prefix, grid), ""
        prefixes = [prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)
        for count in prefixes:
            side = math.isqrt(max(tokens - count, 0))
            if side > 1 and side * side == tokens - count:
                return MapView("tokens", count, (side, side)), ""
        said = f"{prefix} leading token(s)" if prefix is not None else "up to 8 leading tokens"
        return None, (f"outputs {tokens} tokens (shape {shape}), which, less {said}, make no square "
                      "patch grid")
    return None, f"outputs shape {shape}, neither (B, C, H, W) maps nor (B, N, D) tokens"


def output_shapes(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, tuple]]:
    """(name, output shape) of every module with a tensor output, in the order outputs complete."""
    seen: list[tuple[str, tuple]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module, inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                seen.append((name, tuple(output.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _auto_transformer(model: nn.Module, shapes: list[tuple[str, tuple]]) -> Optional[tuple[str, MapView]]:
    """The first norm of the last block that holds two or more norms with map-like outputs."""
    modules = dict(model.named_modules())
    first_seen: dict[str, tuple] = {}
    for name, shape in shapes:
        first_seen.setdefault(name, shape)
    norms: dict[str, list[tuple[str, MapView]]] = {}
    for name, shape in first_seen.items():
        if not _is_norm(modules[name]):
            continue
        view, _ = map_view(model, shape)
        if view is not None and view.layout in ("tokens", "nhwc"):
            norms.setdefault(_parent(name), []).append((name, view))
    blocks = [parent for parent, members in norms.items() if len(members) >= 2]
    if not blocks:
        return None
    return norms[blocks[-1]][0]


def _resolve_one(model: nn.Module, requested: str, modules: dict, shapes: dict) -> TargetLayer:
    if requested not in modules or not requested:
        close = difflib.get_close_matches(requested, [n for n in modules if n], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"model.target_layer={requested!r} is not a module of this model{hint}")
    shape = shapes.get(requested)
    if shape is None:
        raise UserError(f"model.target_layer={requested!r} gives no tensor in the forward pass (unused, or "
                        "it returns a tuple); pick a layer on the path to the logits")
    view, why = map_view(model, shape)
    if view is None:
        raise UserError(f"model.target_layer={requested!r} {why}; pick a layer that gives maps or patch "
                        "tokens (model.target_layer=auto picks one)")
    return TargetLayer(requested, modules[requested], view)


def resolve_target_layers(model: nn.Module, requested, sample: torch.Tensor) -> list[TargetLayer]:
    """The layers to explain: `auto`, a dotted module name, or a list of names (one map each)."""
    modules = dict(model.named_modules())
    ordered = output_shapes(model, sample)
    shapes: dict[str, tuple] = {}
    for name, shape in ordered:
        shapes.setdefault(name, shape)
    if isinstance(requested, str) and requested != "auto":
        return [_resolve_one(model, requested, modules, shapes)]
    if not isinstance(requested, str):
        names = list(requested)
        if "auto" in names:
            raise UserError("model.target_layer: `auto` picks one layer; list module names to explain several")
        return [_resolve_one(model, name, modules, shapes) for name in names]
    chosen = _auto_transformer(model, ordered)
    if chosen is None:
        # an Identity (timm's norm_pre) repeats its input under a less telling name
        maps = [(name, view) for name, shape in ordered if not isinstance(modules[name], nn.Identity)
                for view in [map_view(model, shape)[0]] if view is not None and view.layout == "nchw"]
        if not maps:
            raise UserError("model.target_layer=auto found no layer with spatial maps or patch tokens; "
                            "name one with model.target_layer=NAME")
        chosen = maps[-1]
    name, view = chosen
    log.info("target layer: %s (auto; %s)", name, view.describe())
    return [TargetLayer(name, modules[name], view)]


def resolve_target_layer(model: nn.Module, requested: str, sample: torch.Tensor) -> tuple[str, nn.Module]:
    """One layer's (name, module): `auto` or a dotted module name."""
    (layer,) = resolve_target_layers(model, requested, sample)
    return layer.name, layer.module
