"""The oracle for the engine: an ordinary full backward pass per image and per target, the
formula evaluated in float64."""

import copy

import torch

from gradcam_batch.methods import compute_cam


def full_backward_reference(model, images, classes, method, layer="layer4", as_maps=None):
    """Per image and target: plain forward, plain backward through the whole model with
    parameter gradients, activations and gradients captured by hooks, formula in float64.
    `as_maps` turns the layer's output (and its gradient) into (1, C, h, w), e.g. for tokens."""
    model = copy.deepcopy(model).requires_grad_(True)
    as_maps = as_maps or (lambda tensor: tensor)
    captured = {}
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    maps = []
    try:
        for b in range(images.shape[0]):
            for k in range(classes.shape[1]):
                model.zero_grad()
                logits = model(images[b:b + 1])
                activation = captured["a"]
                activation.retain_grad()
                logits[0, classes[b, k]].backward()
                maps.append(compute_cam(as_maps(activation.detach().double()), as_maps(activation.grad.double()),
                                        method, dtype=torch.float64)[0, 0])
    finally:
        handle.remove()
    return torch.stack(maps).view(*classes.shape, *maps[0].shape)


def layer_output(model, layer, images):
    """The output of `layer` (a module of `model`) on `images`, detached, from a no_grad forward."""
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o.detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return captured["a"]
