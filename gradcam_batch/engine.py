"""The batched Grad-CAM step: hook at the target layer, truncated backward for all K targets
at once, CAM formula (Triton kernel on CUDA, PyTorch reference elsewhere), per-map statistics.

Everything stays on the device; the caller makes the one host copy of the finished results.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig
from gradcam_batch.methods import compute_cam

log = logging.getLogger("gradcam_batch")


class ActivationCapture(contextlib.AbstractContextManager):
    """Forward hook that cuts the graph at the target layer.

    The hook makes `output.detach().requires_grad_()` the leaf and returns a copy of it: the rest of
    the forward builds a graph from this leaf only, so autograd.grad walks the head (target layer -> logits) and nothing
    below it. Parameters are frozen, so no parameter gradients are made either.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.activation: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer {type(module).__name__} returned {type(output).__name__}, "
                            "not a tensor; pick a layer whose output is a (B, C, H, W) tensor")
        self.activation = output.detach().requires_grad_()
        # The model goes on with a copy: an in-place op after the layer (DenseNet's functional
        # relu(inplace=True), which build_model cannot switch off) may then overwrite it, but not
        # the leaf the gradients are taken against, which must hold the layer's output.
        return self.activation.clone()

    def __enter__(self) -> "ActivationCapture":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


@dataclass
class CamResult:
    target_classes: torch.Tensor  # int64 (B, K)
    scores: torch.Tensor  # float32 (B, K), the logits of the target classes
    probs: torch.Tensor  # float32 (B, K), softmax probabilities of the target classes
    cams: torch.Tensor  # float32 (B, K, H, W)
    cam_mean: torch.Tensor  # float32 (B, K)
    peak: torch.Tensor  # int64 (B, K), flat index of the maximum of each map

    @staticmethod
    def cat(parts: list["CamResult"]) -> "CamResult":
        return CamResult(**{name: torch.cat([getattr(p, name) for p in parts])
                            for name in CamResult.__dataclass_fields__})

    def to_host(self) -> "CamResult":
        """The one host copy of a batch: non-blocking copies, one synchronisation."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if next(iter(fields.values())).device.type == "cpu":
            return self
        host = {name: value.to("cpu", non_blocking=True) for name, value in fields.items()}
        torch.cuda.current_stream().synchronize()
        return CamResult(**host)


def select_targets(logits: torch.Tensor, labels: torch.Tensor, cfg: CamConfig,
                   classes: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) class indices per image. `label` falls back to the prediction where the label is
    unknown (-1) or outside the model's classes. `classes`: cfg.classes already on the device."""
    if cfg.targets == "pred":
        return logits.argmax(dim=1, keepdim=True)
    if cfg.targets == "topk":
        return logits.topk(cfg.topk, dim=1).indices
    if cfg.targets == "classes":
        if classes is None:
            classes = torch.tensor(cfg.classes, device=logits.device)
        return classes.expand(logits.shape[0], -1)
    valid = (labels >= 0) & (labels < logits.shape[1])
    return torch.where(valid, labels, logits.argmax(dim=1)).unsqueeze(1)


