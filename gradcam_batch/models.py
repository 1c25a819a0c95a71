"""Build the classifier (torchvision, timm, Hugging Face, a whole-model checkpoint, or the
built-in demo CNN) with its own input recipe. Which layer to explain: layers.py."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import ModelConfig, Preprocessing
from gradcam_batch.layers import output_shapes, resolve_target_layer, resolve_target_layers  # noqa: F401

log = logging.getLogger("gradcam_batch")

DEMO_WEIGHTS = Path(__file__).parent / "assets" / "demo_cnn.pt"
DEMO_SHORTCUT_WEIGHTS = Path(__file__).parent / "assets" / "demo_cnn_shortcut.pt"
"""model=demo_shortcut (model.name=shortcut): the demo CNN trained with a planted shortcut, a corner
mark on a share of the crosses (data=demo_shortcut), which its maps of those images point at."""
DEMO_MODELS = {None: DEMO_WEIGHTS, "shortcut": DEMO_SHORTCUT_WEIGHTS}
DEMO_CLASSES = ("circle", "square", "triangle", "cross")


class DemoCNN(nn.Module):
    """A small all-convolutional classifier with global average pooling.

    Global pooling after the last convolution keeps the spatial evidence of each class in
    `features` (16x16 for 64x64 inputs), which is what makes its Grad-CAM maps localise.
    """

    def __init__(self, num_classes: int = len(DEMO_CLASSES)):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 96),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(96, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(images)).flatten(1))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers: what a fitting weights file holds."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def check_weight_file_size(path: str, model: nn.Module) -> None:
    """Refuse, before anything is read, a weights file whose tensors (uncompressed: torch.save's
    zip may deflate them) are far more than the model holds: a 2 MB deflated file can unpack to
    gigabytes, all allocated before load_state_dict could say it does not fit."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                total = sum(info.file_size for info in archive.infolist())
        else:
            total = os.path.getsize(path)
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # unreadable: torch.load says so in its own one line below
    expected = state_bytes(model)
    if total > 2 * expected + 64 * 2**20:
        raise UserError(f"model.weights={path!r} holds {total / 2**20:,.0f} MiB of tensors (uncompressed), far more "
                        f"than the model's {expected / 2**20:,.0f} MiB; pass the weights of this model")


def load_state_dict(path: str, model: nn.Module | None = None) -> dict:
    """A state_dict from a local torch file, loaded without running code. With `model`, a file far
    larger than the model's tensors is refused before it is read."""
    if not os.path.isfile(path):
        raise UserError(f"model.weights={path!r}: file not found; pass an existing state_dict file")
    if model is not None:
        check_weight_file_size(path, model)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that needs code, or not a torch file at all
        raise UserError(f"model.weights={path!r} is not a loadable state_dict "
                        f"({type(error).__name__}); save it with torch.save(model.state_dict())") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"model.weights={path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def _torchvision_model(cfg: ModelConfig) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if cfg.name not in available:
        close = difflib.get_close_matches(cfg.name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise UserError(f"model.name={cfg.name!r} is not a torchvision model{hint}")
    kwargs = {} if cfg.num_classes is None else {"num_classes": cfg.num_classes}
    torch.manual_seed(cfg.seed)
    model = torchvision.models.get_model(cfg.name, weights=None, **kwargs)
    weights = cfg.weights
    if weights is None:
        return model  # random init: the pipeline warns once the whole config is known to be valid
    if os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or os.path.exists(weights):
        state = load_state_dict(weights, model)
    else:
        state = _hub_cached_weights(cfg.name, weights)
    load_fitting(model, state, f"model.weights={weights!r} does not fit {cfg.name}")
    return model


def load_fitting(model: nn.Module, state: dict, what: str) -> None:
    """load_state_dict, with a mismatch reported in one line naming the first keys that differ."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    resized = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
               if key in state and hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(value.shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    if problems:
        hint = (" (a checkpoint saved from a wrapped model? strip the 'module.' prefix)"
                if unexpected and all(key.startswith("module.") for key in unexpected) else "")
        raise UserError(f"{what}: {'; '.join(problems)}{hint}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # e.g. a dtype the parameter cannot take
        raise UserError(f"{what}: {' '.join(str(error).split())[:300]}") from error


def _hub_cached_weights(name: str, weights: str) -> dict:
    """A torchvision weights enum (IMAGENET1K_V1 or ResNet50_Weights.IMAGENET1K_V1) from the
    torch hub cache only: this tool never downloads at run time."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except Exception as error:
        raise UserError(f"model.name={name!r} has no weights enum; pass model.weights=FILE") from error
    member = weights.split(".")[-1]
    if member not in enum.__members__:
        raise UserError(f"model.weights={weights!r} is not one of {', '.join(enum.__members__)} "
                        "and not an existing file")
    url = enum[member].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        raise UserError(f"model.weights={weights!r} is not in the torch hub cache ({cached}); "
                        "download it once with network access, or pass model.weights=FILE")
    return torch.load(cached, map_location="cpu", weights_only=True)


def _checkpoint_model(cfg: ModelConfig) -> nn.Module:
    if not os.path.isfile(cfg.weights):
        raise UserError(f"model.weights={cfg.weights!r}: file not found; pass a whole-model file")
    if not cfg.trust_checkpoint:
        raise UserError(f"model=checkpoint unpickles {cfg.weights!r}, which can run code; "
                        "set model.trust_checkpoint=true only for files you trust")
    model = torch.load(cfg.weights, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.weights={cfg.weights!r} holds a {type(model).__name__}, not an nn.Module; "
                        "use model=torchvision with a state_dict instead")
    return model


def demo_model(name: str | None = None) -> nn.Module:
    """The built-in demo CNN: the plain one (name null) or the planted-shortcut one (`shortcut`)."""
    model = DemoCNN()
    weights = DEMO_MODELS[name]
    if not weights.is_file():
        how = " --shortcut" if name == "shortcut" else ""
        raise UserError(f"demo weights missing at {weights}; run scripts/train_demo_model.py{how}")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


DEMO_RECIPE = Preprocessing(resize=64, crop=64, source="the demo model")


def load_model(cfg: ModelConfig) -> tuple[nn.Module, Preprocessing]:
    """The model in eval mode with frozen parameters and no in-place activations, and its own
    input recipe (what data.resize, crop, mean, std and interpolation default to).

    In-place ops after the target layer would write into the hooked activation (a leaf that
    requires grad), so they are switched off; the cost is one extra buffer per such op.
    """
    recipe = Preprocessing()
    if cfg.source == "demo":
        model, recipe = demo_model(cfg.name), DEMO_RECIPE
    elif cfg.source == "torchvision":
        model = _torchvision_model(cfg)
    elif cfg.source in ("timm", "huggingface"):
        from gradcam_batch import model_sources

        model, recipe = (model_sources.timm_model if cfg.source == "timm" else model_sources.huggingface_model)(cfg)
    else:
        model = _checkpoint_model(cfg)
    model.eval().requires_grad_(False)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model, recipe


def build_model(cfg: ModelConfig) -> nn.Module:
    """load_model's model alone."""
    return load_model(cfg)[0]
