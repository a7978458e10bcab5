"""Structured shrinking: turn channel-pruned Flax models into physically smaller ones.

Channel pruning (``prune.magnitude_masks(granularity="channel")``) only zeroes kernel
columns. A zeroed conv output channel is not a zero *activation*: the conv bias and a
following BatchNorm (``scale * (0 - mean) / sqrt(var + eps) + bias``) still add a constant.
So here a pruned channel means: its kernel column, its bias, and the scale and bias of the
BatchNorm that normalises it are all masked; ``couple_channel_masks`` extends kernel channel
masks accordingly. Such a channel outputs exactly 0 (also after ReLU, max-pool and zero
padding), and removing it together with the matching input slice of the next layer leaves
the model's function unchanged: ``shrink`` builds that smaller model.

Which channels can be removed is a property of the architecture, listed per model class
by ``channel_groups``: the hidden widths of plain chains (CNN3, CNNBN, LeNet5,
LeNet-300-100), the block-internal width of each ResNet-20 block (conv1/bn1 -> conv2),
and in DSCNNBN the output width of the stem and of every pointwise conv, together with the
depthwise conv after it (a depthwise conv's channel c only reads input channel c, so its
channels are removed with its input's: ``ChannelGroup.through``); never widths that feed a
residual sum and never the classifier's outputs.

Owns `shrink`, `channel_groups`, `shrinkable_filter`, `couple_channel_masks` and `flops`.
Imports `compress.prune` and models (the model classes); never config, stages, state, the
loop or anything above.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.compress import prune
from jaxaccel.models import CNN3, CNNBN, DSCNNBN, LeNet5, LeNet300100, ResNet20

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Output channels of ``producer`` that can be removed as a unit.

    ``norms``: BatchNorm modules normalising those channels; ``consumer``: the layer that
    reads them (its kernel's input axis -2 is sliced; after a flatten of NHWC, whose
    channel index runs fastest, every C-th row); ``field``/``index``: the model field
    (and position in a tuple field) holding the width. ``through``: depthwise convs between
    producer and consumer (channel c in, channel c out), whose output channels go with the
    group's (kernel axis -1 and bias sliced; their BatchNorms are listed in ``norms``).
    """
    producer: str
    consumer: str
    field: str
    index: int | None = None
    norms: tuple[str, ...] = ()
    through: tuple[str, ...] = ()


def _chain(convs: Sequence[str], norms: Sequence[str | None], denses: Sequence[str],
           conv_field: str | None, dense_field: str | None,
           dense_tuple: bool) -> list[ChannelGroup]:
    """Groups of a plain conv... -> dense... chain; the last dense is the classifier."""
    layers = list(convs) + list(denses)
    groups = []
    for i, name in enumerate(layers[:-1]):
        if i < len(convs):
            field, index = conv_field, i
            bn = norms[i] if i < len(norms) else None
        else:
            j = i - len(convs)
            field, index, bn = dense_field, (j if dense_tuple else None), None
        groups.append(ChannelGroup(name, layers[i + 1], field, index, (bn,) if bn else ()))
    return groups


def _convs_fc1_fc2(model: CNN3 | LeNet5) -> list[ChannelGroup]:
    convs = [f"conv{i + 1}" for i in range(len(model.features))]
    return _chain(convs, [], ["fc1", "fc2"], "features", "hidden", False)


def _lenet300100(model: LeNet300100) -> list[ChannelGroup]:
    denses = [f"fc{i + 1}" for i in range(len(model.hidden) + 1)]
    return _chain([], [], denses, None, "hidden", True)


def _cnnbn(model: CNNBN) -> list[ChannelGroup]:
    convs = [f"conv{i + 1}" for i in range(len(model.features))]
    norms = [f"bn{i + 1}" if model.use_bn else None for i in range(len(convs))]
    return _chain(convs, norms, ["fc"], "features", None, False)


