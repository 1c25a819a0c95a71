"""Models from timm and from Hugging Face transformers, with their own input recipes.

Both libraries are optional: a user who asks for one without it installed gets one line saying
what to install. Nothing is downloaded: timm weights come from a local file or the local caches
(Hugging Face hub and torch hub), Hugging Face models from a local folder or the hub cache.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os

import torch
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import ModelConfig, Preprocessing

log = logging.getLogger("gradcam_batch")

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Pillow's resampling codes, as Hugging Face processors store them
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _import(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise UserError(f"model={extra} needs the {module} package ({error}); "
                        f"install it with: pip install {module}") from error


@contextlib.contextmanager
def _offline():
    """The Hugging Face hub in offline mode: files come from the local cache or not at all."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    try:  # already imported: the hub reads its constant, not the environment, at call time
        from huggingface_hub import constants
        saved_constant, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    except (ImportError, AttributeError):
        constants = None
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant


def load_weight_file(path: str, model: nn.Module) -> dict:
    """A state_dict from a local .safetensors or torch file for `model`, or a one-line UserError."""
    from gradcam_batch.models import check_weight_file_size, load_state_dict

    if not path.endswith(".safetensors"):
        return load_state_dict(path, model)
    if not os.path.isfile(path):
        raise UserError(f"model.weights={path!r}: file not found; pass an existing weights file")
    check_weight_file_size(path, model)
    try:
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    except Exception as error:  # not a safetensors file, or safetensors missing
        raise UserError(f"model.weights={path!r} is not a readable safetensors file "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})") from error


def _is_file_like(weights: str) -> bool:
    return os.path.sep in weights or weights.endswith(WEIGHT_SUFFIXES) or os.path.exists(weights)


def timm_model(cfg: ModelConfig) -> tuple[nn.Module, Preprocessing]:
    """timm.create_model(name) with random weights (model.weights=null), a local weights file,
    or `pretrained` (timm's own weights, from the local caches only)."""
    timm = _import("timm", "timm")
    from gradcam_batch.models import load_fitting

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"model.name={cfg.name!r} is not a timm model{hint}")
    kwargs = {} if cfg.num_classes is None else {"num_classes": cfg.num_classes}
    torch.manual_seed(cfg.seed)
    weights = cfg.weights
    if weights in ("pretrained", "cache"):
        model = _timm_cached(timm, cfg.name, kwargs)
    else:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if weights is not None:
            if not _is_file_like(weights):
                raise UserError(f"model.weights={weights!r} for model=timm: pass a weights file, `pretrained` "
                                "(timm's weights from the local cache) or null (random weights)")
            state = load_weight_file(weights, model)
            if isinstance(state.get("model"), dict):  # timm training checkpoints
                state = state["model"]
            load_fitting(model, state, f"model.weights={weights!r} does not fit {cfg.name}")
    config = timm.data.resolve_model_data_config(model)
    size = int(config["input_size"][-1])
    crop_pct = float(config.get("crop_pct") or 1.0)
    recipe = Preprocessing(resize=math.floor(size / crop_pct), crop=size, mean=tuple(config["mean"]),
                           std=tuple(config["std"]),
                           interpolation="bicubic" if config.get("interpolation") == "bicubic" else "bilinear",
                           source=f"timm's data config for {cfg.name}")
    if config.get("interpolation") not in (None, "bilinear", "bicubic"):
        log.warning("timm's data config for %s resizes with %s; gradcam-batch resizes bilinear "
                    "(set data.interpolation to choose)", cfg.name, config["interpolation"])
    return model, recipe


