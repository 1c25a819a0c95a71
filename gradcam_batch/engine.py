"""The batched Grad-CAM step: hook at the target layer, truncated backward for all K targets
at once, CAM formula (Triton kernel on CUDA, PyTorch reference elsewhere), per-map statistics.

Everything stays on the device; the caller makes the one host copy of the finished results.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig
from gradcam_batch.layers import MapView, TargetLayer
from gradcam_batch.methods import (EXTRA_METHODS, GRADIENT_FREE, PERTURBATION_METHODS, compute_cam, formula_of,
                                   normalize_maps)
from gradcam_batch.scores import grad_outputs
from gradcam_batch.statistics import map_statistics

log = logging.getLogger("gradcam_batch")


class ActivationCapture(contextlib.AbstractContextManager):
    """Forward hooks that cut the graph at the target layers.

    The first target layer to run makes `output.detach().requires_grad_()` the leaf and hands the
    model a copy of it: the rest of the forward builds a graph from this leaf only, so
    autograd.grad walks the head (target layer -> logits) and nothing below it. A later target
    layer downstream of the leaf is recorded as it is (a node of that graph); one that is not
    (a parallel branch) becomes a leaf of its own. Parameters are frozen, so no parameter
    gradients are made either.
    """

    def __init__(self, layers: list[nn.Module] | nn.Module):
        self.layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        self.outputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = []

    @property
    def activation(self) -> torch.Tensor | None:
        """The one target layer's output (single-layer use)."""
        return self.outputs[0]

    def _hook(self, index: int, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise UserError(f"target layer {type(module).__name__} returned {type(output).__name__}, "
                            "not a tensor; pick a layer whose output is maps or patch tokens")
        if self.outputs[index] is not None:
            raise UserError(f"target layer {type(module).__name__} runs more than once per forward (a shared "
                            "module); pick a layer that runs once")
        recorded = output if output.requires_grad else output.detach().requires_grad_()
        self.outputs[index] = recorded
        # The model goes on with a copy: an in-place op after the layer (DenseNet's functional
        # relu(inplace=True), which build_model cannot switch off) may then overwrite it, but not
        # the tensor the gradients are taken against, which must hold the layer's output.
        return recorded.clone()

    def __enter__(self) -> "ActivationCapture":
        self.outputs = [None] * len(self.layers)
        self._handles = [layer.register_forward_hook(functools.partial(self._hook, index))
                         for index, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


STATISTICS = ("com_y", "com_x", "entropy", "center_mass", "border_mass")


@dataclass
class LayerMaps:
    """One layer's maps of a batch (or several layers' maps fused), with their statistics."""
    name: str
    cams: torch.Tensor  # float32 (B, K, H, W)
    cam_mean: torch.Tensor  # float32 (B, K)
    peak: torch.Tensor  # int64 (B, K), flat index of the maximum of each map
    raw_max: torch.Tensor  # float32 (B, K), the map's maximum after ReLU, before normalization (NaN: fused)
    statistics: dict  # name -> float32 (B, K): statistics.map_statistics

    @staticmethod
    def of(name: str, raw: torch.Tensor, normalize: bool) -> "LayerMaps":
        """From ReLU'd, not yet normalized maps (B, K, H, W)."""
        cams = normalize_maps(raw) if normalize else raw
        flat = cams.flatten(2)
        return LayerMaps(name, cams, flat.mean(dim=2), flat.argmax(dim=2), raw.flatten(2).amax(dim=2),
                         map_statistics(cams))

    def apply(self, function) -> "LayerMaps":
        return LayerMaps(self.name, function(self.cams), function(self.cam_mean), function(self.peak),
                         function(self.raw_max), {key: function(value) for key, value in self.statistics.items()})

    @staticmethod
    def cat(parts: list["LayerMaps"]) -> "LayerMaps":
        def joined(values):
            return torch.cat(list(values))
        return LayerMaps(parts[0].name, *(joined(getattr(part, field) for part in parts)
                                          for field in ("cams", "cam_mean", "peak", "raw_max")),
                         {key: joined(part.statistics[key] for part in parts) for key in parts[0].statistics})


@dataclass
class CamResult:
    target_classes: torch.Tensor  # int64 (B, K)
    scores: torch.Tensor  # float32 (B, K), the logits of the target classes
    probs: torch.Tensor  # float32 (B, K), softmax probabilities of the target classes
    layers: list[LayerMaps]  # one per target layer, then the fused maps (cam.fuse)
    predictions: torch.Tensor | None = None  # int64 (B,), the model's top-1 class

    def _only(self) -> LayerMaps:
        if len(self.layers) != 1:
            raise ValueError(f"this result holds {len(self.layers)} layers' maps; read result.layers")
        return self.layers[0]

    @property
    def cams(self) -> torch.Tensor:
        return self._only().cams

    @property
    def cam_mean(self) -> torch.Tensor:
        return self._only().cam_mean

    @property
    def peak(self) -> torch.Tensor:
        return self._only().peak

    @staticmethod
    def cat(parts: list["CamResult"]) -> "CamResult":
        layers = [LayerMaps.cat(list(maps)) for maps in zip(*(part.layers for part in parts))]
        predictions = (torch.cat([part.predictions for part in parts])
                       if all(part.predictions is not None for part in parts) else None)
        return CamResult(*(torch.cat([getattr(p, name) for p in parts])
                           for name in ("target_classes", "scores", "probs")), layers=layers, predictions=predictions)

    def to_host(self) -> "CamResult":
        """The one host copy of a batch: non-blocking copies, one synchronisation."""
        if self.scores.device.type == "cpu":
            return self

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to("cpu", non_blocking=True)

        host = CamResult(copy(self.target_classes), copy(self.scores), copy(self.probs),
                         [maps.apply(copy) for maps in self.layers],
                         None if self.predictions is None else copy(self.predictions))
        torch.cuda.current_stream().synchronize()
        return host


def fuse_maps(cams: list[torch.Tensor], mode: str) -> torch.Tensor:
    """Several layers' (B, K, h, w) maps as one: each upsampled (bilinear) to the largest grid,
    then their mean or maximum, not yet normalized (pytorch-grad-cam's multi-layer aggregation,
    at the largest layer's grid instead of the input's)."""
    height, width = max((tuple(c.shape[-2:]) for c in cams), key=lambda size: size[0] * size[1])
    scaled = [c if tuple(c.shape[-2:]) == (height, width)
              else torch.nn.functional.interpolate(c, size=(height, width), mode="bilinear", align_corners=False)
              for c in cams]
    stacked = torch.stack(scaled).clamp_(min=0)
    return stacked.mean(dim=0) if mode == "mean" else stacked.amax(dim=0)


def select_targets(logits: torch.Tensor, labels: torch.Tensor, cfg: CamConfig,
                   classes: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) class indices per image. `label` falls back to the prediction where the label is
    unknown (-1) or outside the model's classes. `classes`: cfg.classes already on the device."""
    if cfg.targets == "pred":
        return logits.argmax(dim=1, keepdim=True)
    if cfg.targets == "topk":
        return logits.topk(cfg.topk, dim=1).indices
    if cfg.targets == "all":  # every class, ranked by logit: target_rank 0 is the prediction
        return logits.argsort(dim=1, descending=True)
    if cfg.targets == "classes":
        if classes is None:
            classes = torch.tensor(cfg.classes, device=logits.device)
        return classes.expand(logits.shape[0], -1)
    valid = (labels >= 0) & (labels < logits.shape[1])
    return torch.where(valid, labels, logits.argmax(dim=1)).unsqueeze(1)


class CamEngine:
    def __init__(self, model: nn.Module, target_layer, cfg: CamConfig, device: torch.device,
                 amp_dtype: torch.dtype | None = None, num_classes: int | None = None):
        """target_layer: a module (whose output is (B, C, H, W)), a TargetLayer, or a list of
        TargetLayers (layers.resolve_target_layers), each giving its own maps."""
        self.model = model
        if isinstance(target_layer, nn.Module):
            name = next((name for name, module in model.named_modules() if module is target_layer), "")
            target_layer = TargetLayer(name, target_layer, MapView("nchw"))
        self.layers: list[TargetLayer] = (list(target_layer) if isinstance(target_layer, (list, tuple))
                                          else [target_layer])
        if cfg.fuse is not None and len(self.layers) < 2:
            raise UserError(f"cam.fuse={cfg.fuse} combines the maps of several layers; list two or more in "
                            "model.target_layer=[...], or leave cam.fuse unset")
        self.cfg = cfg
        self.device = device
        self.amp_dtype = amp_dtype
        if num_classes is not None:  # before anything is logged about the method
            self.check_targets(num_classes)
        # eigencam, eigengradcam, kpcacam, fem: methods.py on any device; cam, scorecam and
        # ablationcam know their channel weights, a matrix product away from the maps
        weighted = cfg.method in ("cam", *PERTURBATION_METHODS)
        if (cfg.method in EXTRA_METHODS or weighted) and cfg.backend == "triton":
            raise UserError(f"cam.method={cfg.method} has no Triton kernel (only the channel-weighted methods "
                            "do); use cam.backend=auto or torch")
        # eigencam, kpcacam and fem read the activations only: no graph, no backward, the K targets
        # of an image share its one map
        self.needs_gradients = cfg.method not in GRADIENT_FREE
        self.head = self._analytic_head(model, cfg) if self.needs_gradients else None
        self.perturber = None
        if cfg.method in PERTURBATION_METHODS:
            if len(self.layers) != 1:
                raise UserError(f"cam.method={cfg.method} measures one layer's channels; give one model.target_layer")
            from gradcam_batch.perturbation import Perturber

            self.perturber = Perturber(model, self.layers[0], cfg.method, cfg.channels, cfg.perturbation_batch,
                                       device, self.autocast)
        # analytic gradients are constant over the positions: the PyTorch formula reads them as a
        # view; cam.backend=triton still gets the kernel, on a materialized copy
        self.backend = ("torch" if cfg.method in EXTRA_METHODS or weighted
                        or (self.head is not None and cfg.backend != "triton")
                        else self._pick_backend(cfg.backend, device))
        self._batched_backward_ok = True
        self._oom_logged = False
        # made once: a per-batch torch.tensor would be a host-to-device copy in the hot loop
        self._classes = torch.tensor(cfg.classes, device=device) if cfg.targets == "classes" else None
        self._keep_maps = torch.tensor(list(cfg.keep_maps), dtype=torch.long, device=device)

    def kept_maps(self, targets: torch.Tensor) -> torch.Tensor | None:
        """cam.targets=all: bool (B, K), whose maps are stored (cam.keep_maps); None: every map is."""
        return torch.isin(targets, self._keep_maps) if self.cfg.targets == "all" else None

    def _analytic_head(self, model: nn.Module, cfg: CamConfig):
        """The final linear layer's weights where the head is provably pooling then that layer
        (head.linear_head) and cam.analytic allows using them; None: run the backward."""
        wanted = cfg.method == "cam" or cfg.analytic != "off"
        if not wanted or cfg.method in PERTURBATION_METHODS:
            return None
        layer = self.layers[0]
        if len(self.layers) != 1:
            reason = "several target layers"
        elif layer.view.layout != "nchw":
            reason = f"the layer's output is read as {layer.view.describe()}"
        else:
            from gradcam_batch.head import linear_head, split_at

            split = split_at(model, layer.name)
            found = split if isinstance(split, str) else linear_head(split)
            reason = found if isinstance(found, str) else None
        if reason is None and found.norm is not None:
            # the layer norm makes the weights depend on the image, and its second derivative is
            # not zero: no class weights for cam, a backward for shapleycam's Hessian term
            if cfg.method == "cam":
                reason = (f"the layer norm in {found.description} makes the weights depend on the image "
                          "(Grad-CAM has them analytically there: cam.method=gradcam)")
            elif cfg.method == "shapleycam":
                log.info("cam.analytic=auto: running the backward (shapleycam's second-order term through "
                         "the layer norm in %s)", found.description)
                return None
        if reason is None:
            log.info("cam.analytic: the gradients are %s's weights / HW%s (the head is %s), no backward",
                     found.description.rsplit(" -> ", 1)[-1],
                     " through the layer norm's backward" if found.norm is not None else "", found.description)
            return found
        if cfg.method == "cam" or cfg.targets == "all":
            what = "cam.method=cam" if cfg.method == "cam" else "cam.targets=all"
            raise UserError(f"{what} needs a head of global average pooling then one linear layer "
                            f"after the target layer: {reason}")
        if cfg.analytic == "on":
            raise UserError(f"cam.analytic=on: no analytic gradients: {reason}; use cam.analytic=auto")
        log.info("cam.analytic=auto: running the backward (%s)", reason)
        return None

    def _prepared_gradients(self, images: torch.Tensor, logits: torch.Tensor, outputs: list[torch.Tensor],
                            targets: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the (B, K, ...) gradients the method's formula reads (methods.py)."""
        cfg = self.cfg
        if not self.needs_gradients:
            return [None] * len(self.layers)
        if self.perturber is not None:
            weights = self.perturber.weights(images, outputs[0].detach(), targets, logits)
            return [self._broadcast(weights, self.layers[0].view(outputs[0]))]
        if self.head is not None:
            # d score / d A[c, s] = sum_n go[n] W[n, c] / HW at every position s; for a logit, W[t] / HW
            # (through ConvNeXt's layer norm: its backward at the image's pooled activations)
            weight = self.head.weight.detach().to(torch.float32)
            spatial = outputs[0].shape[-2] * outputs[0].shape[-1]
            if cfg.method == "finercam":
                go = grad_outputs(logits, targets, cfg.method, cfg.finer_alpha, list(cfg.finer_comparison_categories))
                weights = torch.einsum("kbn,nc->bkc", go.float(), weight)
            else:
                weights = weight[targets]  # (B, K, C)
            if self.head.norm is not None:
                weights = self.head.through_norm(weights, outputs[0].detach().float().mean(dim=(-2, -1)))
            return [self._broadcast(weights if cfg.method == "cam" else weights / spatial, outputs[0])]
        go = grad_outputs(logits, targets, cfg.method, cfg.finer_alpha, list(cfg.finer_comparison_categories))
        grads = (self._shapley_gradients if cfg.method == "shapleycam" else self._gradients)(logits, outputs, go)
        return [layer.view(grad) for layer, grad in zip(self.layers, grads)]

    @staticmethod
    def _broadcast(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, C) channel weights as (B, K, C, h, w) gradients constant over the positions of
        the layer's (B, C, h, w) maps (a view)."""
        return weights[..., None, None].expand(*weights.shape, *maps.shape[-2:])

    def _shapley_gradients(self, logits: torch.Tensor, outputs: list[torch.Tensor],
                           go: torch.Tensor) -> list[torch.Tensor]:
        """ShapleyCAM's G - H A / 2 per layer and target: the gradient with its graph kept, then a
        Hessian-vector product with the activations through the head only."""
        per_target = []
        for k in range(go.shape[0]):
            grads = torch.autograd.grad(logits, outputs, grad_outputs=go[k], create_graph=True, allow_unused=True)
            corrected = []
            for index, (grad, output) in enumerate(zip(grads, outputs)):
                grad = self._used(grad, index)
                hvp = None
                if grad.requires_grad:
                    (hvp,) = torch.autograd.grad(grad, output, grad_outputs=output.detach(), retain_graph=True,
                                                 allow_unused=True)
                corrected.append(grad.detach() if hvp is None else grad.detach() - 0.5 * hvp)
            per_target.append(corrected)
        return [torch.stack([grads[index] for grads in per_target], dim=1) for index in range(len(outputs))]

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
        bad = [index for index in cfg.keep_maps if index >= num_classes]
        if bad:
            raise UserError(f"cam.keep_maps={bad} out of range: the model has {num_classes} classes "
                            f"(0..{num_classes - 1})")
        if cfg.targets == "classes":
            bad = [index for index in cfg.classes if index >= num_classes]
            if bad:
                raise UserError(f"cam.classes={bad} out of range: the model has {num_classes} classes "
                                f"(0..{num_classes - 1})")

    def _attention(self):
        """shapleycam differentiates twice: the fused attention kernels have no second
        derivative, PyTorch's reference attention has."""
        if self.cfg.method != "shapleycam":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _gradients(self, logits: torch.Tensor, activations: list[torch.Tensor],
                   one_hot: torch.Tensor) -> list[torch.Tensor]:
        """d(score of each target) / d(each activation), (B, K, ...), in one batched backward;
        one_hot (K, B, classes): d score / d logits (scores.grad_outputs).

        Scores of different images are summed inside one backward: each image's logits depend
        on that image alone (eval mode), so the sum separates exactly.
        """
        num_targets = one_hot.shape[0]
        if num_targets == 1:
            grads = torch.autograd.grad(logits, activations, grad_outputs=one_hot[0], allow_unused=True)
            return [self._used(grad, index).unsqueeze(1) for index, grad in enumerate(grads)]
        if self._batched_backward_ok:
            try:
                grads = torch.autograd.grad(logits, activations, grad_outputs=one_hot, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
                # (K, B, ...) -> (B, K, ...), a view
                return [self._used(grad, index).transpose(0, 1) for index, grad in enumerate(grads)]
            except RuntimeError as error:  # an op in the head without a batching rule
                self._batched_backward_ok = False
                log.warning("batched backward unsupported by this model's head (%s); "
                            "falling back to one backward per target", str(error).splitlines()[0])
        per_target = [torch.autograd.grad(logits, activations, grad_outputs=one_hot[k],
                                          retain_graph=k + 1 < num_targets, allow_unused=True)
                      for k in range(num_targets)]
        return [torch.stack([self._used(grads[index], index) for grads in per_target], dim=1)
                for index in range(len(activations))]

    def _used(self, grad: torch.Tensor | None, index: int) -> torch.Tensor:
        if grad is None:
            raise UserError(f"model.target_layer {self.layers[index].name or index!r} does not reach the "
                            "logits; pick a layer on the path from the input to the logits")
        return grad

    def _cams(self, activation: torch.Tensor, gradients: torch.Tensor | None, num_targets: int) -> torch.Tensor:
        """The ReLU'd maps before normalization: the raw maximum is a statistic of its own, and
        normalizing (B, K, h, w) maps afterwards costs a read of the maps, not of A and G.
        gradients None (a gradient-free method): one map per image, repeated for the K targets."""
        if gradients is None:
            cams = compute_cam(activation, None, self.cfg.method, normalize=False)
            return cams.expand(-1, num_targets, -1, -1).contiguous()
        if (gradients.stride(-1) == 0 and gradients.stride(-2) == 0 and self.backend == "torch"
                and formula_of(self.cfg.method) in ("gradcam", "hirescam")):
            # channel weights constant over the positions (analytic, cam, scorecam, ablationcam):
            # the map is one matrix product, whatever the number of targets (cam.targets=all)
            weights = gradients[..., 0, 0].float()
            return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, activation.float()))
        if self.backend == "triton":
            from gradcam_batch.kernels import fused_cam

            if 0 in gradients.stride():
                gradients = gradients.contiguous()
            return fused_cam(activation, gradients, formula_of(self.cfg.method), normalize=False)
        return compute_cam(activation, gradients, self.cfg.method, normalize=False)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> CamResult:
        """images: normalized float (B, 3, H, W) on the device; labels int64 (B,) (-1 unknown)."""
        graph = self.needs_gradients and self.head is None and self.perturber is None
        grad_mode = torch.enable_grad() if graph else torch.no_grad()
        with ActivationCapture([layer.module for layer in self.layers]) as capture, grad_mode, self.autocast(), \
                self._attention():
            logits = self.model(images)
        for layer, output in zip(self.layers, capture.outputs):
            if output is None:
                raise RuntimeError(f"the target layer {layer.name!r} did not run in the forward pass; pick a "
                                   "layer on the path from the input to the logits")
            if layer.view.layout == "nchw" and output.dim() != 4:
                raise UserError(f"model.target_layer output has shape {tuple(output.shape)}, not (B, C, H, W); "
                                "pick a convolutional layer")
        logits = logits.float()  # scores and probabilities in fp32 whatever the autocast dtype
        with torch.no_grad():
            targets = select_targets(logits, labels, self.cfg, self._classes)
        gradients = self._prepared_gradients(images, logits, capture.outputs, targets)
        with torch.no_grad():
            normalize = self.cfg.normalize
            maps = [LayerMaps.of(layer.name, self._cams(layer.view(output.detach()),
                                                        grads,
                                                        targets.shape[1]), normalize)
                    for layer, output, grads in zip(self.layers, capture.outputs, gradients)]
            if self.cfg.fuse is not None:
                name = f"{self.cfg.fuse}({','.join(layer.name for layer in self.layers)})"
                fused = LayerMaps.of(name, fuse_maps([m.cams for m in maps], self.cfg.fuse), normalize)
                # The fused map combines the layers' (normalized) maps: its maximum is in their
                # units, not the evidence cam_max_raw stands for, so it is NaN (null); each
                # layer's own rows hold theirs.
                fused.raw_max = torch.full_like(fused.raw_max, float("nan"))
                maps.append(fused)
            scores = logits.gather(1, targets)
            probs = torch.softmax(logits, dim=1).gather(1, targets)
            return CamResult(target_classes=targets, scores=scores, probs=probs, layers=maps,
                             predictions=logits.argmax(dim=1))

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
