"""fused_cam on a real GPU against the float64 oracle (`gpu` marker: skipped without CUDA).

The grid holds every bucket of the committed table at small batch (the table's configs on the
shapes they were chosen for), the heuristic on odd shapes, every sweep candidate of two
buckets, CUDA graph capture (what the benchmark times) and the autotune cache. The distinct
kernel variants (about 150) are compiled up front in parallel processes, so the module runs in
well under a minute.
"""

import itertools
import json
import os

import pytest
import torch

import gradcam_batch.kernels.cam as kernels_cam
from cam_helpers import TOLERANCE, assert_close, check, fresh_seed, make_inputs, reference
from gradcam_batch.methods import METHODS
from gradcam_batch.kernels import cam_configs, fused_cam
from gradcam_batch.kernels.cam import _fused_cam, warmup_specs
from gradcam_batch.kernels.cam_configs import Problem

pytestmark = pytest.mark.gpu

# The benchmark's maps and channel counts at batch 4 (2 for 56x56): the table's buckets.
TABLE_SHAPES = [(4, 2048, 7, 7), (4, 1024, 14, 14), (4, 512, 28, 28), (2, 256, 56, 56)]
TABLE_CASES = [
    pytest.param((batch, targets, channels, height, width), method, layout,
                 id=f"{channels}x{height}x{width}-K{targets}-{layout}-{method}")
    for (batch, channels, height, width), targets, layout, method
    in itertools.product(TABLE_SHAPES, (1, 5), ("nchw", "nhwc"), METHODS)
]
# Shapes outside the table (heuristic configs), each with why it is here.
ODD_CASES = [
    pytest.param((8, 3, 37, 7, 7), torch.float32, "nchw", id="C37-7x7-fp32"),  # odd C, fp32
    pytest.param((8, 3, 256, 1, 1), torch.bfloat16, "nhwc", id="C256-1x1"),  # one position
    pytest.param((4, 3, 33, 5, 9), torch.bfloat16, "nchw", id="C33-5x9"),  # non-square, odd C
    pytest.param((2, 3, 64, 70, 70), torch.bfloat16, "nhwc", id="C64-70x70"),  # 4900 positions
    pytest.param((2, 1, 37, 64, 64), torch.bfloat16, "nchw", id="K1-C37-64x64"),  # 4096 positions
    pytest.param((4, 3, 512, 14, 14), torch.float16, "kfirst", id="C512-14x14-kfirst"),  # batched view
]
ODD_METHODS = ["gradcam", "gradcampp", "layercam"]  # one per family
# Every sweep candidate of two buckets: the sweep must never meet a config that fails.
CANDIDATE_BUCKETS = [((4, 1, 2048, 7, 7), "gradcampp", "nhwc"), ((2, 1, 256, 56, 56), "gradcam", "nhwc")]


def candidate_cases():
    cases = []
    for shape, method, layout in CANDIDATE_BUCKETS:
        batch, targets, channels, height, width = shape
        problem = Problem.for_method(channels, height * width, targets, layout, method)
        for index, config in enumerate(cam_configs.candidate_configs(problem)):
            cases.append(pytest.param(shape, method, layout, config, id=f"{problem.bucket}-{index}"))
    return cases


CANDIDATE_CASES = candidate_cases()


def normalize_for(targets: int) -> bool:
    return targets == 1  # both final stages, without compiling every case twice


@pytest.fixture(scope="module", autouse=True)
def precompiled():
    """Compile every kernel variant of this module in parallel processes before any test."""
    if not torch.cuda.is_available():
        return
    from gradcam_batch.kernels.cam_warmup import precompile

    specs = []
    for param in TABLE_CASES:
        shape, method, layout = param.values
        activations, gradients = make_inputs(shape, torch.bfloat16, layout, seed=0)
        specs += warmup_specs(activations, gradients, method, normalize_for(shape[1]))
    for param in ODD_CASES:
        shape, dtype, layout = param.values
        activations, gradients = make_inputs(shape, dtype, layout, seed=0)
        for method, normalize in itertools.product(ODD_METHODS, (True, False)):
            specs += warmup_specs(activations, gradients, method, normalize)
    for param in CANDIDATE_CASES:
        shape, method, layout, config = param.values
        specs += warmup_specs(*make_inputs(shape, torch.bfloat16, layout, seed=0), method, True, config)
    count, failures = precompile(specs, min(16, os.cpu_count() or 1))
    assert not failures, "\n".join(failures)


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    monkeypatch.setattr(kernels_cam, "POISON_SCRATCH", True)


