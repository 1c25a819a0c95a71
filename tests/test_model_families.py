"""Vision transformers, timm and Hugging Face models: the layer choice, the token reshape, and the
maps against pytorch-grad-cam and a float64 full backward (random weights, CPU, offline)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, DataConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.layers import MapView, map_view, resolve_target_layers
from gradcam_batch.models import load_model
from reference import full_backward_reference

warnings.filterwarnings("ignore", category=UserWarning)
timm = pytest.importorskip("timm")


def explain(model, layers, images, method="gradcam", **cam):
    engine = CamEngine(model, layers, CamConfig(method=method, **cam), torch.device("cpu"))
    return engine(images, torch.full((images.shape[0],), -1))


def images_of(size, count=2, seed=3):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tokens_to_maps(prefix, side):
    """pytorch-grad-cam's reshape_transform for ViTs, with this model's grid and prefix."""
    def reshape(tensor):
        return tensor[:, prefix:, :].reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)
    return reshape


def nhwc_to_maps(tensor):
    return tensor.permute(0, 3, 1, 2)


def pytorch_grad_cam_maps(model, layer_name, images, classes, method, reshape):
    """pytorch-grad-cam's maps of `classes` (B,) at the layer's own resolution, each scaled to a
    peak of 1.

    It min-max normalizes twice (per layer, then after averaging the layers), which cancels the
    1e-7 in the denominator that our single normalization keeps, as the design's formula says.
    A random-weight ViT's raw maps span ~1e-3, so that term alone moves values by ~1e-4;
    scaling both sides to a peak of 1 compares the maps without it."""
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    explainer_class = {"gradcam": cams.GradCAM, "layercam": cams.LayerCAM, "gradcampp": cams.GradCAMPlusPlus}[method]
    reference = copy.deepcopy(model).requires_grad_(True)
    layer = reference.get_submodule(layer_name)
    explainer = explainer_class(model=reference, target_layers=[layer], reshape_transform=reshape)
    grid = {}

    def size_of(tensor) -> None:  # a forward hook: returning a value would replace the output
        maps = reshape(tensor) if reshape else tensor
        grid["size"] = (maps.shape[-1], maps.shape[-2])
    explainer.get_target_width_height = lambda tensor: grid.get("size", (0, 0))
    handle = layer.register_forward_hook(lambda m, i, o: size_of(o))
    try:
        return peak_one(explainer(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes]))
    finally:
        handle.remove()


def peak_one(maps):
    """(B, h, w) maps divided by each map's maximum (an all-zero map stays zero)."""
    maps = np.asarray(maps, dtype=np.float64)
    peaks = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return maps / np.where(peaks > 0, peaks, 1.0)


@pytest.fixture(scope="module")
def torchvision_vit():
    return load_model(ModelConfig(source="torchvision", name="vit_b_16"))[0]


@pytest.fixture(scope="module")
def timm_vit():
    return load_model(ModelConfig(source="timm", name="vit_tiny_patch16_224"))


@pytest.fixture(scope="module")
def timm_swin():
    return load_model(ModelConfig(source="timm", name="swin_tiny_patch4_window7_224"))[0]


# --- how outputs read as maps ---------------------------------------------------------------

@pytest.mark.parametrize("shape, prefix, want", [
    ((2, 197, 64), None, MapView("tokens", 1, (14, 14))),  # ViT-B/16 at 224: class token
    ((2, 198, 64), None, MapView("tokens", 2, (14, 14))),  # DeiT: class + distillation tokens
    ((2, 201, 64), None, MapView("tokens", 5, (14, 14))),  # class + 4 register tokens
    ((2, 49, 64), None, MapView("tokens", 0, (7, 7))),  # Swin (Hugging Face): no prefix
    ((2, 197, 64), 1, MapView("tokens", 1, (14, 14))),  # the model says how many
    ((2, 7, 7, 768), None, MapView("nhwc")),  # Swin (timm, torchvision): channels last
    ((2, 512, 7, 7), None, MapView("nchw")),
    ((2, 7, 7, 7), None, MapView("nchw")),  # ambiguous: (B, C, H, W) as before
])
def test_map_view_of_each_layout(shape, prefix, want):
    model = nn.Module()
    if prefix is not None:
        model.num_prefix_tokens = prefix
    assert map_view(model, shape)[0] == want