def _timm_cached(timm, name: str, kwargs: dict) -> nn.Module:
    pretrained = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    url = getattr(pretrained, "url", None) if pretrained is not None else None
    if not hub_id and url:  # torch hub: load_state_dict_from_url would download what is missing
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(cached):
            raise UserError(f"model.weights=pretrained: {name}'s weights are not in the torch hub cache "
                            f"({cached}); download them once with network access, or pass model.weights=FILE")
    if not hub_id and not url:
        raise UserError(f"model.weights=pretrained: timm has no weights for {name}; pass model.weights=FILE")
    try:
        with _offline():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # the hub raises its own errors when a file is not cached
        raise UserError(f"model.weights=pretrained: {name}'s weights are not in the local Hugging Face cache "
                        f"({type(error).__name__}); download them once with network access, or pass "
                        "model.weights=FILE") from error


def _logits_only(module: nn.Module, inputs, output):
    """Forward hook: a Hugging Face classifier returns a ModelOutput; the pipeline wants logits."""
    return output.logits if hasattr(output, "logits") else output


def huggingface_model(cfg: ModelConfig) -> tuple[nn.Module, Preprocessing]:
    """AutoModelForImageClassification from a local folder or the hub cache, its processor's recipe."""
    transformers = _import("transformers", "huggingface")
    if cfg.weights is not None:
        raise UserError("model=huggingface reads its weights from model.name (a local folder or a cached "
                        "hub id); leave model.weights unset")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs = {} if cfg.num_classes is None else {"num_labels": cfg.num_classes, "ignore_mismatched_sizes": True}
    _refuse_custom_code(cfg.name)
    _refuse_weights_smaller_than_the_model(transformers, cfg.name, kwargs)
    try:
        with _offline():
            # trust_remote_code=False: transformers raises instead of asking on stdin whether to run
            # the folder's own Python (a `y` piped in would run it)
            model, loading = transformers.AutoModelForImageClassification.from_pretrained(
                cfg.name, local_files_only=True, output_loading_info=True, trust_remote_code=False, **kwargs)
    except Exception as error:  # transformers raises many kinds; a pickled .bin it refuses among them
        _refuse_custom_code(cfg.name, error)
        where = "folder" if os.path.isdir(cfg.name) else "local folder, nor a model in the Hugging Face cache"
        raise UserError(f"model.name={cfg.name!r} is not an image-classification model's {where} "
                        f"({str(error).splitlines()[0][:200]}); nothing is downloaded: save the model with "
                        "save_pretrained or fetch it once with network access") from error
    if getattr(model.config, "auto_map", None):  # a cached hub id: loaded with the built-in class, still refused
        _refuse_custom_code(cfg.name, ValueError("custom code"))
    _warn_random_weights(cfg.name, loading)
    model.register_forward_hook(_logits_only)
    return model, _processor_recipe(transformers, cfg.name)


_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def _refuse_weights_smaller_than_the_model(transformers, name: str, kwargs: dict) -> None:
    """A folder whose weight files are far smaller than the model its config describes (a big
    ViT's config beside empty weights) would allocate the whole model and then run it on random
    values: the model is sized on the meta device first, which allocates nothing."""
    if not os.path.isdir(name):
        return
    try:
        with _offline():
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False,
                                                             **({"num_labels": kwargs["num_labels"]}
                                                                if "num_labels" in kwargs else {}))
        with torch.device("meta"):
            skeleton = transformers.AutoModelForImageClassification.from_config(config)
    except Exception:  # not a config transformers can size: from_pretrained says what is wrong
        return
    from gradcam_batch.models import state_bytes

    expected = state_bytes(skeleton)
    stored = sum(entry.stat().st_size for entry in os.scandir(name)
                 if entry.is_file() and entry.name.endswith(_WEIGHT_FILE_SUFFIXES))
    # 4x slack: weights may be stored in 16 or 8 bits while the skeleton counts 32
    if stored * 4 + 2**20 < expected:
        raise UserError(f"model.name={name!r}: its weight files hold {stored / 2**20:,.1f} MiB, but the model its "
                        f"config.json describes needs {expected / 2**20:,.0f} MiB; the weights are missing or cut "
                        "short: save the whole classifier with save_pretrained")


_CUSTOM_CODE_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json")