@pytest.mark.parametrize("shape, method, layout", TABLE_CASES)
def test_table_configs(shape, method, layout):
    check(shape, method, torch.bfloat16, layout, normalize_for(shape[1]), fresh_seed(shape, method, layout))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("method", ODD_METHODS)
@pytest.mark.parametrize("shape, dtype, layout", ODD_CASES)
def test_heuristic_configs(shape, dtype, layout, method, normalize):
    check(shape, method, dtype, layout, normalize, fresh_seed(shape, dtype, layout, method, normalize))


@pytest.mark.parametrize("shape, method, layout, config", CANDIDATE_CASES)
def test_sweep_candidates(shape, method, layout, config):
    check(shape, method, torch.bfloat16, layout, True, fresh_seed(shape, method, config),
          launch=_fused_cam, config=config)


def test_strided_rows_on_the_gpu():
    # Every other row: (H, W) do not collapse, the "other" layout's configs.
    activations, gradients = make_inputs((4, 2, 33, 10, 9), torch.bfloat16, "nchw", seed=5)
    activations, gradients = activations[:, :, ::2], gradients[:, :, :, ::2]
    for method in ODD_METHODS:
        result = fused_cam(activations, gradients, method)
        assert_close(result, reference(activations, gradients, method, True), True, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("shape", [(4, 5, 2048, 7, 7), (2, 5, 256, 56, 56)], ids=["7x7", "56x56"])
def test_cuda_graph_capture_and_replay(shape):
    # The benchmark times fused_cam inside CUDA graphs: capture must work and replay recompute.
    activations, gradients = make_inputs(shape, torch.bfloat16, "nhwc", seed=6)
    fused_cam(activations, gradients, "gradcam")  # plan and kernels ready before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_cam(activations, gradients, "gradcam")
    activations.copy_(make_inputs(shape, torch.bfloat16, "nhwc", seed=7)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, reference(activations, gradients, "gradcam", True), True, TOLERANCE[torch.bfloat16])


def test_deterministic():
    activations, gradients = make_inputs((8, 5, 1024, 14, 14), torch.bfloat16, "nhwc", seed=11)
    first = fused_cam(activations, gradients, "gradcam", normalize=False)
    for _ in range(3):
        assert torch.equal(fused_cam(activations, gradients, "gradcam", normalize=False), first)


def test_autotune_on_the_gpu(tmp_path, monkeypatch):
    # Times the candidates of one small bucket on the card, caches the winner, reads it back.
    monkeypatch.setenv(cam_configs.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels_cam.reset_caches()
    try:
        activations, gradients = make_inputs((8, 1, 64, 7, 7), torch.bfloat16, "nhwc", seed=12)
        result = fused_cam(activations, gradients, "layercam")
        assert_close(result, reference(activations, gradients, "layercam", True), True, TOLERANCE[torch.bfloat16])
        path = cam_configs.autotune_cache_path(torch.cuda.get_device_name(), kernels_cam.triton.__version__)
        bucket = Problem(64, 49, 1, "nhwc", "pixel").bucket
        tuned = json.loads(path.read_text())["configs"][bucket]
        kernels_cam.reset_caches()
        assert kernels_cam.plan_config(activations, gradients, "layercam") == cam_configs.CamConfig.from_json(
            tuned["config"])
    finally:
        monkeypatch.delenv(cam_configs.AUTOTUNE_ENV)
        kernels_cam.reset_caches()