@pytest.mark.parametrize("shape, prefix, reason", [
    ((2, 1000), None, "neither"),  # logits
    ((2, 34, 64), None, "no square"),  # 34 tokens: 34 - k is no square for any k <= 8
    ((2, 197, 64), 3, "less 3 leading"),  # the model's own prefix leaves no square grid
    ((2, 512, 1, 1), None, "1x1"),
    ((2, 1, 1, 768), None, "1x1"),
])
def test_map_view_refuses_what_is_no_map(shape, prefix, reason):
    model = nn.Module()
    if prefix is not None:
        model.num_prefix_tokens = prefix
    view, why = map_view(model, shape)
    assert view is None and reason in why


def test_token_maps_are_views_of_the_output():
    tokens = torch.randn(2, 197, 16)
    maps = MapView("tokens", 1, (14, 14))(tokens)
    assert maps.shape == (2, 16, 14, 14)
    assert maps.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()
    # patch (row 2, column 3) is token 1 + 2 * 14 + 3
    torch.testing.assert_close(maps[:, :, 2, 3], tokens[:, 1 + 2 * 14 + 3, :])
    gradients = torch.randn(2, 3, 197, 16)  # (B, K, N, D): the same view with a target axis
    assert MapView("tokens", 1, (14, 14))(gradients).shape == (2, 3, 16, 14, 14)
    nhwc = torch.randn(2, 7, 7, 8)
    torch.testing.assert_close(MapView("nhwc")(nhwc)[:, 5, 1, 2], nhwc[:, 1, 2, 5])


# --- the layer auto picks -------------------------------------------------------------------

def test_auto_picks_the_last_blocks_first_norm(torchvision_vit, timm_vit, timm_swin):
    sample = torch.zeros(1, 3, 224, 224)
    (layer,) = resolve_target_layers(torchvision_vit, "auto", sample)
    # not conv_proj (the patch embedding), which the old rule took for the last 4-D layer
    assert layer.name == "encoder.layers.encoder_layer_11.ln_1" and layer.view == MapView("tokens", 1, (14, 14))
    assert resolve_target_layers(timm_vit[0], "auto", sample)[0].name == "blocks.11.norm1"
    (swin,) = resolve_target_layers(timm_swin, "auto", sample)
    assert swin.name == "layers.3.blocks.1.norm1" and swin.view == MapView("nhwc")


def test_a_layer_that_gives_no_map_is_refused_in_one_line(torchvision_vit):
    sample = torch.zeros(1, 3, 224, 224)
    with pytest.raises(UserError, match="heads.head.*outputs shape") as error:
        resolve_target_layers(torchvision_vit, "heads.head", sample)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="`auto` picks one layer"):
        resolve_target_layers(torchvision_vit, ["auto", "encoder.ln"], sample)


