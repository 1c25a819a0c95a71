"""The network after the target layer, as a graph of its own.

`split_at(model, layer_name)` traces the model with torch.fx, keeping the target layer as one
call, and cuts the graph there: the *prefix* computes the layer's output and every earlier value
the rest still reads (a residual stream that bypasses the layer, for instance), the *tail*
computes the logits from those. Shapes the tail reads of such values are read again in the
tail (so a batch size never crosses the cut), and values made from the parameters alone (a
relative position bias) are passed as they are. AblationCAM runs only the tail for each
ablated channel, and `linear_head` reads the tail to prove the head is global average pooling
then one linear layer, when Grad-CAM's gradients are known without a backward:

    logit_t = b_t + sum_c W[t, c] mean_s A[c, s]   =>   d logit_t / d A[c, s] = W[t, c] / HW

or, with a layer norm over the channels between them (ConvNeXt), p = mean_s A, x = (p - mean p)
/ sd p, logit_t = W[t] (gamma x + beta) + b_t: d logit_t / d A[c, s] = J(p)^T (gamma W[t]) / HW,
the layer norm's backward at the image's p.

A model torch.fx cannot trace (data-dependent control flow, some hub and Hugging Face models)
gets a reason instead of a split, and the callers fall back to running the whole model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn


@dataclass
class Split:
    prefix: fx.GraphModule  # images -> (layer output, *extras)
    tail: fx.GraphModule  # (layer output, *extras) -> logits
    num_extras: int
    # per extra: whether it is computed from the images (a residual stream, a shape) or only
    # from the model's parameters (Swin's relative position bias), the same for every image
    from_images: tuple[bool, ...] = ()


class _Tracer(fx.Tracer):
    def __init__(self, layer_name: str):
        super().__init__()
        self.layer_name = layer_name

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.layer_name or super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module, layer_name: str) -> fx.Graph | str:
    try:
        return _Tracer(layer_name).trace(model)
    except Exception as error:  # torch.fx raises many kinds on untraceable code
        return f"torch.fx cannot trace the model ({type(error).__name__}: {str(error).splitlines()[0][:160]})"


def split_at(model: nn.Module, layer_name: str) -> Split | str:
    """The model cut after `layer_name` (a submodule's qualified name), or why it cannot be."""
    if not layer_name:
        return "the target layer has no name in the model"
    graph = _trace(model, layer_name)
    if isinstance(graph, str):
        return graph
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == layer_name]
    if len(calls) != 1:
        return (f"the layer {layer_name} runs {len(calls)} times in the traced model" if calls
                else f"the layer {layer_name} is not a step of the traced model")
    layer = calls[0]
    outputs = [n for n in nodes if n.op == "output"]
    if len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return "the model does not return one tensor of logits"
    # the nodes that depend on the layer's output: the tail
    after: set[fx.Node] = set()
    for node in nodes[nodes.index(layer) + 1:]:
        if node.op != "output" and any(arg is layer or arg in after for arg in node.all_input_nodes):
            after.add(node)
    logits = outputs[0].args[0]
    if logits not in after:
        return "the logits do not depend on the target layer"
    # shapes read from a tensor the tail has anyway (`B, H, W, C = x.shape` of a residual
    # stream) are read again in the tail, so a batch size is never carried across the cut
    moved: set[fx.Node] = set()
    for node in reversed(nodes[:nodes.index(layer)]):
        if (_reads_shape(node) and any(user in after or user in moved for user in node.users)
                and _tensor_read(node, after, layer)):
            moved.add(node)
    after |= moved
    extras = []
    for node in nodes:
        if node in after:
            for arg in node.all_input_nodes:
                if arg is not layer and arg not in after and arg.op != "get_attr" and arg not in extras:
                    extras.append(arg)
    # prefix: everything up to the layer and the extras, returning them
    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    needed = _ancestors([layer, *extras])
    for node in nodes:
        if node in needed:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output((env[layer], *(env[n] for n in extras)))
    # tail: placeholders for the layer and the extras, then the dependent nodes in order
    tail_graph = fx.Graph()
    env = {layer: tail_graph.placeholder("layer_output")}
    for index, node in enumerate(extras):
        env[node] = tail_graph.placeholder(f"extra_{index}")
    for node in nodes:
        if node.op == "get_attr" and any(user in after for user in node.users):
            env[node] = tail_graph.node_copy(node, lambda n: env[n])
        elif node in after:
            env[node] = tail_graph.node_copy(node, lambda n: env[n])
    tail_graph.output(env[logits])
    inputs = [n for n in nodes if n.op == "placeholder"]
    from_images = tuple(any(n in inputs for n in _ancestors([extra])) for extra in extras)
    try:
        return Split(fx.GraphModule(model, prefix_graph), fx.GraphModule(model, tail_graph), len(extras),
                     from_images)
    except Exception as error:
        return f"the traced graph cannot be split ({type(error).__name__}: {str(error).splitlines()[0][:160]})"


