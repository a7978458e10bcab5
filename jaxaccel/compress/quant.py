"""Fake quantization, observers, post-training calibration and quantization-aware training.

Conventions follow PyTorch's `torch.ao.quantization` so numbers can be compared one to one:

* `fake_quant` mirrors `torch.fake_quantize_per_tensor_affine` (scalar scale/zero point) and
  `torch.fake_quantize_per_channel_affine` (1-D scale/zero point along `axis`):
  `q = clamp(round_half_even(x * (1/scale)) + zp, qmin, qmax)`, `out = (q - zp) * scale`,
  gradient w.r.t. `x` = 1 where the unclamped `q` lies in `[qmin, qmax]`, else 0 (straight-through
  estimator); no gradient flows to `scale` / `zero_point` (as PyTorch's non-learnable version).
* `calculate_qparams` mirrors `MinMaxObserver` / `PerChannelMinMaxObserver._calculate_qparams`
  (range always includes 0, eps floor on the scale); the running statistics mirror
  `MinMaxObserver` ("minmax") and `MovingAverageMinMaxObserver` /
  `MovingAveragePerChannelMinMaxObserver` ("ema", `averaging_constant`).

Quantization of a whole Flax linen model uses `flax.linen.intercept_methods`: every call of a
conv/dense layer (`nn.Conv`, `nn.Dense`, or a custom layer that owns a `kernel` param, see
`layer_kind`) is intercepted, so activations are observed or fake-quantized at the input of each
such layer of ANY linen model, without changing the model. Layers are keyed by their module path
joined with "/" (e.g. "stage1_block1/conv1"). A layer applied several times in one pass (e.g. on
micro-batches) gets one range covering all its calls.

Also the calibration file (`save_calibration` / `load_calibration`). Imports trees and io;
never config, stages, state, the loop or anything above.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel import io
from jaxaccel.trees import is_kernel, path_str

# torch.finfo(torch.float32).eps: the floor PyTorch's observers put on the scale.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
OBSERVERS: tuple[str, ...] = ("minmax", "ema", "percentile")


# --------------------------------------------------------------------------------------------
# Configuration and integer ranges
# --------------------------------------------------------------------------------------------
def quant_range(bits: int, signed: bool = True, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range `(qmin, qmax)` for `bits` (2..8); narrow drops the lowest code (e.g. [-127, 127])."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    bits = int(bits)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return (qmin + 1 if narrow_range else qmin), qmax


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one kind of tensor (weights or activations) is quantized.

    bits: 2..8. signed: int (e.g. [-128, 127]) vs uint (e.g. [0, 255]) codes. symmetric: zero point
    fixed (0 signed, mid-range unsigned) vs affine. per_channel: one scale per index of `axis`
    (weights: output channel = last axis of HWIO / (in, out) kernels). narrow_range: drop the lowest
    code (e.g. [-127, 127], as Jacob et al. 2018 for weights). observer: "minmax" (running min/max),
    "ema" (moving average with `averaging_constant`, PyTorch's 0.01), "percentile" (per batch the
    `percentile`-th percentile of |x| (symmetric) or the (100-p, p) percentiles (affine), averaged
    over batches). eps: floor on the scale.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    signed: bool = True
    narrow_range: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    axis: int = -1
    eps: float = FLOAT32_EPS

    def __post_init__(self) -> None:
        quant_range(self.bits, self.signed, self.narrow_range)  # validates bits
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; valid choices: {', '.join(OBSERVERS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        if not self.eps > 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, self.signed, self.narrow_range)[1]


# Defaults as in PyTorch's x86/fbgemm recipe: weights int8 symmetric per-channel, activations
# 8-bit affine per-tensor (here signed codes, so the real int8 path needs no offset).
WEIGHT_CONFIG = QuantConfig()
ACT_CONFIG = QuantConfig(symmetric=False, per_channel=False)


@struct.dataclass
class QParams:
    """Scale and zero point (scalars, or 1-D along `axis`) plus the static integer range."""

    scale: jax.Array
    zero_point: jax.Array
    qmin: int = struct.field(pytree_node=False)
    qmax: int = struct.field(pytree_node=False)
    axis: int | None = struct.field(pytree_node=False, default=None)


@struct.dataclass
class Range:
    """Running statistic of an observer. Unobserved: min=+inf, max=-inf (PyTorch's sentinel)."""

    min: jax.Array
    max: jax.Array
    count: jax.Array  # number of batches seen (used by the percentile average)


# --------------------------------------------------------------------------------------------
# fake_quant with a straight-through gradient
# --------------------------------------------------------------------------------------------
def _check_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} out of range for a tensor of rank {ndim}")
    return int(axis) % ndim