def _refuse_custom_code(name: str, error: Exception | None = None) -> None:
    """gradcam-batch never runs a model folder's own Python. A local folder is checked before
    transformers reads it; a cached hub id is refused from transformers' own error."""
    if error is not None:
        if "trust_remote_code" in str(error) or "custom code" in str(error):
            raise UserError(f"model.name={name!r} ships its own Python code (auto_map), which gradcam-batch never "
                            "runs; use a model whose architecture transformers has built in") from error
        return
    if not os.path.isdir(name):
        return
    import json

    for file in _CUSTOM_CODE_FILES:
        path = os.path.join(name, file)
        if not os.path.isfile(path) or os.path.getsize(path) > 16 * 2**20:
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            continue  # transformers says what is wrong with it
        if isinstance(config, dict) and config.get("auto_map"):
            raise UserError(f"model.name={name!r}: {file} names its own Python classes (auto_map), code that "
                            "gradcam-batch never runs; use a model whose architecture transformers has built in")


def _warn_random_weights(name: str, loading: dict) -> None:
    """transformers fills what the folder lacks with random values and says so only in its own
    log, which is silenced above. Weights that do not fit the model (missing or unexpected keys: a
    base model without its classifier, another architecture's weights) are refused, as a
    torchvision state_dict that does not fit; a head resized by model.num_classes is warned about."""
    missing = [str(key) for key in loading.get("missing_keys") or []]
    unexpected = [str(key) for key in loading.get("unexpected_keys") or []]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise UserError(f"model.name={name!r}: the folder's weights do not fit its model ({'; '.join(problems)}); "
                        "the rest would run on random values: save the whole classifier with save_pretrained")
    mismatched = [str(item[0]) if isinstance(item, (tuple, list)) else str(item)
                  for item in loading.get("mismatched_keys") or []]
    if mismatched:
        log.warning("model.name=%s: %d weights do not fit model.num_classes and have random values (%s%s); "
                    "maps of a random head explain nothing real", name, len(mismatched), ", ".join(mismatched[:3]),
                    f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")


def _size_value(size, *keys):
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def _processor_recipe(transformers, name: str) -> Preprocessing:
    try:
        with _offline():
            processor = transformers.AutoImageProcessor.from_pretrained(name, local_files_only=True,
                                                                         trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        _refuse_custom_code(name, error)
        log.warning("model.name=%s has no image processor (%s); using torchvision's ImageNet recipe",
                    name, str(error).splitlines()[0][:120])
        return Preprocessing()
    size = getattr(processor, "size", None) or {}
    crop_size = getattr(processor, "crop_size", None) or {}
    side = _size_value(size, "shortest_edge", "height", "width") or 224
    from gradcam_batch.config import MAX_IMAGE_SIDE

    for value in (side, _size_value(crop_size, "height", "width") or 0):
        if value > MAX_IMAGE_SIDE:
            raise UserError(f"model.name={name!r}: its image processor asks for {value}-pixel images, more than "
                            f"{MAX_IMAGE_SIDE}; set data.resize and data.crop to the size the model was trained on")
    if getattr(processor, "do_center_crop", False) and crop_size:
        crop = _size_value(crop_size, "height", "width") or side
        resize = side
    elif getattr(processor, "crop_pct", None):  # ConvNeXt: resize to side / crop_pct, crop side
        crop, resize = side, math.floor(side / processor.crop_pct)
    else:  # resized straight to (side, side): the nearest aspect-keeping recipe is resize = crop
        crop = resize = side
    resample = getattr(processor, "resample", None)
    interpolation = _PIL_RESAMPLE.get(int(resample) if resample is not None else 2, "bilinear")
    mean = tuple(getattr(processor, "image_mean", None) or Preprocessing.mean)
    std = tuple(getattr(processor, "image_std", None) or Preprocessing.std)
    return Preprocessing(resize=max(resize, crop), crop=crop, mean=mean, std=std, interpolation=interpolation,
                         source=f"the image processor of {name}")
