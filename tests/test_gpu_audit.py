"""On CUDA: transformer maps through the Triton kernel, and the audit columns, against the CPU
path and float64 (skipped without a GPU; benchmarks/device_check.sh runs them)."""

import copy

import pytest
import torch

from gradcam_batch.audit import row_extras
from gradcam_batch.config import CamConfig, Config, ModelConfig
from gradcam_batch.data.prefetch import Preprocess
from gradcam_batch.engine import CamEngine
from gradcam_batch.layers import resolve_target_layers
from gradcam_batch.models import load_model
from gradcam_batch.statistics import box_metrics, map_statistics

pytestmark = pytest.mark.gpu


def cuda():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("method", ["gradcam", "layercam", "gradcampp"])
def test_vit_maps_on_cuda_with_the_kernel_equal_the_cpu_path(method):
    model = load_model(ModelConfig(source="torchvision", name="vit_b_16"))[0]
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    layers = resolve_target_layers(model, "auto", images[:1])
    gpu_model = copy.deepcopy(model).to(cuda())
    gpu_layers = resolve_target_layers(gpu_model, layers[0].name, images[:1].to(cuda()))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32: the kernel, not TF32, is under test
    try:
        engine = CamEngine(gpu_model, gpu_layers, CamConfig(method=method, targets="classes",
                                                            classes=[0, 1], backend="triton"), cuda())
        assert engine.backend == "triton"
        exact = CamEngine(model, layers, CamConfig(method=method, targets="classes", classes=[0, 1]),
                          torch.device("cpu"))(images, torch.full((4,), -1))
        got = engine(images.to(cuda()), torch.full((4,), -1, device=cuda()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert exact.cams.shape == (4, 2, 14, 14)
    torch.testing.assert_close(got.cams.cpu(), exact.cams, atol=2e-3, rtol=0)


def test_statistics_and_box_metrics_on_cuda_equal_cpu():
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(8, 3, 7, 7, generator=generator)
    boxes = torch.rand(8, 2, 4, generator=generator).sort(dim=-1).values[..., [0, 1, 2, 3]]
    boxes[..., 2:] = boxes[..., :2] + 0.3
    boxes[3] = float("nan")
    peak = maps.flatten(2).argmax(dim=2)
    for key, value in map_statistics(maps.to(cuda())).items():
        torch.testing.assert_close(value.cpu(), map_statistics(maps)[key], atol=1e-6, rtol=0, equal_nan=True)
    want = box_metrics(maps, peak, boxes, 224, 0.5)
    got = box_metrics(maps.to(cuda()), peak.to(cuda()), boxes.to(cuda()), 224, 0.5)
    for key in want:
        torch.testing.assert_close(got[key].cpu(), want[key], atol=1e-5, rtol=0)


def test_row_extras_on_cuda_equal_cpu():
    model = load_model(ModelConfig(source="torchvision", name="resnet18"))[0]
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.6]]] * 4)
    cfg = Config()
    cfg.output.cam_size, cfg.output.heatmap_png, cfg.metrics.faithfulness = "input", True, True
    cfg.data = cfg.data.resolved()
    cpu_engine = CamEngine(model, model.layer4, CamConfig(), torch.device("cpu"))
    cpu_result = cpu_engine(images, torch.full((4,), -1))
    want = row_extras(cfg, cpu_result, images, boxes, cpu_engine, Preprocess(cfg.data.mean, cfg.data.std,
                                                                             torch.device("cpu"), False))[0]
    gpu_model = copy.deepcopy(model).to(cuda())
    gpu_engine = CamEngine(gpu_model, gpu_model.layer4, CamConfig(backend="torch"), cuda())
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu_result = gpu_engine(images.to(cuda()), torch.full((4,), -1, device=cuda()))
        preprocess = Preprocess(cfg.data.mean, cfg.data.std, cuda(), False)
        got = row_extras(cfg, gpu_result, images.to(cuda()), boxes, gpu_engine, preprocess)[0].to_host()
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    torch.testing.assert_close(got.box_energy, want.box_energy, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.cam_resized.float(), want.cam_resized.float(), atol=2e-3, rtol=0)
    assert (got.heatmaps.int() - want.heatmaps.int()).abs().max() <= 2
    torch.testing.assert_close(got.insertion, want.insertion, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(got.confidence_change, want.confidence_change, atol=1e-3, rtol=1e-2)
