"""gradcam_batch.kernels.fused_cam against gradcam_batch.methods.compute_cam evaluated in float64.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) with small B and C
so the file stays fast on 2 cores. The default path takes its tiling from the config table or
the heuristic; forced configs (`_fused_cam(config=...)`) reach every tiling on small shapes.
The GPU tests (`gpu` marker) live in test_fused_cam_gpu.py, the helpers in cam_helpers.py.
"""

import pytest
import torch

import gradcam_batch.kernels.cam as kernels_cam
from cam_helpers import (
    DEVICE,
    TOLERANCE,
    assert_close,
    check,
    fresh_seed,
    make_inputs,
    poisoned_out,
    reference,
)
from gradcam_batch.methods import METHODS
from gradcam_batch.kernels import fused_cam
from gradcam_batch.kernels.cam import _fused_cam
from gradcam_batch.kernels.cam_configs import CamConfig


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    """NaN-filled partial and channel-sum buffers: reading a slot nobody wrote gives NaN maps."""
    monkeypatch.setattr(kernels_cam, "POISON_SCRATCH", True)


# (B, K, C, H, W) sized for the interpreter; each says why it is here.
CPU_SHAPES = [
    pytest.param((2, 1, 3, 7, 7), id="K1-C3-7x7"),  # K = 1 and C smaller than one channel block
    pytest.param((2, 3, 37, 7, 7), id="K3-C37-7x7"),  # odd C: one partial channel block
    pytest.param((2, 3, 5, 1, 1), id="K3-C5-1x1"),  # H = W = 1: one position, a constant map
    pytest.param((2, 3, 64, 14, 14), id="K3-C64-14x14"),  # two channel groups: partial maps + finish
    pytest.param((1, 3, 37, 5, 9), id="K3-C37-5x9"),  # non-square: mixing up H and W shows
    pytest.param((2, 1, 5, 28, 28), id="K1-C5-28x28"),  # position tiles: channel sums + map pass
    pytest.param((1, 2, 5, 56, 56), id="K2-C5-56x56"),  # several position tiles, one channel group
    pytest.param((1, 2, 5, 70, 70), id="K2-C5-70x70"),  # 4900 positions: finish in several chunks
]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(method, shape, dtype, layout, normalize):
    check(shape, method, dtype, layout, normalize, fresh_seed(method, shape, dtype, layout, normalize))


# Forced tilings: every path of the kernels on shapes the interpreter runs quickly. Each config
# says what it reaches; the shapes put tile boundaries inside the map and the channel range.
FORCED = [
    # Whole map per tile, 5 channel groups of 8: partial maps, the finish sums 5 slots.
    pytest.param((2, 3, 37, 7, 7), CamConfig("whole", 8, 1, 64, 2), id="whole-groups"),
    # 3 channel blocks per program (C_ITERS) with K = 3: the targets loop outside the blocks.
    pytest.param((2, 3, 37, 7, 7), CamConfig("whole", 4, 3, 64, 1), id="whole-c_iters"),
    # One program holds every channel and the whole map: it normalizes and writes final maps.
    pytest.param((2, 2, 37, 5, 9), CamConfig("whole", 64, 1, 64, 4), id="whole-direct"),
    # Position tiles of 16 over 99 positions (last tile partial), 3 channel groups of 2 x 8,
    # channel sums in splits of 2 x 8 positions (7 splits, the last partial).
    pytest.param((1, 2, 37, 9, 11), CamConfig("tiled", 8, 2, 16, 2, 8, 8, 2, 1), id="tiled-groups"),
    # One channel group over several position tiles: the finish only normalizes (one slot),
    # or, raw, the map pass writes the final maps itself.
    pytest.param((2, 2, 20, 9, 11), CamConfig("tiled", 16, 2, 32, 1, 16, 32, 1, 1), id="tiled-one-group"),
    # Channel sums over 3 blocks of 4 positions per split: a split size that is no power of two.
    pytest.param((1, 3, 21, 7, 6), CamConfig("tiled", 8, 1, 8, 1, 4, 4, 3, 1), id="tiled-odd-splits"),
]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape, config", FORCED)
@pytest.mark.parametrize("method", METHODS)
def test_forced_tilings(method, shape, config, layout, normalize):
    seed = fresh_seed(method, shape, config, layout, normalize)
    check(shape, method, torch.float32, layout, normalize, seed, launch=_fused_cam, config=config)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("method", METHODS)