def _reads_shape(node: fx.Node) -> bool:
    """x.shape, x.size(), x.dim(), x.ndim, or an item of one of these."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim")
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _reads_shape(node.args[0])
    return False


def _tensor_read(node: fx.Node, after: set[fx.Node], layer: fx.Node) -> bool:
    """Whether the tensor a shape read reads is one the tail takes anyway: the layer's output or
    a value before the layer that a step of the tail (not a shape read) uses."""
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    tensor = node.args[0]
    return isinstance(tensor, fx.Node) and (tensor is layer or any(
        user in after and not _reads_shape(user) for user in tensor.users))


def _ancestors(roots: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


# --- global average pooling then one linear layer -------------------------------------------------

_SPATIAL = ({2, 3}, {-2, -1}, {2, -1}, {-2, 3})


def _is_pooling(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.AdaptiveAvgPool2d):
            size = module.output_size
            return size == 1 or tuple(size) == (1, 1)
        return False
    if node.op == "call_function" and node.target is torch.nn.functional.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size == 1 or size == (1, 1) or size == [1, 1]
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and set(dims) in _SPATIAL and len(dims) == 2
    return False


def _is_reshape(node: fx.Node, modules: dict) -> bool:
    """A step that can only drop the 1x1 grid (B, C, 1, 1) -> (B, C) or keep the values as they are."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Identity) or isinstance(module, nn.Flatten):
            return not isinstance(module, nn.Flatten) or module.start_dim == 1
        if isinstance(module, nn.Dropout):
            return not module.training
        return False
    if node.op == "call_function":
        if node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return start == 1
        return False
    if node.op == "call_method":
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return start == 1
        if node.target == "squeeze":
            return len(node.args) > 1 and node.args[1] in ((-1, -2), (2, 3), (-2, -1), (3, 2))
        if node.target in ("view", "reshape"):
            shape = node.args[1:]
            return len(shape) == 2 and shape[1] == -1  # x.view(x.size(0), -1)
    return False


@dataclass
class LinearHead:
    weight: torch.Tensor  # (num_classes, C)
    description: str
    norm: Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]] = None
    """(gamma, beta, eps) of a layer norm over the channels between the pooling and the linear
    layer (ConvNeXt's head), else None."""

    def through_norm(self, rows: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """d logit / d pooled for (B, K, C) rows of d logit / d (the linear layer's input), at the
        (B, C) pooled activations: the layer norm's backward (biased variance, as nn.LayerNorm),
        float32. Without a norm, the rows themselves."""
        if self.norm is None:
            return rows
        gamma, _, eps = self.norm
        pooled = pooled.float()
        mean = pooled.mean(dim=1, keepdim=True)
        inverse = torch.rsqrt(pooled.var(dim=1, unbiased=False, keepdim=True) + eps)  # (B, 1)
        normalized = ((pooled - mean) * inverse)[:, None, :]  # (B, 1, C)
        upstream = rows.float() * gamma.float() if gamma is not None else rows.float()
        return inverse[:, None, :] * (upstream - upstream.mean(dim=-1, keepdim=True)
                                      - normalized * (upstream * normalized).mean(dim=-1, keepdim=True))


def _attribute(module: nn.Module, node) -> Optional[torch.Tensor]:
    """The tensor a get_attr node reads (None for a missing weight or bias)."""
    if not isinstance(node, fx.Node):
        return None
    value = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _layer_norm(node: fx.Node, modules: dict, tail: nn.Module):
    """(normalized_shape, gamma, beta, eps) of a layer norm step, or None if it is not one."""
    if node.op == "call_module" and type(modules[node.target]) is nn.LayerNorm:
        module = modules[node.target]
        return tuple(module.normalized_shape), module.weight, module.bias, module.eps
    if node.op == "call_function" and node.target is torch.nn.functional.layer_norm:
        arguments = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args))
        arguments.update(node.kwargs)
        shape = arguments.get("normalized_shape")
        return (tuple(shape) if isinstance(shape, (tuple, list)) else (shape,),
                _attribute(tail, arguments.get("weight")), _attribute(tail, arguments.get("bias")),
                float(arguments.get("eps", 1e-5)))
    return None