class CamEngine:
    def __init__(self, model: nn.Module, target_layer: nn.Module, cfg: CamConfig, device: torch.device,
                 amp_dtype: torch.dtype | None = None, num_classes: int | None = None):
        self.model = model
        self.target_layer = target_layer
        self.cfg = cfg
        self.device = device
        self.amp_dtype = amp_dtype
        self.backend = self._pick_backend(cfg.backend, device)
        self._batched_backward_ok = True
        self._oom_logged = False
        # made once: a per-batch torch.tensor would be a host-to-device copy in the hot loop
        self._classes = torch.tensor(cfg.classes, device=device) if cfg.targets == "classes" else None
        if num_classes is not None:
            self.check_targets(num_classes)

    @staticmethod
    def _pick_backend(requested: str, device: torch.device) -> str:
        if requested == "torch" or (requested == "auto" and device.type != "cuda"):
            return "torch"
        try:
            import gradcam_batch.kernels  # noqa: F401  (Triton is optional off CUDA)
        except ImportError as error:
            if requested == "triton":
                raise UserError(f"cam.backend=triton needs Triton ({error}); use cam.backend=torch") from error
            return "torch"
        from gradcam_batch.kernels.cam import INTERPRETED  # the kernels' own reading of TRITON_INTERPRET

        if device.type != "cuda" and not INTERPRETED:
            raise UserError("cam.backend=triton needs a CUDA device (or TRITON_INTERPRET=1); "
                            "use cam.backend=auto")
        return "triton"

    def check_targets(self, num_classes: int) -> None:
        cfg = self.cfg
        if cfg.targets == "topk" and cfg.topk > num_classes:
            raise UserError(f"cam.topk={cfg.topk} is larger than the model's {num_classes} classes")
        if cfg.targets == "classes":
            bad = [index for index in cfg.classes if index >= num_classes]
            if bad:
                raise UserError(f"cam.classes={bad} out of range: the model has {num_classes} classes "
                                f"(0..{num_classes - 1})")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _gradients(self, logits: torch.Tensor, activation: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d(logit of each target) / d(activation), (B, K, C, H, W), in one batched backward.

        Scores of different images are summed inside one backward: each image's logits depend
        on that image alone (eval mode), so the sum separates exactly.
        """
        num_targets = targets.shape[1]
        one_hot = torch.zeros((num_targets, *logits.shape), dtype=logits.dtype, device=logits.device)
        one_hot.scatter_(2, targets.t().unsqueeze(2), 1.0)
        if num_targets == 1:
            (grads,) = torch.autograd.grad(logits, activation, grad_outputs=one_hot[0])
            return grads.unsqueeze(1)
        if self._batched_backward_ok:
            try:
                (grads,) = torch.autograd.grad(logits, activation, grad_outputs=one_hot,
                                               is_grads_batched=True, retain_graph=True)
                return grads.transpose(0, 1)  # (K, B, ...) -> (B, K, ...), a view
            except RuntimeError as error:  # an op in the head without a batching rule
                self._batched_backward_ok = False
                log.warning("batched backward unsupported by this model's head (%s); "
                            "falling back to one backward per target", str(error).splitlines()[0])
        grads = [torch.autograd.grad(logits, activation, grad_outputs=one_hot[k], retain_graph=k + 1 < num_targets)[0]
                 for k in range(num_targets)]
        return torch.stack(grads, dim=1)

    def _cams(self, activation: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from gradcam_batch.kernels import fused_cam

            return fused_cam(activation, gradients, self.cfg.method, normalize=self.cfg.normalize)
        return compute_cam(activation, gradients, self.cfg.method, normalize=self.cfg.normalize)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> CamResult:
        """images: normalized float (B, 3, H, W) on the device; labels int64 (B,) (-1 unknown)."""
        with ActivationCapture(self.target_layer) as capture, torch.enable_grad(), self._autocast():
            logits = self.model(images)
        activation = capture.activation
        if activation is None:
            raise RuntimeError("the target layer did not run in the forward pass; pick a layer on the "
                               "path from the input to the logits")
        if activation.dim() != 4:
            raise UserError(f"model.target_layer output has shape {tuple(activation.shape)}, not (B, C, H, W); "
                            "pick a convolutional layer")
        logits = logits.float()  # scores and probabilities in fp32 whatever the autocast dtype
        with torch.no_grad():
            targets = select_targets(logits, labels, self.cfg, self._classes)
        gradients = self._gradients(logits, activation, targets)
        with torch.no_grad():
            cams = self._cams(activation.detach(), gradients)
            scores = logits.gather(1, targets)
            probs = torch.softmax(logits, dim=1).gather(1, targets)
            flat = cams.flatten(2)
            return CamResult(target_classes=targets, scores=scores, probs=probs, cams=cams,
                             cam_mean=flat.mean(dim=2), peak=flat.argmax(dim=2))

    def explain(self, images: torch.Tensor, labels: torch.Tensor) -> CamResult:
        """`self(images, labels)`, halving the batch and retrying on CUDA out-of-memory, so a
        long job survives an odd large batch; the next batch tries the full size again."""
        try:
            return self(images, labels)
        except torch.cuda.OutOfMemoryError:
            if images.shape[0] <= 1:
                raise
        # outside the except block, so the failed attempt's tensors are freed before retrying
        if not self._oom_logged:
            self._oom_logged = True
            log.warning("CUDA out of memory at batch %d: splitting such batches in halves "
                        "(consider a smaller data.batch_size)", images.shape[0])
        if images.device.type == "cuda":
            torch.cuda.empty_cache()
        half = images.shape[0] // 2
        return CamResult.cat([self.explain(images[:half], labels[:half]),
                              self.explain(images[half:], labels[half:])])