# --- maps against pytorch-grad-cam and a float64 full backward --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_torchvision_vit_matches_pytorch_grad_cam(torchvision_vit, method):
    images = images_of(224)
    layers = resolve_target_layers(torchvision_vit, "auto", images[:1])
    result = explain(torchvision_vit, layers, images, method)
    want = pytorch_grad_cam_maps(torchvision_vit, layers[0].name, images, result.target_classes[:, 0], method,
                                 tokens_to_maps(1, 14))
    assert result.cams.shape == (2, 1, 14, 14)
    np.testing.assert_allclose(peak_one(result.cams[:, 0]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_timm_vit_matches_pytorch_grad_cam_and_float64(timm_vit, method):
    model = timm_vit[0]
    images = images_of(224)
    layers = resolve_target_layers(model, "auto", images[:1])
    result = explain(model, layers, images, method, targets="topk", topk=2)
    for k in range(2):
        want = pytorch_grad_cam_maps(model, "blocks.11.norm1", images, result.target_classes[:, k], method,
                                     tokens_to_maps(1, 14))
        np.testing.assert_allclose(peak_one(result.cams[:, k]), want, atol=1e-4, rtol=0)
    # the engine's truncated backward against an ordinary full backward, the formula in float64
    exact = full_backward_reference(model, images, result.target_classes, method, layer="blocks.11.norm1",
                                    as_maps=tokens_to_maps(1, 14))
    torch.testing.assert_close(result.cams.double(), exact, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_timm_swin_matches_pytorch_grad_cam(timm_swin, method):
    images = images_of(224)
    layers = resolve_target_layers(timm_swin, "auto", images[:1])
    assert layers[0].view == MapView("nhwc")
    result = explain(timm_swin, layers, images, method)
    want = pytorch_grad_cam_maps(timm_swin, layers[0].name, images, result.target_classes[:, 0], method,
                                 nhwc_to_maps)
    assert result.cams.shape == (2, 1, 7, 7)
    np.testing.assert_allclose(peak_one(result.cams[:, 0]), want, atol=1e-4, rtol=0)


def test_timm_cnn_equals_the_formula_by_hand():
    model, _ = load_model(ModelConfig(source="timm", name="resnet18"))
    images = images_of(96)
    layers = resolve_target_layers(model, "auto", images[:1])
    assert layers[0].name == "layer4"
    result = explain(model, layers, images, "gradcampp", targets="topk", topk=2)
    exact = full_backward_reference(model, images, result.target_classes, "gradcampp", layer="layer4")
    torch.testing.assert_close(result.cams.double(), exact, atol=1e-5, rtol=0)


# --- timm's own input recipe and weights ------------------------------------------------------

def test_timm_data_config_fills_what_the_user_left_unset(timm_vit):
    _, recipe = timm_vit
    data = DataConfig().resolved(recipe)
    # vit_tiny_patch16_224: input 224, crop_pct 0.9, mean/std 0.5, bicubic
    assert (data.resize, data.crop, data.interpolation) == (248, 224, "bicubic")
    assert data.mean == [0.5, 0.5, 0.5] and data.std == [0.5, 0.5, 0.5]
    mine = DataConfig(resize=300, mean=[0.1, 0.2, 0.3], interpolation="bilinear").resolved(recipe)
    assert (mine.resize, mine.crop, mine.interpolation, mine.mean) == (300, 224, "bilinear", [0.1, 0.2, 0.3])
    # a crop of the user's own keeps timm's resize-to-crop ratio
    assert DataConfig(crop=160).resolved(recipe).resize == round(160 * 248 / 224)


def test_timm_weights_from_a_local_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source, _ = load_model(ModelConfig(source="timm", name="resnet18", seed=5))
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file(source.state_dict(), str(path))
    loaded, _ = load_model(ModelConfig(source="timm", name="resnet18", weights=str(path), seed=9))
    images = images_of(64)
    torch.testing.assert_close(loaded(images), source(images))
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoint.pth")  # timm's training checkpoints
    loaded, _ = load_model(ModelConfig(source="timm", name="resnet18", weights=str(tmp_path / "checkpoint.pth")))
    torch.testing.assert_close(loaded(images), source(images))


def test_timm_mistakes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not a timm model; did you mean"):
        load_model(ModelConfig(source="timm", name="vit_tiny_patch16_22"))
    wrong = tmp_path / "wrong.pth"
    torch.save(load_model(ModelConfig(source="timm", name="resnet18"))[0].state_dict(), wrong)
    with pytest.raises(UserError, match="does not fit resnet34"):
        load_model(ModelConfig(source="timm", name="resnet34", weights=str(wrong)))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
        load_model(ModelConfig(source="timm", name="resnet18", weights=str(tmp_path / "bad.safetensors")))


# --- several layers at once -----------------------------------------------------------------

def test_several_layers_equal_each_layer_alone_and_fuse_by_hand():
    from gradcam_batch.methods import normalize_maps

    model = load_model(ModelConfig(source="torchvision", name="resnet18"))[0]
    images = images_of(128, count=3)
    both = resolve_target_layers(model, ["layer3", "layer4"], images[:1])
    result = explain(model, both, images, "gradcampp", targets="topk", topk=2, fuse="mean")
    assert [maps.name for maps in result.layers] == ["layer3", "layer4", "mean(layer3,layer4)"]
    for index, name in enumerate(["layer3", "layer4"]):
        alone = explain(model, resolve_target_layers(model, name, images[:1]), images, "gradcampp",
                        targets="topk", topk=2)
        torch.testing.assert_close(result.layers[index].cams, alone.cams, atol=1e-6, rtol=0)
        exact = full_backward_reference(model, images, result.target_classes, "gradcampp", layer=name)
        torch.testing.assert_close(result.layers[index].cams.double(), exact, atol=1e-5, rtol=0)
    # fused at the largest grid (layer3: 8x8): layer4's 4x4 maps upsampled bilinearly, then averaged
    layer3, layer4 = (maps.cams.double() for maps in result.layers[:2])
    upsampled = torch.nn.functional.interpolate(layer4, size=(8, 8), mode="bilinear", align_corners=False)
    want = normalize_maps((layer3 + upsampled) / 2)
    torch.testing.assert_close(result.layers[2].cams.double(), want, atol=1e-6, rtol=0)
    peak = result.layers[2].cams.flatten(2).argmax(dim=2)
    assert torch.equal(result.layers[2].peak, peak)
    maximum = explain(model, both, images, "gradcam", fuse="max")
    torch.testing.assert_close(maximum.layers[2].cams.double(), normalize_maps(torch.maximum(
        maximum.layers[0].cams.double(),
        torch.nn.functional.interpolate(maximum.layers[1].cams.double(), size=(8, 8), mode="bilinear",
                                        align_corners=False))), atol=1e-6, rtol=0)


def test_fuse_needs_several_layers():
    model = load_model(ModelConfig(source="torchvision", name="resnet18"))[0]
    with pytest.raises(UserError, match="cam.fuse=mean combines"):
        explain(model, resolve_target_layers(model, "layer4", images_of(64)[:1]), images_of(64), fuse="mean")
    with pytest.raises(UserError, match="repeats"):
        ModelConfig(source="torchvision", name="resnet18", target_layer=["layer4", "layer4"])


def test_rows_carry_the_layer_name(tmp_path):
    from cli_helpers import TINY_RESNET, read_cams, run_composed
    from sample_data import make_imagefolder

    expected = make_imagefolder(tmp_path / "data", per_class=(2, 1))
    summary = run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}",
                           "model.target_layer=[layer3,layer4]", "cam.fuse=max", "cam.targets=topk", "cam.topk=2",
                           f"output.dir={tmp_path / 'out'}")
    rows = read_cams(tmp_path / "out").to_pylist()
    assert summary.rows == len(rows) == len(expected) * 2 * 3
    by_layer = {}
    for row in rows:
        by_layer.setdefault(row["layer"], set()).add((row["sample_id"], row["target_rank"]))
        assert len(row["cam"]) == row["cam_height"] * row["cam_width"]
    assert sorted(by_layer) == ["layer3", "layer4", "max(layer3,layer4)"]
    assert all(len(pairs) == len(expected) * 2 for pairs in by_layer.values())
    sizes = {row["layer"]: (row["cam_height"], row["cam_width"]) for row in rows}
    assert sizes == {"layer3": (4, 4), "layer4": (2, 2), "max(layer3,layer4)": (4, 4)}


# --- whole runs with timm and Hugging Face models ---------------------------------------------

def test_timm_run_uses_timms_recipe_and_records_it(tmp_path):
    import json

    from cli_helpers import read_cams, run_composed
    from sample_data import make_imagefolder

    expected = make_imagefolder(tmp_path / "data", per_class=(1, 1))
    run_composed("model=timm", "model.name=vit_tiny_patch16_224", "data=imagefolder",
                 f"data.root={tmp_path / 'data'}", "data.num_workers=0", "runtime.progress=false",
                 f"output.dir={tmp_path / 'out'}")
    rows = read_cams(tmp_path / "out").to_pylist()
    assert len(rows) == len(expected)
    assert {(row["layer"], row["cam_height"], row["cam_width"]) for row in rows} == {("blocks.11.norm1", 14, 14)}
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    recipe = manifest["preprocessing"]
    assert (recipe["resize"], recipe["crop"], recipe["interpolation"]) == (248, 224, "bicubic")
    assert recipe["mean"] == [0.5, 0.5, 0.5]


def save_tiny_hf_vit(path, processor_size=32):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": processor_size, "width": processor_size},
                                   image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2]).save_pretrained(path)