def test_forced_tilings_bf16(method, normalize):
    # bf16 loads on the position-tiled path with channel sums (fp32 paths are above).
    check((1, 2, 37, 9, 11), method, torch.bfloat16, "nhwc", normalize, seed=fresh_seed(method, normalize),
          launch=_fused_cam, config=CamConfig("tiled", 8, 2, 16, 2, 8, 8, 2, 1))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam"])
def test_finish_in_slot_and_position_chunks(method, normalize, monkeypatch):
    # Finish tiles of 2 slots x 16 positions: it loops over slot chunks (5 groups) and over
    # position chunks (63 positions), and normalizes in two passes.
    monkeypatch.setattr(kernels_cam, "_FINISH_MAX_SLOTS", 2)
    monkeypatch.setattr(kernels_cam, "_FINISH_TILE", 32)
    monkeypatch.setattr(kernels_cam, "_PLANS", {})
    check((1, 2, 37, 7, 9), method, torch.float32, "nchw", normalize, seed=fresh_seed(method, normalize),
          launch=_fused_cam, config=CamConfig("whole", 8, 1, 64, 2))


def test_more_slots_than_one_finish_load():
    # 130 channels in groups of 2: 65 partial maps, more than the 64 the finish loads at once.
    check((1, 1, 130, 1, 1), "gradcam", torch.float32, "nchw", True, seed=21, launch=_fused_cam,
          config=CamConfig("whole", 2, 1, 1, 1))


@pytest.mark.parametrize("method", METHODS)
def test_four_dimensional_gradients_are_one_target(method):
    activations, gradients = make_inputs((2, 1, 37, 7, 7), torch.float32, "nchw", seed=1)
    result = fused_cam(activations, gradients[:, 0], method)
    assert result.shape == (2, 1, 7, 7)
    assert_close(result, reference(activations, gradients, method, True), True, 1e-4)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("method", METHODS)
def test_transposed_gradient_view_and_mixed_dtypes(method, normalize):
    # G as a batched backward returns it, (K, B, ...) transposed; A bf16 and G fp32 differ.
    activations, gradients = make_inputs((2, 3, 37, 7, 7), torch.float32, "kfirst", seed=2)
    activations = activations.to(torch.bfloat16)
    result = fused_cam(activations, gradients, method, normalize)
    assert_close(result, reference(activations, gradients, method, normalize), normalize, 1e-4)


@pytest.mark.parametrize("shape", [(2, 2, 5, 14, 7), (1, 2, 5, 40, 20)], ids=["whole", "tiled"])
@pytest.mark.parametrize("method", METHODS)
def test_strides_that_do_not_collapse(method, shape):
    # Every other row of a larger map: stride_h != W * stride_w, so (H, W) are indexed apart
    # (layout "other"), on the whole-map path and on the position-tiled one (20 x 20 maps).
    activations, gradients = make_inputs(shape, torch.float32, "nchw", seed=3)
    activations, gradients = activations[:, :, ::2], gradients[:, :, :, ::2]
    result = fused_cam(activations, gradients, method)
    assert_close(result, reference(activations, gradients, method, True), True, 1e-4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "kfirst"])
def test_inputs_are_read_in_place_without_a_copy(layout):
    activations, gradients = make_inputs((2, 3, 37, 7, 7), torch.bfloat16, layout, seed=14)
    expected = reference(activations, gradients, "gradcam", True)

    def refuse(self, *args, **kwargs):
        raise AssertionError("fused_cam copied an input")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("contiguous", "clone", "to", "reshape"):
            patch.setattr(torch.Tensor, name, refuse)
        result = fused_cam(activations, gradients, "gradcam")
    assert_close(result, expected, True, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "elementwise"])