def _dscnnbn(model: DSCNNBN) -> list[ChannelGroup]:
    # features[0] is the stem's width, features[i] block i's pointwise width; the depthwise
    # conv of block i + 1 carries those channels on to pw<i+1> (the last ones go to fc).
    blocks = len(model.features) - 1
    producers = ["conv1"] + [f"pw{i}" for i in range(1, blocks + 1)]
    norms = ["bn1"] + [f"bn_pw{i}" for i in range(1, blocks + 1)]
    groups = []
    for k, producer in enumerate(producers):
        last = k == blocks
        through = () if last else (f"dw{k + 1}",)
        bns = (norms[k],) + (() if last else (f"bn_dw{k + 1}",)) if model.use_bn else ()
        groups.append(ChannelGroup(producer, "fc" if last else f"pw{k + 1}", "features", k, bns, through))
    return groups


def _resnet20(model: ResNet20) -> list[ChannelGroup]:
    groups = []
    for k in range(len(model.setup_inner())):
        s, b = divmod(k, 3)
        block = f"stage{s + 1}_block{b + 1}"
        norms = (f"{block}/bn1",) if model.use_bn else ()
        groups.append(ChannelGroup(f"{block}/conv1", f"{block}/conv2", "inner_widths", k, norms))
    return groups


_PLANS: dict[type, Callable[[Any], list[ChannelGroup]]] = {
    CNN3: _convs_fc1_fc2, LeNet5: _convs_fc1_fc2, LeNet300100: _lenet300100, CNNBN: _cnnbn, ResNet20: _resnet20,
    DSCNNBN: _dscnnbn,
}


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The removable channel groups of ``model`` (one of the jaxaccel models)."""
    plan = next((_PLANS[c] for c in type(model).__mro__ if c in _PLANS), None)
    if plan is None:
        raise ValueError(f"shrink does not know model {type(model).__name__!r}; supported: "
                         f"{', '.join(c.__name__ for c in _PLANS)}")
    return plan(model)


def shrinkable_filter(model: nn.Module) -> prune.Filter:
    """A ``filter_fn`` selecting exactly the kernels whose output channels ``shrink`` removes."""
    producers = {f"{g.producer}/kernel" for g in channel_groups(model)}

    def filter_fn(params: PyTree) -> PyTree:
        flags = [p in producers for p, _ in prune.named_leaves(params)]
        return jax.tree.unflatten(jax.tree.structure(params), flags)

    return filter_fn


def _get(tree: Mapping, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _kept_channels(kernel_mask: Any) -> Any:
    """True for output channels with any kept kernel entry (jnp; works under jit)."""
    cout = kernel_mask.shape[-1]
    return jnp.any(jnp.reshape(kernel_mask, (-1, cout)), axis=0)


def couple_channel_masks(model: nn.Module, masks: PyTree) -> PyTree:
    """Extend each removable channel pruned in its producer's kernel mask to the producer's
    bias and its BatchNorm ``scale``/``bias``, so the channel's output is exactly 0 (and to
    the kernel column and bias of the group's depthwise ``through`` convs, which then read
    and output exactly 0 there).

    ``masks`` are masks over ``variables["params"]``; jit-friendly.
    """
    masks = _mutable(masks)
    for g in channel_groups(model):
        keep = _kept_channels(_get(masks, f"{g.producer}/kernel"))
        targets = [_get(masks, g.producer)] + [_get(masks, bn) for bn in g.norms]
        for node in targets:
            for name in ("bias", "scale"):
                if name in node:
                    node[name] = jnp.asarray(node[name], bool) & keep
        for dw in g.through:
            node = _get(masks, dw)
            for name in ("kernel", "bias"):
                if name in node:
                    node[name] = jnp.asarray(node[name], bool) & keep
    return masks


def _mutable(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _mutable(v) for k, v in tree.items()}
    return tree


def _slice_inputs(kernel: np.ndarray, idx: np.ndarray, channels: int) -> np.ndarray:
    """Keep input channels ``idx`` of a kernel whose axis -2 holds ``channels`` channels,
    or ``rows / channels`` flattened NHWC positions of them (channel index fastest)."""
    shape = kernel.shape
    rows = shape[-2]
    if rows == channels:
        return np.take(kernel, idx, axis=-2)
    if rows % channels:
        raise ValueError(f"consumer kernel of shape {shape} cannot read {channels} channels")
    grouped = kernel.reshape(shape[:-2] + (rows // channels, channels, shape[-1]))
    return np.take(grouped, idx, axis=-2).reshape(shape[:-2] + (-1, shape[-1]))


def _with_width(model: nn.Module, group: ChannelGroup, width: int,
                fields: dict[str, Any]) -> None:
    if group.index is None:
        fields[group.field] = width
        return
    current = fields.get(group.field)
    if current is None:
        current = (model.setup_inner() if isinstance(model, ResNet20)
                   else getattr(model, group.field))
    values = list(current)
    values[group.index] = width
    fields[group.field] = tuple(values)


def shrink(model: nn.Module, variables: PyTree, masks: PyTree) -> tuple[nn.Module, PyTree]:
    """Physically remove the pruned channels: ``(small_model, small_variables)``.

    A channel of a removable group (``channel_groups``) is removed when its producer kernel
    mask is all False. The small model computes what ``model`` computes with
    ``apply_masks(params, couple_channel_masks(model, masks))`` (other zeros, e.g.
    unstructured ones, are kept as zeros). A fully pruned group keeps one zeroed channel.
    Host-side numpy work (shapes change), not for use under jit.
    """
    params = variables["params"]
    prune.check_masks(params, masks)
    host = lambda tree: _mutable(jax.tree.map(np.asarray, jax.device_get(tree)))  # noqa: E731
    masks = host(masks)
    small = host(dict(variables))
    small["params"] = jax.tree.map(lambda p, mk: np.where(mk, p, np.zeros((), p.dtype)),
                                   small["params"], masks)
    fields: dict[str, Any] = {}
    for g in channel_groups(model):
        kernel_mask = _get(masks, f"{g.producer}/kernel")
        channels = kernel_mask.shape[-1]
        keep = kernel_mask.reshape(-1, channels).any(0)
        idx = np.flatnonzero(keep) if keep.any() else np.array([0])
        producer = _get(small["params"], g.producer)
        through = [_get(small["params"], dw) for dw in g.through]
        nodes = [producer] + through + [_get(collection, bn) for collection in small.values()
                                        for bn in g.norms if _has(collection, bn)]
        if not keep.any():  # the kept channel must output exactly 0 (coupled masking)
            for node in [producer] + through + [_get(small["params"], bn) for bn in g.norms]:
                for name in ("bias", "scale"):
                    if name in node:
                        node[name] = np.zeros_like(node[name])
        for node in [producer] + through:
            node["kernel"] = np.take(node["kernel"], idx, axis=-1)
        for node in nodes:
            for name in node:
                if name != "kernel":
                    node[name] = np.take(node[name], idx, axis=0)
        consumer = _get(small["params"], g.consumer)
        consumer["kernel"] = _slice_inputs(consumer["kernel"], idx, channels)
        _with_width(model, g, len(idx), fields)
    return model.clone(**fields), jax.tree.map(jnp.asarray, small)


def _has(tree: Any, path: str) -> bool:
    try:
        _get(tree, path)
    except (KeyError, TypeError):
        return False
    return True


def flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates (1 MAC = 2 FLOPs) of all conv and dense layers for one forward
    pass on ``input_shape`` (HWC = one image, or NHWC), counted analytically from the
    shapes seen in an abstract trace: output positions x kernel size per layer."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got {input_shape!r}")
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.key(0), x)
    return sum(m * k * n for _, (m, k, n) in layer_matmul_shapes(model, variables, x))


def layer_matmul_shapes(model: nn.Module, variables: Any, x: Any) -> list[tuple[str, tuple[int, int, int]]]:
    """``(module path, (M, K, N))`` of every conv/dense call of ``model.apply(variables, x)`` in
    eval mode, in call order: M output positions, K kernel entries per output (kh*kw*Cin/groups,
    or Cin), N output channels -- the layer's MACs as one (M x K) @ (K x N) matmul.
    ``variables`` and ``x`` may be ``jax.ShapeDtypeStruct`` trees (an abstract trace)."""
    kernels = {p.rsplit("/", 1)[0]: leaf.shape for p, leaf in prune.named_leaves(variables["params"])
               if prune.is_kernel(p, leaf)}
    return [(path, (int(np.prod(out_shape[:-1])), int(np.prod(kernels[path][:-1])), int(kernels[path][-1])))
            for path, out_shape in prune.layer_calls(model, variables, x, train=False)]