def _permuted(node: fx.Node, ndim: int, position: int) -> Optional[int]:
    """Where the channels are after x.permute(...), if it keeps the batch first; else None."""
    dims = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) == 2 else node.kwargs.get("dims")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else ()
    if len(dims) != ndim or sorted(d % ndim for d in dims) != list(range(ndim)) or dims[0] % ndim != 0:
        return None
    return [d % ndim for d in dims].index(position)


def linear_head(split: Split) -> LinearHead | str:
    """The tail's final linear layer when the tail is exactly global average pooling, steps that
    only reshape (flatten, eval-mode dropout, identity, a permute that keeps the batch first),
    at most one layer norm over the channels (ConvNeXt), then one nn.Linear, each feeding only
    the next; otherwise why not. The channels' place is followed through the steps: after the
    pooling every other axis but the batch has size 1, so a permute only moves the channels, and
    a layer norm must normalize over exactly them."""
    if split.num_extras:
        return "the network after the layer also reads values from before it"
    modules = dict(split.tail.named_modules())
    # parameters read by functions (a functional layer norm) show up as the steps that read them
    steps = [n for n in split.tail.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    if not steps:
        return "the layer's output is the logits"
    for node in steps:
        if len(node.users) != 1:
            return f"{_describe(node)} feeds {len(node.users)} steps"
    while len(steps) > 1 and steps[0].op == "call_module" and isinstance(modules[steps[0].target], nn.Identity):
        steps = steps[1:]  # timm's norm_pre
    if not _is_pooling(steps[0], modules):
        return f"the layer is followed by {_describe(steps[0])}, not global average pooling"
    last = steps[-1]
    if len(steps) < 2 or last.op != "call_module" or not isinstance(modules[last.target], nn.Linear):
        return f"the head ends in {_describe(last)}, not one linear layer"
    channels = modules[last.target].in_features
    ndim, position = _pooled_ndim(steps[0]), 1
    norm = None
    for node in steps[1:-1]:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Dropout):
            if modules[node.target].training:
                return f"{node.target} is a dropout in training mode"
        found = _layer_norm(node, modules, split.tail)
        if found is not None:
            shape, gamma, beta, eps = found
            if norm is not None or shape != (channels,) or position != ndim - 1:
                return f"the pooling is followed by {_describe(node)}, not a layer norm over the channels"
            norm = (gamma, beta, eps)
        elif node.op == "call_method" and node.target == "permute":
            position = _permuted(node, ndim, position)
            if position is None:
                return f"the pooling is followed by {_describe(node)}, which moves the batch axis"
        elif _is_reshape(node, modules):
            if not (node.op == "call_module" and isinstance(modules[node.target], (nn.Identity, nn.Dropout))):
                ndim, position = 2, 1  # flatten, squeeze, view(B, -1): (B, C), channels kept in order
        else:
            return f"the pooling is followed by {_describe(node)}, not only a linear layer"
    if ndim != 2:
        return f"the linear layer {last.target} reads {ndim}-d values, not (B, C)"
    description = " -> ".join(_describe(node) for node in steps)
    return LinearHead(modules[last.target].weight, description, norm)


def _pooled_ndim(node: fx.Node) -> int:
    """The pooling's output: (B, C, 1, 1) from adaptive pooling or a mean with keepdim, else (B, C)."""
    if node.op == "call_module" or node.target is torch.nn.functional.adaptive_avg_pool2d:
        return 4
    keepdim = node.kwargs.get("keepdim", False) or (len(node.args) > 2 and node.args[2] is True)
    return 4 if keepdim else 2


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return "getitem" if target is operator.getitem else name
