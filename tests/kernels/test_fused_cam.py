"""kernels.fused_cam against gradcam_batch.methods.compute_cam evaluated in float64.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) with small B and C
so the file stays fast on 2 cores; the full grid runs on a GPU (`gpu` marker).
"""

import zlib

import pytest
import torch
import triton

import kernels.cam as kernels_cam
from gradcam_batch.methods import METHODS, compute_cam
from kernels import fused_cam
from kernels.cam import (
    MAX_FUSED_BLOCK_HW,
    SPLIT_BLOCK_HW,
    _fused_cam,
    _partial_configs,
    _position_block,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    """NaN-filled partial and weight buffers: reading a slot nobody wrote gives NaN maps."""
    monkeypatch.setattr(kernels_cam, "POISON_SCRATCH", True)


# Max error on normalized maps (values in [0, 1]); raw maps are compared relative to their max.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

# (B, K, C, H, W) sized for the interpreter; each says why it is here.
CPU_SHAPES = [
    pytest.param((2, 1, 3, 7, 7), id="K1-C3-7x7"),  # K = 1 and C smaller than one channel block
    pytest.param((2, 3, 37, 7, 7), id="K3-C37-7x7"),  # odd C: the last channel block is partial
    pytest.param((2, 3, 5, 1, 1), id="K3-C5-1x1"),  # H = W = 1: one position, a constant map
    pytest.param((2, 3, 64, 14, 14), id="K3-C64-14x14"),  # C a multiple of the block; HW = 196
    pytest.param((1, 3, 37, 5, 9), id="K3-C37-5x9"),  # non-square: mixing up H and W shows
    pytest.param((2, 1, 5, 28, 28), id="K1-C5-28x28"),  # 784 positions in a 1024 tile
    pytest.param((1, 2, 5, 56, 56), id="K2-C5-56x56"),  # largest fused map in the benchmarks
    pytest.param((1, 2, 5, 70, 70), id="K2-C5-70x70"),  # 4900 > 4096 positions: split path
]

# The GPU grid: real batch and channel counts, every shape (K = 1 and K = 3).
GPU_SHAPES = [
    pytest.param((8, 3, 37, 7, 7), id="C37-7x7"),  # odd C
    pytest.param((8, 1, 512, 7, 7), id="K1-C512-7x7"),  # ResNet-50 layer4-like, many blocks
    pytest.param((8, 3, 256, 1, 1), id="C256-1x1"),  # one position
    pytest.param((8, 3, 512, 14, 14), id="C512-14x14"),  # HW = 196, not a multiple of 16
    pytest.param((4, 3, 33, 5, 9), id="C33-5x9"),  # non-square, odd C
    pytest.param((8, 3, 256, 28, 28), id="C256-28x28"),  # 1024-position tile
    pytest.param((4, 3, 256, 56, 56), id="C256-56x56"),  # largest fused tile
    pytest.param((2, 3, 64, 70, 70), id="C64-70x70"),  # split path
    pytest.param((2, 1, 37, 64, 64), id="K1-C37-64x64"),  # exactly one 4096 tile
]


def make_inputs(shape, dtype, layout, seed, signed=False):
    """Random A (post-ReLU-like unless `signed`) and G (B, K, C, H, W) in `layout`.

    nchw: both contiguous. nhwc: channels_last A and per-image channels-last G.
    kfirst: G produced as (K, B, C, H, W) and transposed, as a batched backward returns it.
    """
    batch, targets, channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(batch, channels, height, width, generator=generator)
    if not signed:
        activations = activations.relu()
    gradients = torch.randn(batch, targets, channels, height, width, generator=generator)
    activations = activations.to(device=DEVICE, dtype=dtype)
    gradients = gradients.to(device=DEVICE, dtype=dtype)
    if layout == "nhwc":
        activations = activations.contiguous(memory_format=torch.channels_last)
        gradients = gradients.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    elif layout == "kfirst":
        gradients = gradients.transpose(0, 1).contiguous().transpose(0, 1)
    return activations, gradients


def reference(activations, gradients, method, normalize):
    """The oracle: float64 evaluation of the (already dtype-rounded) inputs."""
    return compute_cam(activations.double(), gradients.double(), method, normalize, dtype=torch.float64)


def poisoned_out(shape):
    batch, targets, _, height, width = shape
    return torch.full((batch, targets, height, width), float("nan"), device=DEVICE)


def assert_close(result, expected, normalize, tolerance):
    assert result.dtype == torch.float32 and result.is_contiguous()
    assert result.shape == expected.shape
    assert not torch.isnan(result).any(), "NaN in the result (unwritten or 0/0)"
    error = (result.double() - expected).abs().flatten(-2)
    if not normalize:  # raw values scale with C: compare relative to each map's max
        error = error / expected.abs().flatten(-2).amax(-1, keepdim=True).clamp_min(1e-12)
    assert error.max().item() <= tolerance, f"max error {error.max().item():.3g} > {tolerance}"


def check(shape, method, dtype, layout, normalize, seed, launch=fused_cam, **kwargs):
    activations, gradients = make_inputs(shape, dtype, layout, seed, signed=kwargs.pop("signed", False))
    out = poisoned_out(shape)
    result = launch(activations, gradients, method, normalize, out=out, **kwargs)
    assert result is out
    expected = reference(activations, gradients, method, normalize)
    assert_close(result, expected, normalize, TOLERANCE[dtype])


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(method, shape, dtype, layout, normalize):
    seed = zlib.crc32(f"{method}-{shape}-{dtype}-{layout}-{normalize}".encode())  # fresh, stable
    check(shape, method, dtype, layout, normalize, seed)


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


@pytest.mark.parametrize("method", METHODS)
def test_strides_that_do_not_collapse(method):
    # Every other row of a larger map: stride_h != W * stride_w, so (H, W) are indexed apart.
    activations, gradients = make_inputs((2, 2, 5, 14, 7), torch.float32, "nchw", seed=3)
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


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 7, 7), (1, 2, 5, 9, 11)], ids=["7x7", "9x11"])
@pytest.mark.parametrize("method", METHODS)
def test_forced_split_path(method, shape, normalize):
    # 16-position tiles: several position blocks, the weights kernel and a chunked finish.
    check(shape, method, torch.float32, "nhwc", normalize, seed=5, launch=_fused_cam,
          max_fused_block_hw=16, split_block_hw=16)