def test_huggingface_vit_from_a_local_folder(tmp_path):
    save_tiny_hf_vit(tmp_path / "vit")
    model, recipe = load_model(ModelConfig(source="huggingface", name=str(tmp_path / "vit")))
    assert (recipe.resize, recipe.crop, recipe.mean) == (32, 32, (0.4, 0.4, 0.4))
    images = images_of(32)
    layers = resolve_target_layers(model, "auto", images[:1])
    assert layers[0].name.endswith("1.layernorm_before")  # vit.layers.1 (transformers 5), vit.encoder.layer.1 (4)
    assert layers[0].view == MapView("tokens", 1, (4, 4))
    result = explain(model, layers, images, "gradcam", targets="topk", topk=2)
    exact = full_backward_reference(model, images, result.target_classes, "gradcam", layer=layers[0].name,
                                    as_maps=tokens_to_maps(1, 4))
    torch.testing.assert_close(result.cams.double(), exact, atol=1e-5, rtol=0)


def test_huggingface_mistakes_are_one_line(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(UserError, match="nothing is downloaded") as error:
        load_model(ModelConfig(source="huggingface", name="someone/not-in-the-cache"))
    assert "\n" not in str(error.value)
    save_tiny_hf_vit(tmp_path / "vit")
    with pytest.raises(UserError, match="leave model.weights unset"):
        load_model(ModelConfig(source="huggingface", name=str(tmp_path / "vit"), weights="x.pth"))
    with pytest.raises(UserError, match="needs model.name"):
        ModelConfig(source="timm")


def tiny_hf_models():
    """Tiny configs of each Hugging Face family the README lists: (config, model class, processor,
    the layer auto must pick (name suffix), how its output reads as maps, the formula's reshape)."""
    transformers = pytest.importorskip("transformers")
    T = transformers
    vit_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5)
    square = T.ViTImageProcessor(size={"height": 32, "width": 32})
    return {
        "deit": (T.DeiTConfig(**vit_like), T.DeiTForImageClassification, square,
                 "1.layernorm_before", MapView("tokens", 2, (4, 4)), tokens_to_maps(2, 4)),
        "beit": (T.BeitConfig(**vit_like, use_mean_pooling=True), T.BeitForImageClassification, square,
                 "1.layernorm_before", MapView("tokens", 1, (4, 4)), tokens_to_maps(1, 4)),
        "dinov2": (T.Dinov2Config(**{k: v for k, v in vit_like.items() if k != "intermediate_size"}),
                   T.Dinov2ForImageClassification, square, "1.norm1", MapView("tokens", 1, (4, 4)),
                   tokens_to_maps(1, 4)),
        "swin": (T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                              window_size=4, num_labels=5), T.SwinForImageClassification, square,
                 "layers.1.blocks.0.layernorm_before", MapView("tokens", 0, (4, 4)), tokens_to_maps(0, 4)),
        "convnext": (T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5),
                     T.ConvNextForImageClassification, T.ConvNextImageProcessor(size={"shortest_edge": 32}),
                     "stages.1", MapView("nchw"), None),
    }