def test_signed_activations(method):
    # Pre-ReLU features. gradcampp and xgradcam divide by sum_s A, which cancels towards 0 for
    # signed A: ill-conditioned by design, so fp32 vs float64 is no fair test there.
    check((2, 3, 37, 7, 7), method, torch.float32, "nchw", True, seed=4, signed=True)


@pytest.mark.parametrize("config", [None, CamConfig("tiled", 4, 1, 16, 1, 4, 16, 1, 1)], ids=["default", "tiled"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_gradients_give_zero_maps_not_nan(method, normalize, config):
    activations, _ = make_inputs((2, 3, 5, 7, 7), torch.float32, "nchw", seed=7)
    gradients = torch.zeros(2, 3, 5, 7, 7, device=DEVICE)
    result = _fused_cam(activations, gradients, method, normalize, out=poisoned_out((2, 3, 5, 7, 7)),
                        config=config)
    assert torch.equal(result, torch.zeros_like(result))


def test_empty_batch_and_no_channels():
    activations, gradients = make_inputs((2, 3, 5, 7, 7), torch.float32, "nchw", seed=8)
    assert fused_cam(activations[:0], gradients[:0]).shape == (0, 3, 7, 7)
    no_channels = fused_cam(activations[:, :0], gradients[:, :, :0])
    assert torch.equal(no_channels, torch.zeros(2, 3, 7, 7, device=DEVICE))


# ------------------------------------------------------------------------------------------
# Launch plans: built once per call signature
# ------------------------------------------------------------------------------------------


@pytest.fixture
def counted_plans(monkeypatch):
    """Count plan builds and input checks, starting from an empty plan cache."""
    counts = {"plans": 0, "checks": 0}
    build, check_inputs = kernels_cam._build_plan, kernels_cam._check_inputs

    def counted_build(*args, **kwargs):
        counts["plans"] += 1
        return build(*args, **kwargs)

    def counted_check(*args, **kwargs):
        counts["checks"] += 1
        return check_inputs(*args, **kwargs)

    monkeypatch.setattr(kernels_cam, "_PLANS", {})
    monkeypatch.setattr(kernels_cam, "_build_plan", counted_build)
    monkeypatch.setattr(kernels_cam, "_check_inputs", counted_check)
    return counts


def test_repeated_calls_reuse_the_plan(counted_plans):
    activations, gradients = make_inputs((2, 3, 37, 7, 7), torch.float32, "nhwc", seed=15)
    first = fused_cam(activations, gradients, "gradcam")
    for _ in range(3):
        assert torch.equal(fused_cam(activations, gradients, "gradcam"), first)
    assert counted_plans == {"plans": 1, "checks": 1}
    # Other values with the same shapes, strides and dtypes share the plan too.
    other_activations, other_gradients = make_inputs((2, 3, 37, 7, 7), torch.float32, "nhwc", seed=16)
    result = fused_cam(other_activations, other_gradients, "gradcam")
    assert_close(result, reference(other_activations, other_gradients, "gradcam", True), True, 1e-4)
    assert counted_plans["plans"] == 1


def test_a_changed_signature_gets_its_own_plan(counted_plans):
    activations, gradients = make_inputs((2, 3, 37, 7, 7), torch.float32, "nchw", seed=17)
    nhwc_activations, nhwc_gradients = make_inputs((2, 3, 37, 7, 7), torch.float32, "nhwc", seed=17)
    calls = [
        (activations, gradients, "gradcam", True),
        (activations, gradients, "gradcam", False),  # normalize
        (activations, gradients, "layercam", True),  # method
        (nhwc_activations, nhwc_gradients, "gradcam", True),  # strides
        (activations.to(torch.bfloat16), gradients, "gradcam", True),  # dtype
        (activations[:1], gradients[:1], "gradcam", True),  # shape
    ]
    for activations_, gradients_, method, normalize in calls:
        result = fused_cam(activations_, gradients_, method, normalize)
        assert_close(result, reference(activations_, gradients_, method, normalize), normalize, 1e-4)
    assert counted_plans["plans"] == len(calls)


def test_bad_out_is_caught_even_after_a_plan_exists():
    activations, gradients = make_inputs((2, 3, 5, 7, 7), torch.float32, "nchw", seed=18)
    fused_cam(activations, gradients)
    with pytest.raises(ValueError, match="shape"):
        fused_cam(activations, gradients, out=torch.empty(2, 3, 7, 8, device=DEVICE))


# ------------------------------------------------------------------------------------------
# Errors a caller can cause
# ------------------------------------------------------------------------------------------


def good_inputs():
    return make_inputs((2, 3, 5, 7, 7), torch.float32, "nchw", seed=9)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a, g: (a[0], g, "gradcam"), ValueError, "activations must be"),
        (lambda a, g: (a, g[0, 0], "gradcam"), ValueError, "gradients must be"),
        (lambda a, g: (a, g[:, :, :4], "gradcam"), ValueError, "do not match"),
        (lambda a, g: (a[:1], g, "gradcam"), ValueError, "do not match"),
        (lambda a, g: (a, g, "gradcam++"), ValueError, "unknown CAM method"),
        (lambda a, g: (a, g, None), TypeError, "method must be a string"),
        (lambda a, g: (a.numpy(force=True), g, "gradcam"), TypeError, "activations must be a torch.Tensor"),
        (lambda a, g: ((a * 10).long(), g, "gradcam"), TypeError, "torch.int64 is not supported"),
        (lambda a, g: (a, g.double(), "gradcam"), TypeError, "torch.float64 is not supported"),
        (lambda a, g: (a, g.to("meta"), "gradcam"), ValueError, "same device"),
    ],
    ids=["A-rank", "G-rank", "C-mismatch", "B-mismatch", "method", "method-type", "not-tensor",
         "int-dtype", "float64", "devices"],
)
def test_bad_inputs_raise_clear_errors(change, error, message):
    with pytest.raises(error, match=message):
        fused_cam(*change(*good_inputs()))