@pytest.mark.parametrize("method", METHODS)
def test_several_channel_blocks_per_program(method):
    # C_ITERS > 1: 37 channels in groups of 3 x 4, the last group partial.
    check((2, 3, 37, 7, 7), method, torch.float32, "nchw", True, seed=6, launch=_fused_cam,
          config=triton.Config({"BLOCK_C": 4, "C_ITERS": 3}))


class FakeTuner:
    """Stands in for triton.autotune, which needs a CUDA timer: 'chooses' the candidate with the
    largest channel group, so the chosen config uses fewer partial slots than were allocated."""

    def __init__(self, kernel, configs):
        self.kernel, self.configs, self.best_config = kernel, configs, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.best_config = max(self.configs, key=lambda c: c.kwargs["BLOCK_C"] * c.kwargs.get("C_ITERS", 1))
            self.kernel[grid](*args, **kwargs, **self.best_config.kwargs)

        return launch


@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam"])
def test_tuned_launch_path(method, monkeypatch):
    # The GPU path: tune once into a buffer sized for any candidate, then reuse the choice.
    module = kernels_cam
    monkeypatch.setattr(module, "INTERPRETER_BLOCK_C", None)
    monkeypatch.setattr(module, "_tuner", lambda name, kernel, configs, key, cache_key: FakeTuner(kernel, configs))
    monkeypatch.setattr(module, "_CHOSEN_CONFIGS", {})
    for shape in [(2, 3, 37, 7, 7), (1, 2, 5, 70, 70)]:  # fused and split path
        for _ in range(2):  # the first call tunes, the second launches the chosen config
            check(shape, method, torch.float32, "nhwc", True, seed=12)
    assert len(module._CHOSEN_CONFIGS) == 2


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_gradients_give_zero_maps_not_nan(method, normalize):
    activations, _ = make_inputs((2, 3, 5, 7, 7), torch.float32, "nchw", seed=7)
    gradients = torch.zeros(2, 3, 5, 7, 7, device=DEVICE)
    result = fused_cam(activations, gradients, method, normalize, out=poisoned_out((2, 3, 5, 7, 7)))
    assert torch.equal(result, torch.zeros_like(result))