@pytest.mark.parametrize("family", ["deit", "beit", "dinov2", "swin", "convnext"])
def test_huggingface_families_pick_their_layer_and_equal_the_formula(tmp_path, family):
    config, model_class, processor, layer_suffix, view, as_maps = tiny_hf_models()[family]
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path / family)
    processor.save_pretrained(tmp_path / family)
    model, recipe = load_model(ModelConfig(source="huggingface", name=str(tmp_path / family)))
    assert recipe.crop == 32
    images = images_of(32)
    (layer,) = resolve_target_layers(model, "auto", images[:1])
    assert layer.name.endswith(layer_suffix) and layer.view == view
    result = explain(model, [layer], images, "gradcam", targets="topk", topk=2)
    exact = full_backward_reference(model, images, result.target_classes, "gradcam", layer=layer.name,
                                    as_maps=as_maps)
    torch.testing.assert_close(result.cams.double(), exact, atol=1e-5, rtol=0)


def test_timm_pretrained_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    """With empty caches, `pretrained` fails at once in one line: nothing is downloaded (the
    hub is put in offline mode, and torch hub files are looked up before timm could fetch them)."""
    import os
    import time

    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at call time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    started = time.monotonic()
    with pytest.raises(UserError, match="not in the local") as error:
        load_model(ModelConfig(source="timm", name="vit_tiny_patch16_224", weights="pretrained"))
    assert "\n" not in str(error.value) and time.monotonic() - started < 30
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # the offline switch is put back
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").rglob("*.safetensors"))
