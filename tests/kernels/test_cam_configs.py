"""The tiling choice of fused_cam: buckets, the committed table, the heuristic, the table
override, and the disk cache of the opt-in autotune (its timings faked: no GPU needed)."""

import dataclasses
import itertools
import json

import pytest
import torch

import gradcam_batch.kernels.cam as kernels_cam
from gradcam_batch.methods import METHODS, compute_cam
from gradcam_batch.kernels import cam_configs
from gradcam_batch.kernels.cam import fused_cam, plan_config, warmup_specs
from gradcam_batch.kernels.cam_configs import CamConfig, Problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The benchmark grid (benchmarks/bench_kernel.py): its buckets must all be in the table.
BENCHMARK_SHAPES = [(256, 2048, 7, 7), (256, 1024, 14, 14), (128, 512, 28, 28), (64, 256, 56, 56)]


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """Each test starts without plans, loaded table or autotune results, and without the env
    vars a developer may have set."""
    monkeypatch.delenv(cam_configs.TABLE_ENV, raising=False)
    monkeypatch.delenv(cam_configs.AUTOTUNE_ENV, raising=False)
    kernels_cam.reset_caches()
    yield
    kernels_cam.reset_caches()


def inputs(batch, channels, height, width, targets=1, layout="nchw", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(batch, channels, height, width, generator=generator).relu().to(DEVICE, dtype)
    gradients = torch.randn(batch, targets, channels, height, width, generator=generator).to(DEVICE, dtype)
    if layout == "nhwc":
        activations = activations.contiguous(memory_format=torch.channels_last)
        gradients = gradients.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return activations, gradients


def meta_inputs(batch, channels, height, width, targets, layout):
    """Meta tensors with the strides of real ones: plans without memory or compute."""
    if layout == "nhwc":
        activations = torch.empty((batch, channels, height, width), device="meta").contiguous(
            memory_format=torch.channels_last)
        gradients = torch.empty((batch, targets, height, width, channels), device="meta").permute(0, 1, 4, 2, 3)
    else:
        activations = torch.empty((batch, channels, height, width), device="meta")
        gradients = torch.empty((batch, targets, channels, height, width), device="meta")
    return activations, gradients


def assert_matches_reference(result, activations, gradients, method, normalize=True):
    expected = compute_cam(activations.double(), gradients.double(), method, normalize, dtype=torch.float64)
    assert (result.double() - expected).abs().max().item() <= 1e-4


# Buckets -------------------------------------------------------------------------------------

def test_bucket_keys_round_trip():
    problem = Problem(2048, 49, 5, "nhwc", "weighted")
    assert problem.bucket == "weighted/nhwc/k8/hw64/c2048"
    assert Problem.from_bucket(problem.bucket).bucket == problem.bucket
    assert Problem.for_method(3000, 20000, 40, "other", "layercam").bucket == "pixel/other/k16/hw16384/c4096"
    for bad in ("gradcam/nhwc/k3/hw64/c2048", "gradcam/nhwc/k1/hw64", "gradcam/tiles/k1/hw64/c64"):
        with pytest.raises(ValueError):
            Problem.from_bucket(bad)


def test_layout_is_read_from_the_strides():
    nchw = meta_inputs(2, 8, 5, 5, 2, "nchw")
    nhwc = meta_inputs(2, 8, 5, 5, 2, "nhwc")

    def layout(activations, gradients):
        return kernels_cam._problem(activations, gradients, "gradcam")[0].layout

    assert layout(*nchw) == "nchw" and layout(*nhwc) == "nhwc"
    # Every other row: NCHW rows no longer collapse into one spatial stride; NHWC still holds
    # channels contiguously, which is what its tiling relies on.
    assert layout(nchw[0][:, :, ::2], nchw[1][:, :, :, ::2]) == "other"
    assert layout(nhwc[0][:, :, ::2], nhwc[1][:, :, :, ::2]) == "nhwc"
    assert layout(nhwc[0], nchw[1]) == "other"  # A and G disagree


# The heuristic and the candidates ------------------------------------------------------------

PROBLEM_GRID = [
    Problem(channels, positions, targets, layout, family)
    for channels, positions, targets, layout, family in itertools.product(
        (1, 3, 16, 37, 64, 256, 1000, 2048, 8192),
        (1, 9, 49, 196, 255, 256, 257, 784, 3136, 4096, 4900, 20000),
        (1, 2, 5, 40),
        cam_configs.LAYOUTS,
        cam_configs.FAMILIES,
    )
]


def test_heuristic_and_candidates_are_valid_everywhere():
    for problem in PROBLEM_GRID:
        heuristic = cam_configs.heuristic_config(problem)
        assert heuristic.problems(problem) == [], problem
        candidates = cam_configs.candidate_configs(problem)
        assert candidates[0] == heuristic
        assert 1 <= len(candidates) <= cam_configs.CANDIDATES_PER_BUCKET
        assert len(set(candidates)) == len(candidates)
        for config in candidates:
            assert config.problems(problem) == [], (problem, config)
            # A config chosen for a bucket serves every problem of the bucket.
            assert config.problems(Problem.from_bucket(problem.bucket)) == [], (problem, config)


def test_choice_is_deterministic():
    first = [(cam_configs.heuristic_config(p), cam_configs.candidate_configs(p)) for p in PROBLEM_GRID[::7]]
    again = [(cam_configs.heuristic_config(p), cam_configs.candidate_configs(p)) for p in PROBLEM_GRID[::7]]
    assert first == again


def test_channels_last_reads_wide_channel_blocks():
    # 64 bf16 channels = 128 contiguous bytes per position, small and large maps alike.
    for positions in (49, 196, 784, 3136):
        assert cam_configs.heuristic_config(Problem(512, positions, 1, "nhwc", "gradcam")).block_c >= 32
    large = cam_configs.heuristic_config(Problem(256, 3136, 1, "nhwc", "gradcam"))
    assert large.path == "tiled" and large.block_hw < 3136 and large.needs_sums


def test_config_validation_names_the_problem():
    problem = Problem(64, 49, 1, "nhwc", "gradcam")
    assert any("power of two" in e for e in CamConfig("whole", 48, 1, 64, 4).problems(problem))
    assert any("more than" in e for e in CamConfig("whole", 128, 1, 64, 4).problems(problem))
    assert any("whole map" in e for e in CamConfig("whole", 16, 1, 32, 4).problems(problem))
    assert any("c_iters" in e for e in CamConfig("whole", 16, 9, 64, 4).problems(problem))
    assert any("sums_block_c" in e for e in CamConfig("tiled", 16, 1, 32, 4).problems(problem))
    assert CamConfig("tiled", 16, 1, 32, 4).problems(dataclasses.replace(problem, family="pixel")) == []


# The committed table --------------------------------------------------------------------------

def test_committed_table_is_valid_and_covers_the_benchmark_grid():
    table = cam_configs.load_table(cam_configs.TABLE_PATH)
    for (batch, channels, height, width), layout, targets, family in itertools.product(
            BENCHMARK_SHAPES, ("nchw", "nhwc"), (1, 5), cam_configs.FAMILIES):
        assert Problem(channels, height * width, targets, layout, family).bucket in table
    for key, config in table.items():
        assert config.problems(Problem.from_bucket(key)) == [], key


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("method", METHODS)
def test_table_entries_are_used(method, layout):
    table = cam_configs.load_table(cam_configs.TABLE_PATH)
    for batch, channels, height, width in BENCHMARK_SHAPES:
        activations, gradients = meta_inputs(batch, channels, height, width, 5, layout)
        problem = Problem.for_method(channels, height * width, 5, layout, method)
        assert plan_config(activations, gradients, method) == table[problem.bucket]


def test_buckets_outside_the_table_get_the_heuristic():
    activations, gradients = meta_inputs(4, 96, 9, 9, 3, "nhwc")
    assert plan_config(activations, gradients, "layercam") == cam_configs.heuristic_config(
        Problem(96, 81, 3, "nhwc", "pixel"))


def write_table(path, configs, source="test"):
    cam_configs.write_json_atomically(path, cam_configs.table_document(configs, source))


def test_env_override_replaces_the_table(tmp_path, monkeypatch):
    override = CamConfig("whole", 4, 2, 64, 1)
    problem = Problem(37, 49, 1, "nchw", "gradcam")
    write_table(tmp_path / "table.json", {problem.bucket: override})
    monkeypatch.setenv(cam_configs.TABLE_ENV, str(tmp_path / "table.json"))
    kernels_cam.reset_caches()
    activations, gradients = inputs(2, 37, 7, 7)
    assert plan_config(activations, gradients, "gradcam") == override
    # The override config (5 channel groups of 2 x 4 channels) computes the right maps.
    assert_matches_reference(fused_cam(activations, gradients, "gradcam"), activations, gradients, "gradcam")
    # Buckets the override lacks fall back to the heuristic, not to the committed table.
    activations, gradients = meta_inputs(256, 2048, 7, 7, 1, "nhwc")
    assert plan_config(activations, gradients, "gradcam") == cam_configs.heuristic_config(
        Problem(2048, 49, 1, "nhwc", "gradcam"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read"),
        (json.dumps({"format": 99, "configs": {}}), "not a fused_cam config table"),
        (json.dumps({"format": 1, "configs": {"gradcam/nchw/k1/hw64/c64": {"path": "whole"}}}), "incomplete"),
        (json.dumps({"format": 1, "configs": {"gradcam/nchw/k1/hw64/c64": {
            "path": "whole", "block_c": 16, "c_iters": 1, "block_hw": 32, "num_warps": 4}}}), "not valid"),
        (json.dumps({"format": 1, "configs": {"gradcam/nchw/k3/hw64/c64": {
            "path": "whole", "block_c": 16, "c_iters": 1, "block_hw": 64, "num_warps": 4}}}), "not canonical"),
    ],
    ids=["json", "format", "incomplete", "invalid", "bucket"],
)
def test_broken_override_names_the_file(tmp_path, monkeypatch, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    monkeypatch.setenv(cam_configs.TABLE_ENV, str(path))
    with pytest.raises(ValueError, match=message) as error:
        fused_cam(*inputs(2, 8, 7, 7))
    assert str(path) in str(error.value)


def test_missing_override_is_an_error_but_a_missing_default_table_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv(cam_configs.TABLE_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="absent.json"):
        fused_cam(*inputs(2, 8, 7, 7))
    monkeypatch.delenv(cam_configs.TABLE_ENV)
    monkeypatch.setattr(cam_configs, "TABLE_PATH", tmp_path / "not-installed.json")
    kernels_cam.reset_caches()
    activations, gradients = inputs(2, 8, 7, 7)
    assert_matches_reference(fused_cam(activations, gradients), activations, gradients, "gradcam")


def test_table_document_round_trips(tmp_path):
    configs = {
        Problem(c, hw, 1, "nhwc", family).bucket: cam_configs.heuristic_config(Problem(c, hw, 1, "nhwc", family))
        for c, hw, family in itertools.product((64, 512), (49, 3136), cam_configs.FAMILIES)
    }
    write_table(tmp_path / "table.json", configs)
    assert cam_configs.load_table(tmp_path / "table.json") == configs


# The opt-in autotune and its disk cache -------------------------------------------------------

class FakeTuning:
    """Stands in for the GPU timing: prefers the candidate with the most channels per program,
    and counts the measurements."""

    def __init__(self, device_name="Fake GPU 80GB"):
        self.device_name, self.measured = device_name, []

    def install(self, monkeypatch):
        monkeypatch.setattr(kernels_cam, "_can_autotune", lambda device: True)
        monkeypatch.setattr(kernels_cam, "_tuning_device_name", lambda device: self.device_name)
        monkeypatch.setattr(kernels_cam, "_measure_config", self.measure)

    def measure(self, config, activations, gradients, method, normalize):
        self.measured.append(config)
        return 1.0 / (config.block_c * config.c_iters) + config.num_warps * 1e-6


@pytest.fixture
def autotune(tmp_path, monkeypatch):
    monkeypatch.setenv(cam_configs.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tuning = FakeTuning()
    tuning.install(monkeypatch)
    return tuning


def test_autotune_result_is_written_and_read_back_by_the_next_process(autotune, tmp_path):
    activations, gradients = inputs(2, 37, 7, 7, targets=2, layout="nhwc")
    problem = Problem(37, 49, 2, "nhwc", "gradcam")
    candidates = cam_configs.candidate_configs(problem)
    best = min(candidates, key=lambda c: autotune.measure(c, None, None, None, None))
    autotune.measured.clear()

    result = fused_cam(activations, gradients, "gradcam")
    assert autotune.measured == candidates  # every candidate timed once, in order
    assert_matches_reference(result, activations, gradients, "gradcam")
    cache_file = cam_configs.autotune_cache_path("Fake GPU 80GB", kernels_cam.triton.__version__)
    assert cache_file.parent == tmp_path / "cache" / "gradcam-batch"
    stored = json.loads(cache_file.read_text())["configs"][problem.bucket]
    assert CamConfig.from_json(stored["config"]) == best and stored["milliseconds"] > 0

    # Same process, a new shape of the same bucket: no tuning.
    autotune.measured.clear()
    fused_cam(*inputs(1, 40, 7, 6, targets=2, layout="nhwc"), "gradcam")
    assert autotune.measured == []
    # A new process (caches forgotten) reads the file instead of tuning.
    kernels_cam.reset_caches()
    assert plan_config(activations, gradients, "gradcam") == best
    result = fused_cam(activations, gradients, "gradcam")
    assert autotune.measured == []
    assert_matches_reference(result, activations, gradients, "gradcam")


def test_autotune_cache_is_per_gpu_and_triton_version(autotune, monkeypatch):
    activations, gradients = inputs(2, 16, 5, 5)
    fused_cam(activations, gradients, "layercam")
    first = len(autotune.measured)
    assert first > 0
    other_gpu = FakeTuning("Other GPU")
    other_gpu.install(monkeypatch)
    kernels_cam.reset_caches()
    fused_cam(activations, gradients, "layercam")
    assert len(other_gpu.measured) == first  # tuned again for the other card
    names = {p.name for p in cam_configs.autotune_cache_path("x", "1").parent.iterdir()}
    assert len(names) == 2
    assert cam_configs.autotune_cache_path("Fake GPU 80GB", "3.6.0") != cam_configs.autotune_cache_path(
        "Fake GPU 80GB", "3.8.0")


def test_autotune_cache_keeps_other_entries_and_survives_damage(autotune):
    path = cam_configs.autotune_cache_path("Fake GPU 80GB", kernels_cam.triton.__version__)
    for channels in (16, 32):
        fused_cam(*inputs(2, channels, 5, 5), "gradcam")
    assert len(json.loads(path.read_text())["configs"]) == 2
    path.write_text("{damaged")
    kernels_cam.reset_caches()
    autotune.measured.clear()
    fused_cam(*inputs(2, 16, 5, 5), "gradcam")
    assert autotune.measured  # tuned again, file rewritten whole
    assert len(json.loads(path.read_text())["configs"]) == 1


def test_autotune_is_off_by_default(tmp_path, monkeypatch):
    tuning = FakeTuning()
    tuning.install(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fused_cam(*inputs(2, 16, 5, 5), "gradcam")
    assert tuning.measured == [] and not (tmp_path / "gradcam-batch").exists()


def test_autotune_cache_path_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cam_configs.autotune_cache_path("NVIDIA H100 80GB HBM3", "3.6.0")
    assert path == tmp_path / "gradcam-batch" / "cam-autotune-nvidia-h100-80gb-hbm3-triton-3.6.0.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cam_configs.autotune_cache_path("a", "b").parent == tmp_path / "home" / ".cache" / "gradcam-batch"


# Ahead-of-time compile specs -----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_warmup_specs_describe_every_launch(method):
    activations, gradients = meta_inputs(64, 256, 56, 56, 5, "nhwc")
    specs = warmup_specs(activations.to(torch.bfloat16), gradients.to(torch.bfloat16), method)
    names = [name for name, _, _, _ in specs]
    assert names[-2:] == ["_cam_map_kernel", "_cam_finish_kernel"] or names[-1] == "_cam_map_kernel"
    assert names.count("_cam_channel_sums_kernel") == {"gradcampp": 2, "gradcam": 1, "xgradcam": 1}.get(method, 0)
    for name, grid, arguments, keywords in specs:
        kernel = getattr(kernels_cam, name)
        assert len(arguments) + len(keywords) - ("num_warps" in keywords) == len(kernel.arg_names)
        assert arguments[0] in (torch.bfloat16, torch.float32)
        assert all(axis >= 1 for axis in grid)
