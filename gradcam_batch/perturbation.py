"""ScoreCAM's and AblationCAM's channel weights, measured with extra forwards in large batches.

For image b, target k (class t) and channel c of the target layer's maps A (B, C, h, w):

    scorecam     M_c = bilinear upsampling of A_c to the input (align_corners=True), min-max
                 scaled (eps 1e-8); s_c = logit_t(image * M_c); w = softmax over the channels of s
                 (Wang et al. 2020, as pytorch-grad-cam's ScoreCAM computes it)
    ablationcam  y = logit_t(image); y_c = logit_t with channel c of the layer's output set to the
                 ablation value (0 where the image's activations have minimum 0, else that
                 minimum - 1e7, as pytorch-grad-cam's AblationLayer); w_c = (y - y_c) / y
                 (Desai & Ramaswamy 2020)

The maps are then Grad-CAM's weighted sum with these weights (methods.py). Cost in forwards per
image: scorecam C whole-model forwards, ablationcam C forwards of the network after the layer
(head.split_at) where torch.fx can trace the model, else C whole-model forwards with a hook that
replaces the layer's output. `cam.channels=top:N` measures only the N channels of largest mean
activation per image, the others get weight 0 (pytorch-grad-cam's ratio_channels_to_ablate picks
channels differently, by an EigenCAM mask). The B * N perturbed inputs are made chunk by chunk,
`cam.perturbation_batch` at a time (0: as many as fit, halving on CUDA out-of-memory).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gradcam_batch.config import parse_channels
from gradcam_batch.head import Split, split_at
from gradcam_batch.layers import TargetLayer

log = logging.getLogger("gradcam_batch")

SCORECAM_EPS = 1e-8
ABLATION_VALUE = 1e7
AUTO_BATCH = {"cuda": 1024, "cpu": 64}


def chosen_channels(maps: torch.Tensor, count: int | None) -> torch.Tensor:
    """(B, N) channel indices: all of them, or the `count` of largest mean activation per image."""
    batch, channels = maps.shape[:2]
    if count is None or count >= channels:
        return torch.arange(channels, device=maps.device).expand(batch, channels)
    return maps.float().mean(dim=(2, 3)).topk(count, dim=1).indices


class Perturber:
    def __init__(self, model: nn.Module, layer: TargetLayer, method: str, channels: str, batch: int,
                 device: torch.device, autocast):
        self.model = model
        self.layer = layer
        self.method = method
        self.count = parse_channels(channels)
        self.batch = batch or AUTO_BATCH.get(device.type, 64)
        self.auto_batch = not batch
        self.autocast = autocast
        self.split: Split | None = None
        self._checked = False
        if method == "ablationcam":
            split = split_at(model, layer.name)
            if isinstance(split, str):
                log.warning("cam.method=ablationcam runs the whole model per ablated channel: %s", split)
            else:
                self.split = split
                log.info("cam.method=ablationcam runs only the network after %s per ablated channel", layer.name)

    # -- chunked forwards ------------------------------------------------------------------------

    def _chunked(self, total: int, run) -> torch.Tensor:
        """run(start, stop) -> (stop - start, classes) logits, over `total` items in chunks."""
        results, start = [], 0
        while start < total:
            stop = min(total, start + self.batch)
            try:
                with torch.no_grad(), self.autocast():
                    results.append(run(start, stop).float())
            except torch.cuda.OutOfMemoryError:
                if not self.auto_batch or self.batch <= 1:
                    raise
                self.batch //= 2
                torch.cuda.empty_cache()
                log.warning("perturbation forwards out of memory: cam.perturbation_batch now %d", self.batch)
                continue
            start = stop
        return torch.cat(results)

    # -- weights ---------------------------------------------------------------------------------

    def weights(self, images: torch.Tensor, output: torch.Tensor, targets: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor:
        """(B, K, C) float32 channel weights. output: the layer's output as the model made it."""
        maps = self.layer.view(output)
        chosen = chosen_channels(maps, self.count)  # (B, N)
        if self.method == "scorecam":
            scores = self._scorecam_scores(images, maps, chosen, targets)
            measured = torch.softmax(scores, dim=-1)
        else:
            scores = self._ablation_scores(images, output, chosen, targets)
            original = logits.gather(1, targets).unsqueeze(-1)  # (B, K, 1)
            measured = (original - scores) / original
        batch, num_targets = targets.shape
        weights = torch.zeros(batch, num_targets, maps.shape[1], dtype=torch.float32, device=maps.device)
        return weights.scatter_(2, chosen.unsqueeze(1).expand(-1, num_targets, -1), measured)

    def _target_scores(self, logits: torch.Tensor, pairs: torch.Tensor, targets: torch.Tensor,
                       shape: tuple[int, int]) -> torch.Tensor:
        """(B * N, classes) logits of the perturbed inputs -> (B, K, N) scores of each image's targets."""
        batch, count = shape
        return logits.gather(1, targets[pairs]).view(batch, count, -1).transpose(1, 2)

    def _scorecam_scores(self, images, maps, chosen, targets) -> torch.Tensor:
        batch, count = chosen.shape
        pairs = torch.arange(batch, device=images.device).repeat_interleave(count)
        channels = chosen.reshape(-1)
        memory_format = (torch.channels_last if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
                         and not images.is_contiguous() else torch.contiguous_format)

        def run(start, stop):
            selected = maps[pairs[start:stop], channels[start:stop]].unsqueeze(1).float()
            masks = nn.functional.interpolate(selected, size=images.shape[-2:], mode="bilinear", align_corners=True)
            low = masks.amin(dim=(2, 3), keepdim=True)
            high = masks.amax(dim=(2, 3), keepdim=True)
            masks = (masks - low) / (high - low + SCORECAM_EPS)
            inputs = (images[pairs[start:stop]] * masks).to(images.dtype).contiguous(memory_format=memory_format)
            return self.model(inputs)

        return self._target_scores(self._chunked(batch * count, run), pairs, targets, (batch, count))

    def _ablation_scores(self, images, output, chosen, targets) -> torch.Tensor:
        batch, count = chosen.shape
        pairs = torch.arange(batch, device=images.device).repeat_interleave(count)
        channels = chosen.reshape(-1)
        dim = 1 if self.layer.view.layout == "nchw" else -1
        flat = output.flatten(1)
        value = torch.where(flat.amin(dim=1) == 0, torch.zeros_like(flat[:, 0]),
                            flat.amin(dim=1) - ABLATION_VALUE)  # per image

        def ablated(start, stop):
            chunk = output[pairs[start:stop]].clone()
            moved = chunk.movedim(dim, 1)  # a view: channel c of item i is moved[i, c]
            rows = torch.arange(stop - start, device=chunk.device)
            moved[rows, channels[start:stop]] = value[pairs[start:stop]].view(-1, *([1] * (moved.dim() - 2))).to(
                moved.dtype).expand_as(moved[rows, channels[start:stop]])
            return chunk

        if self.split is not None:
            with torch.no_grad(), self.autocast():
                prefix = self.split.prefix(images)
            layer_output, extras = prefix[0], prefix[1:]
            if not self._checked:
                self._check_split(layer_output, extras, images)  # may give up the split
        if self.split is not None:
            def run(start, stop):
                selected = _select(extras, self.split.from_images, pairs[start:stop])
                return self.split.tail(ablated(start, stop).to(layer_output.dtype), *selected)
        else:
            def run(start, stop):
                replacement = ablated(start, stop)
                handle = self.layer.module.register_forward_hook(lambda module, inputs, result: replacement.to(result.dtype))
                try:
                    return self.model(images[pairs[start:stop]])
                finally:
                    handle.remove()

        return self._target_scores(self._chunked(batch * count, run), pairs, targets, (batch, count))

    def _check_split(self, layer_output, extras, images) -> None:
        """Once: the tail on the unablated output must give the model's logits, also for a chunk
        of another size (B + 1 items: a batch size fixed before the layer would break it), and
        every tensor it reads from before the layer must be per-image; otherwise run the whole
        model per ablated channel."""
        self._checked = True
        batch = images.shape[0]
        index = torch.cat([torch.arange(batch), torch.zeros(1, dtype=torch.long)]).to(images.device)
        reason = None
        per_image = self.split.from_images
        if not all(not isinstance(extra, torch.Tensor) or not from_images or (extra.dim() > 0 and extra.shape[0] == batch)
                   for extra, from_images in zip(extras, per_image)):
            reason = "the network after the layer reads tensors from before it that are not per-image"
        else:
            try:
                with torch.no_grad(), self.autocast():
                    tail = self.split.tail(layer_output[index], *_select(extras, per_image, index)).float()
                    whole = self.model(images).float()[index]
                if tail.shape != whole.shape or not torch.allclose(
                        tail, whole, rtol=1e-3, atol=1e-3 * max(whole.abs().max().item(), 1e-6)):
                    reason = "the traced network after the layer does not reproduce the model's logits"
            except Exception as error:  # a shape fixed before the layer, an op fx mis-traced
                reason = f"the traced network after the layer fails on another batch size ({type(error).__name__})"
        if reason:
            log.warning("cam.method=ablationcam runs the whole model per ablated channel: %s", reason)
            self.split = None


def _select(extras, from_images, index: torch.Tensor) -> list:
    """The tail's extra inputs for the items at `index`: the per-image tensors indexed, values
    made from the parameters alone (Swin's relative position bias) and non-tensors (an attention
    mask of None, a width) as they are."""
    return [extra[index] if isinstance(extra, torch.Tensor) and per_image else extra
            for extra, per_image in zip(extras, from_images)]