def _broadcast_to_axis(v: jax.Array, ndim: int, axis: int | None) -> jax.Array:
    if axis is None:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _quantize_codes(x32, scale, zero_point):
    """round_half_even(x * (1/scale)) + zp as float32 (PyTorch multiplies by the float32 inverse)."""
    inv_scale = jnp.float32(1.0) / scale
    return jnp.round(x32 * inv_scale) + zero_point


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, qmin, qmax):
    x32 = x.astype(jnp.float32)
    q = jnp.clip(_quantize_codes(x32, scale, zero_point), qmin, qmax)
    return ((q - zero_point) * scale).astype(x.dtype)


def _fake_quant_fwd(x, scale, zero_point, qmin, qmax):
    x32 = x.astype(jnp.float32)
    q = _quantize_codes(x32, scale, zero_point)
    inside = (q >= qmin) & (q <= qmax)
    out = ((jnp.clip(q, qmin, qmax) - zero_point) * scale).astype(x.dtype)
    return out, (inside, scale, zero_point)


def _fake_quant_bwd(qmin, qmax, res, g):
    inside, scale, zero_point = res
    return (jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale), jnp.zeros_like(zero_point))


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: jax.Array,
    scale: jax.Array | float,
    zero_point: jax.Array | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> jax.Array:
    """Quantize-dequantize `x`: (clamp(round_half_even(x/scale) + zp, qmin, qmax) - zp) * scale.

    Mirrors `torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)` when `axis` is None
    (scalar scale/zp) and `torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)`
    when `axis` is given (1-D scale/zp of length `x.shape[axis]`); like PyTorch it multiplies by the
    float32 reciprocal of the scale. Gradient w.r.t. `x`: straight-through (1 inside the clamping
    range, 0 outside); none w.r.t. scale / zero point. Exact zeros stay exactly zero.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"fake_quant needs a floating-point x, got dtype {x.dtype}")
    qmin, qmax = int(qmin), int(qmax)
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    axis = _check_axis(axis, x.ndim)
    scale = jnp.asarray(scale, jnp.float32)
    zero_point = jnp.asarray(zero_point).astype(jnp.float32)
    if axis is None:
        if scale.ndim or zero_point.ndim:
            raise ValueError(f"per-tensor fake_quant needs scalar scale/zero_point, got shapes "
                             f"{scale.shape} and {zero_point.shape} (pass axis= for per-channel)")
    else:
        want = (x.shape[axis],)
        if scale.shape != want or zero_point.shape != want:
            raise ValueError(f"per-channel fake_quant along axis {axis} needs scale/zero_point of shape "
                             f"{want}, got {scale.shape} and {zero_point.shape}")
    scale = _broadcast_to_axis(scale, x.ndim, axis)
    zero_point = _broadcast_to_axis(zero_point, x.ndim, axis)
    return _fake_quant(x, scale, zero_point, qmin, qmax)


def fake_quant_with(x: jax.Array, qparams: QParams) -> jax.Array:
    """`fake_quant` with the parameters held in a `QParams`."""
    return fake_quant(x, qparams.scale, qparams.zero_point, qparams.qmin, qparams.qmax, qparams.axis)


def quantize(x: jax.Array, qparams: QParams, dtype: Any = jnp.int32) -> jax.Array:
    """Integer codes clamp(round_half_even(x/scale) + zp, qmin, qmax) as `dtype`."""
    axis = _check_axis(qparams.axis, x.ndim)
    scale = _broadcast_to_axis(jnp.asarray(qparams.scale, jnp.float32), x.ndim, axis)
    zp = _broadcast_to_axis(jnp.asarray(qparams.zero_point).astype(jnp.float32), x.ndim, axis)
    q = jnp.clip(_quantize_codes(x.astype(jnp.float32), scale, zp), qparams.qmin, qparams.qmax)
    return q.astype(dtype)


# --------------------------------------------------------------------------------------------
# Observers: statistics -> ranges -> quantization parameters
# --------------------------------------------------------------------------------------------
def _reduce_axes(x: jax.Array, config: QuantConfig) -> tuple[tuple[int, ...], int | None]:
    if not config.per_channel:
        return tuple(range(x.ndim)), None
    axis = _check_axis(config.axis, x.ndim)
    return tuple(a for a in range(x.ndim) if a != axis), axis


def batch_range(x: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """(min, max) of one batch as the observer sees it: per tensor or per channel along config.axis.

    "minmax"/"ema": plain min and max; "percentile": the (100-p, p) percentiles (affine) or
    -/+ the p-th percentile of |x| (symmetric). No gradient flows through the statistic.
    """
    x = jax.lax.stop_gradient(jnp.asarray(x)).astype(jnp.float32)
    axes, axis = _reduce_axes(x, config)
    if config.observer != "percentile":
        return jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    if axis is None:
        flat = x.reshape(1, -1)
    else:
        flat = jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    p = config.percentile / 100.0
    if config.symmetric:
        hi = jnp.quantile(jnp.abs(flat), p, axis=1)
        lo = -hi
    else:
        lo = jnp.quantile(flat, 1.0 - p, axis=1)
        hi = jnp.quantile(flat, p, axis=1)
    if axis is None:
        lo, hi = lo[0], hi[0]
    return lo, hi


def init_range(shape: tuple[int, ...] = ()) -> Range:
    """An empty observer state (min=+inf, max=-inf), scalar or per-channel `shape`."""
    return Range(min=jnp.full(shape, jnp.inf, jnp.float32), max=jnp.full(shape, -jnp.inf, jnp.float32),
                 count=jnp.zeros((), jnp.int32))


def update_range(state: Range, lo: jax.Array, hi: jax.Array, config: QuantConfig) -> Range:
    """Fold one batch's (lo, hi) into the running statistic, per `config.observer`.

    "minmax": running min/max (MinMaxObserver). "ema": the first batch sets the range, then
    min += c * (batch_min - min) with c = averaging_constant (MovingAverageMinMaxObserver).
    "percentile": running mean of the per-batch percentiles.
    """
    first = state.count == 0
    if config.observer == "minmax":
        new_lo, new_hi = jnp.minimum(state.min, lo), jnp.maximum(state.max, hi)
    elif config.observer == "ema":
        c = config.averaging_constant
        new_lo = jnp.where(first, lo, state.min + c * (lo - jnp.where(first, 0.0, state.min)))
        new_hi = jnp.where(first, hi, state.max + c * (hi - jnp.where(first, 0.0, state.max)))
    else:
        n = state.count.astype(jnp.float32)
        new_lo = jnp.where(first, lo, state.min + (lo - jnp.where(first, 0.0, state.min)) / (n + 1.0))
        new_hi = jnp.where(first, hi, state.max + (hi - jnp.where(first, 0.0, state.max)) / (n + 1.0))
    return Range(min=new_lo, max=new_hi, count=state.count + 1)


def calculate_qparams(min_val: jax.Array, max_val: jax.Array, config: QuantConfig) -> QParams:
    """Scale and zero point from a (min, max) range, as PyTorch's `MinMaxObserver._calculate_qparams`.

    The range is first widened to include 0. Symmetric: scale = max(-min, max) / ((qmax - qmin)/2),
    zero point 0 (signed) or 128 for uint8's default [0, 255] ((qmin+qmax)//2 for other unsigned
    ranges). Affine: scale = (max - min) / (qmax - qmin), zp = qmin - round(min/scale) clamped to
    [qmin, qmax]. scale >= eps. An unobserved range (+inf, -inf) gives scale 1, zero point 0.
    """
    qmin, qmax = config.qmin, config.qmax
    min_val = jnp.asarray(min_val, jnp.float32)
    max_val = jnp.asarray(max_val, jnp.float32)
    observed = min_val <= max_val
    min_neg = jnp.minimum(min_val, 0.0)
    max_pos = jnp.maximum(max_val, 0.0)
    eps = jnp.float32(config.eps)
    if config.symmetric:
        amax = jnp.maximum(-min_neg, max_pos)
        scale = jnp.maximum(amax / (float(qmax - qmin) / 2.0), eps)
        if config.signed:
            zp_value = 0
        elif config.bits == 8 and not config.narrow_range:
            zp_value = 128
        else:
            zp_value = (qmin + qmax) // 2
        zero_point = jnp.full(scale.shape, zp_value, jnp.int32)
    else:
        scale = jnp.maximum((max_pos - min_neg) / float(qmax - qmin), eps)
        zero_point = jnp.clip(qmin - jnp.round(min_neg / scale), qmin, qmax).astype(jnp.int32)
    scale = jnp.where(observed, scale, 1.0)
    zero_point = jnp.where(observed, zero_point, 0)
    axis = config.axis if (config.per_channel and scale.ndim) else None
    return QParams(scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax, axis=axis)


def tensor_qparams(x: jax.Array, config: QuantConfig) -> QParams:
    """QParams of one tensor from its own min/max (or percentiles): how weights are quantized."""
    lo, hi = batch_range(x, config)
    qp = calculate_qparams(lo, hi, config)
    if qp.axis is not None:
        qp = qp.replace(axis=_check_axis(config.axis, jnp.ndim(x)))
    return qp


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def weight_qparams(params: Any, config: QuantConfig = WEIGHT_CONFIG,
                   filter_fn: Callable[[str, jax.Array], bool] | None = None) -> dict[str, QParams]:
    """QParams of every selected weight leaf, keyed by its path ('conv1/kernel')."""
    filter_fn = filter_fn or is_kernel
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(path)
        if filter_fn(p, leaf):
            if config.per_channel:
                _check_axis(config.axis, jnp.ndim(leaf))
            out[p] = tensor_qparams(leaf, config)
    return out


def quantize_weights(params: Any, config: QuantConfig = WEIGHT_CONFIG,
                     filter_fn: Callable[[str, jax.Array], bool] | None = None) -> tuple[Any, dict[str, QParams]]:
    """Fake-quantize the selected weight leaves (default: all kernels); returns (params, qparams).

    Per-channel quantization uses `config.axis` (default last = output channel). The result is
    differentiable w.r.t. `params` with the straight-through estimator (used by QAT); pruned zeros
    stay exactly zero.
    """
    qps = weight_qparams(params, config, filter_fn)

    def one(path, leaf):
        qp = qps.get(path_str(path))
        return leaf if qp is None else fake_quant_with(leaf, qp)

    return jax.tree_util.tree_map_with_path(one, params), qps


# --------------------------------------------------------------------------------------------
# Layer interception (any linen model): which modules are quantized and how they are keyed
# --------------------------------------------------------------------------------------------
def layer_kind(module: nn.Module) -> str | None:
    """"conv" / "dense" for a bound layer that owns a `kernel` param, else None.

    nn.Conv / nn.Dense, and custom layers (e.g. the models' own conv module) recognised by their
    own `kernel` parameter: rank >= 3 is a conv (HWIO...), rank 2 a dense (in, out).
    """
    if module.scope is None or not module.has_variable("params", "kernel"):
        return None  # unbound, or initialising: nothing to quantize yet
    ndim = jnp.ndim(module.get_variable("params", "kernel"))
    if isinstance(module, nn.Conv) or (not isinstance(module, nn.Dense) and ndim >= 3):
        return "conv"
    if ndim == 2:
        return "dense"
    return None


def layer_key(context: Any) -> str | None:
    """Module path ("a/b") of an intercepted conv/dense `__call__` (see `layer_kind`), else None."""
    if context.method_name != "__call__" or layer_kind(context.module) is None:
        return None
    return "/".join(context.module.path)


def _check_skip(skip: Iterable[str]) -> tuple[str, ...]:
    if isinstance(skip, str):
        raise ValueError(f"skip must be a sequence of layer paths, got the string {skip!r}")
    return tuple(skip)


def _layer_filter(skip: tuple[str, ...]) -> Callable[[str, jax.Array], bool]:
    def keep(path: str, leaf: jax.Array) -> bool:
        return is_kernel(path, leaf) and path.rsplit("/", 1)[0] not in skip
    return keep


def _apply_eval(model: nn.Module, variables: Mapping, images: jax.Array, **kwargs):
    return model.apply(variables, images, train=False, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "config", "skip"))
def _batch_stats(model, variables, images, config, skip):
    """Per-layer (lo, hi) of the conv/dense inputs on one batch (eval mode)."""
    stats: dict[str, tuple[jax.Array, jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, context):
        key = layer_key(context)
        if key is not None and key not in skip:
            lo, hi = batch_range(args[0], config)
            if key in stats:  # a layer applied twice: widen its range
                lo, hi = jnp.minimum(stats[key][0], lo), jnp.maximum(stats[key][1], hi)
            stats[key] = (lo, hi)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        _apply_eval(model, variables, images)
    return stats


def calibrate(model: nn.Module, variables: Mapping, batches: Iterable[jax.Array],
              config: QuantConfig = ACT_CONFIG, *, skip: Iterable[str] = ()) -> dict[str, QParams]:
    """Static activation QParams for the input of every conv/dense layer (not in `skip`).

    Runs the model in eval mode on each batch of images, feeds each layer input's statistic to the
    observer `config.observer` and returns {layer path: QParams}. Per-channel activations use
    `config.axis` (the channel axis, last in NHWC).
    """
    skip = _check_skip(skip)
    ranges: dict[str, Range] = {}
    n = 0
    for images in batches:
        stats = _batch_stats(model, variables, jnp.asarray(images), config, skip)
        for key, (lo, hi) in stats.items():
            ranges[key] = update_range(ranges.get(key, init_range(jnp.shape(lo))), lo, hi, config)
        n += 1
    if n == 0:
        raise ValueError("calibrate needs at least one batch, got an empty iterable")
    return {k: calculate_qparams(r.min, r.max, config) for k, r in ranges.items()}


def _fake_quant_interceptor(act_qparams: Mapping[str, QParams], skip: tuple[str, ...]):
    def interceptor(next_fun, args, kwargs, context):
        key = layer_key(context)
        if key is None or key in skip:
            return next_fun(*args, **kwargs)
        if key not in act_qparams:
            raise ValueError(f"no activation qparams for layer {key!r}; calibrate it or add it to skip")
        return next_fun(fake_quant_with(args[0], act_qparams[key]), *args[1:], **kwargs)
    return interceptor


def apply_fake_quant(model: nn.Module, variables: Mapping, images: jax.Array,
                     act_qparams: Mapping[str, QParams], *, weight_config: QuantConfig | None = WEIGHT_CONFIG,
                     skip: Iterable[str] = ()) -> jax.Array:
    """Eval-mode logits with simulated quantization (W and A): the PTQ reference.

    Kernels of every conv/dense layer not in `skip` are fake-quantized with `weight_config`
    (None: leave the weights as given, e.g. already quantized); the input of each such layer is
    fake-quantized with its calibrated `act_qparams` entry. Jittable; works on sharded params.
    """
    skip = _check_skip(skip)
    if weight_config is not None:
        params, _ = quantize_weights(variables["params"], weight_config, _layer_filter(skip))
        variables = {**variables, "params": params}
    with nn.intercept_methods(_fake_quant_interceptor(act_qparams, skip)):
        return _apply_eval(model, variables, images)


# --------------------------------------------------------------------------------------------
# Quantization-aware training
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QATConfig:
    """QAT recipe: weight and activation configs, quantization delay (steps without fake-quant,
    during which activation ranges are still tracked), and layers kept in float."""

    weights: QuantConfig = WEIGHT_CONFIG
    activations: QuantConfig = dataclasses.field(
        default_factory=lambda: QuantConfig(symmetric=False, per_channel=False, observer="ema"))
    delay: int = 0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.delay, bool) or not isinstance(self.delay, (int, np.integer)) or self.delay < 0:
            raise ValueError(f"delay must be an integer >= 0, got {self.delay!r}")
        _check_skip(self.skip)


def qat_init(model: nn.Module, variables: Mapping, images: jax.Array,
             config: QATConfig = QATConfig()) -> dict[str, Range]:
    """Empty activation-range state {layer path: Range} for `qat_apply` (shapes from `images`)."""
    stats = jax.eval_shape(lambda v, x: _batch_stats(model, v, x, config.activations, tuple(config.skip)),
                           variables, images)
    return {k: init_range(lo.shape) for k, (lo, _) in stats.items()}


def qat_apply(model: nn.Module, variables: Mapping, qat_state: Mapping[str, Range], images: jax.Array, *,
              train: bool, step: jax.Array | int, config: QATConfig = QATConfig(),
              mutable: Any = False) -> tuple[Any, dict[str, Range]]:
    """Forward pass with fake-quantized weights and layer inputs; returns (output, new qat_state).

    In training the range of each conv/dense input is folded into `qat_state` by the activation
    observer (EMA by default) before it is used; in eval the stored ranges are used unchanged.
    Before `step` reaches `config.delay` nothing is fake-quantized (ranges are still tracked).
    Gradients w.r.t. params pass through the straight-through estimator. Jittable (`step` may be
    traced). `mutable` is passed to `model.apply`; with it the output is (logits, updates).
    """
    skip = tuple(config.skip)
    enabled = jnp.asarray(step) >= config.delay
    params = variables["params"]
    fq_params, _ = quantize_weights(params, config.weights, _layer_filter(skip))
    params = jax.tree.map(lambda q, p: jnp.where(enabled, q, p), fq_params, params)
    new_state: dict[str, Range] = {}
    seen: dict[str, tuple[jax.Array, jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, context):
        key = layer_key(context)
        if key is None or key in skip:
            return next_fun(*args, **kwargs)
        if key not in qat_state:
            raise ValueError(f"layer {key!r} has no range in qat_state; build it with qat_init")
        state = qat_state[key]
        x = args[0]
        if train:
            # A layer applied several times in one pass (e.g. on micro-batches) still makes ONE
            # observer update per step: from the step's old state with the union of the ranges.
            lo, hi = batch_range(x, config.activations)
            if key in seen:
                lo, hi = jnp.minimum(seen[key][0], lo), jnp.maximum(seen[key][1], hi)
            seen[key] = (lo, hi)
            state = update_range(state, lo, hi, config.activations)
            new_state[key] = state
        qp = calculate_qparams(state.min, state.max, config.activations)
        x = jnp.where(enabled, fake_quant_with(x, qp), x)
        return next_fun(x, *args[1:], **kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply({**variables, "params": params}, images, train=train, mutable=mutable)
    return out, {**qat_state, **new_state}


# --------------------------------------------------------------------------------------------
# Calibration files
# --------------------------------------------------------------------------------------------
CALIBRATION_FORMAT = "jaxaccel-calibration"
CALIBRATION_VERSION = 1


def _qparams_record(key: str, qp: QParams) -> dict[str, Any]:
    scale = np.asarray(jax.device_get(qp.scale), np.float32)
    zero_point = np.asarray(jax.device_get(qp.zero_point))
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise ValueError(f"activation qparams of layer {key!r}: scales must be finite and > 0, "
                         f"got {scale.tolist()!r}")
    if scale.ndim > 1 or zero_point.shape != scale.shape:
        raise ValueError(f"activation qparams of layer {key!r}: scale {scale.shape} and zero "
                         f"point {zero_point.shape} must be scalars or equal 1-D arrays")
    # float32 -> Python float is exact, and JSON writes the shortest repr that parses back to it
    return {"scale": scale.tolist(), "zero_point": zero_point.astype(np.int64).tolist(),
            "qmin": int(qp.qmin), "qmax": int(qp.qmax),
            "axis": None if qp.axis is None else int(qp.axis)}


def save_calibration(path: Any, act_qparams: Mapping[str, QParams], weight_config: QuantConfig, *,
                     meta: Mapping[str, Any] | None = None) -> None:
    """Write a PTQ calibration (strict JSON, atomically) for exports made later from the run.

    `act_qparams` are those of the model the calibration ran on (the pipeline's quantize stage
    calibrates the BN-folded model, `fold.fold_bn`), `weight_config` how its weights are
    quantized. Scales round-trip exactly (float32 values stored as JSON numbers). `meta`
    (JSON) is kept as is; `jaxaccel compress export` reads its "step" (the train step of the
    calibrated weights) and refuses weights of another step.
    """
    if not isinstance(weight_config, QuantConfig):
        raise ValueError(f"weight_config must be a QuantConfig, got {weight_config!r}")
    record = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
              "weight_config": dataclasses.asdict(weight_config),
              "activations": {str(k): _qparams_record(k, qp) for k, qp in act_qparams.items()},
              "meta": dict(meta or {})}
    io.write_json(path, record)


def _qparams_from_record(key: str, r: Any) -> QParams:
    if not isinstance(r, dict) or set(r) != {"scale", "zero_point", "qmin", "qmax", "axis"}:
        raise ValueError(f"layer {key!r}: needs exactly scale, zero_point, qmin, qmax, axis")
    scale = np.asarray(r["scale"], np.float32)
    zero_point = np.asarray(r["zero_point"])
    ints = (r["qmin"], r["qmax"]) + (() if r["axis"] is None else (r["axis"],))
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) \
            or not np.issubdtype(zero_point.dtype, np.integer) \
            or zero_point.shape != scale.shape or scale.ndim > 1 \
            or not np.all(np.isfinite(scale)) or not np.all(scale > 0) \
            or not r["qmin"] < r["qmax"]:
        raise ValueError(f"layer {key!r}: invalid qparams {r!r}")
    return QParams(scale=jnp.asarray(scale), zero_point=jnp.asarray(zero_point, jnp.int32),
                   qmin=r["qmin"], qmax=r["qmax"], axis=r["axis"])


def load_calibration(path: Any) -> tuple[dict[str, QParams], QuantConfig, dict]:
    """`(act_qparams, weight_config, meta)` of a file written by `save_calibration`.

    FileNotFoundError if there is none; ValueError (naming the file) if it is not one.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no calibration file at {path!r}")
    try:
        with open(path) as f:
            record = io.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not a jaxaccel calibration file ({' '.join(str(e).split())})") from None
    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path!r} is not a jaxaccel calibration file (format="
                         f"{record.get('format') if isinstance(record, dict) else None!r})")
    if record.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{path!r}: calibration version {record.get('version')!r} is not supported "
                         f"(this jaxaccel reads version {CALIBRATION_VERSION}); calibrate the run again")
    try:
        fields = record["weight_config"]
        if not isinstance(fields, dict):
            raise ValueError(f"weight_config must be an object, got {fields!r}")
        weight_config = QuantConfig(**fields)
        acts = record["activations"]
        if not isinstance(acts, dict):
            raise ValueError(f"activations must be an object, got {type(acts).__name__}")
        act_qparams = {k: _qparams_from_record(k, r) for k, r in acts.items()}
        meta = record.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be an object, got {meta!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path!r}: damaged calibration file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    return act_qparams, weight_config, meta