def test_empty_batch_and_no_channels():
    activations, gradients = make_inputs((2, 3, 5, 7, 7), torch.float32, "nchw", seed=8)
    assert fused_cam(activations[:0], gradients[:0]).shape == (0, 3, 7, 7)
    no_channels = fused_cam(activations[:, :0], gradients[:, :, :0])
    assert torch.equal(no_channels, torch.zeros(2, 3, 7, 7, device=DEVICE))


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernels_cam, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        fused_cam(*good_inputs())


# ------------------------------------------------------------------------------------------
# GPU: the full grid with fixed tile configs (one compile per case), then the autotuned path
# ------------------------------------------------------------------------------------------

GPU_LAYOUTS = [
    pytest.param(torch.bfloat16, "nhwc", id="bf16-nhwc"),  # what the engine hands over on CUDA
    pytest.param(torch.float32, "nchw", id="fp32-nchw"),
]
GPU_EXTRA_LAYOUTS = [
    pytest.param(torch.float16, "kfirst", id="fp16-kfirst"),  # batched-backward gradient view
    pytest.param(torch.bfloat16, "nchw", id="bf16-nchw"),
]


def gpu_grid_case(shape, method, dtype, layout):
    # Cycle through the autotuner's candidates (all tile sizes, C_ITERS > 1) across the grid.
    block_hw, _ = _position_block(shape[3] * shape[4], MAX_FUSED_BLOCK_HW, SPLIT_BLOCK_HW)
    candidates = _partial_configs(block_hw, min(triton.next_power_of_2(shape[2]), 256))
    seed = zlib.crc32(f"{shape}-{method}-{dtype}-{layout}".encode())
    for normalize in (True, False):
        check(shape, method, dtype, layout, normalize, seed, launch=_fused_cam,
              config=candidates[seed % len(candidates)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, layout", GPU_LAYOUTS)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_gpu_grid(method, shape, dtype, layout):
    gpu_grid_case(shape, method, dtype, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, layout", GPU_EXTRA_LAYOUTS)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_gpu_grid_other_layouts(method, shape, dtype, layout):
    gpu_grid_case(shape, method, dtype, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(
    "shape",
    [(8, 3, 512, 7, 7), (8, 3, 256, 14, 14), (4, 3, 128, 28, 28), (2, 3, 64, 56, 56), (2, 2, 32, 70, 70)],
    ids=["7x7", "14x14", "28x28", "56x56", "70x70"],
)
def test_gpu_autotuned(shape, layout):
    # The public path: autotune on the first call, the chosen config on the second.
    for _ in range(2):
        check(shape, "gradcam", torch.bfloat16, layout, True, seed=13)


@pytest.mark.gpu
def test_gpu_deterministic():
    activations, gradients = make_inputs((8, 5, 512, 14, 14), torch.bfloat16, "nhwc", seed=11)
    first = fused_cam(activations, gradients, "gradcam", normalize=False)
    for _ in range(3):
        assert torch.equal(fused_cam(activations, gradients, "gradcam", normalize=False), first)