@pytest.mark.parametrize(
    "out, message",
    [
        (torch.empty(2, 3, 7, 8), "shape"),
        (torch.empty(2, 3, 7, 7, dtype=torch.float64), "float32"),
        (torch.empty(2, 3, 7, 14)[..., ::2], "contiguous"),
    ],
    ids=["shape", "dtype", "strided"],
)
def test_bad_out_raises(out, message):
    with pytest.raises(ValueError, match=message):
        fused_cam(*good_inputs(), out=out.to(DEVICE))


def test_config_that_cannot_run_the_problem_is_refused():
    activations, gradients = good_inputs()
    with pytest.raises(ValueError, match="whole map"):
        _fused_cam(activations, gradients, "gradcam", True, config=CamConfig("whole", 8, 1, 16, 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernels_cam, "INTERPRETED", False)
    monkeypatch.setattr(kernels_cam, "_PLANS", {})
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        fused_cam(*good_inputs())


@pytest.mark.parametrize("layout", ["tokens", "nhwc-tokens"])
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_transformer_outputs_read_in_place(layout, method):
    """A ViT's tokens (B, N, D) less the class token, and a Swin's (B, H, W, C), read through
    MapView's strided views (the batch stride spans the dropped token): no copy, same maps."""
    from gradcam_batch.layers import MapView

    generator = torch.Generator().manual_seed(fresh_seed("tokens", layout, method))
    if layout == "tokens":
        view, tokens = MapView("tokens", 1, (5, 5)), 1 + 25
        activations = torch.randn(2, tokens, 24, generator=generator).abs().to(DEVICE)
        gradients = torch.randn(2, 3, tokens, 24, generator=generator).to(DEVICE)
    else:
        view = MapView("nhwc")
        activations = torch.randn(2, 5, 5, 24, generator=generator).abs().to(DEVICE)
        gradients = torch.randn(2, 3, 5, 5, 24, generator=generator).to(DEVICE)
    maps, grads = view(activations), view(gradients)
    assert maps.data_ptr() != 0 and maps.untyped_storage().data_ptr() == activations.untyped_storage().data_ptr()
    result = fused_cam(maps, grads, method, True)
    assert_close(result, reference(maps, grads, method, True), True, TOLERANCE[torch.float32])
