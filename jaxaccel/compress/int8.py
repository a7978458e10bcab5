"""Real int8 inference: int8 x int8 -> int32 convs / matmuls with static calibrated scales.

`convert_int8` turns a float model's variables plus calibrated activation QParams (from
`quant.calibrate`) into an `Int8Model`: for every quantized conv/dense layer an int8 kernel,
per-output-channel `out_scale = s_x * s_w`, the float bias and the static input scale / zero
point; no float copy of those kernels is kept. `int8_apply` runs the unchanged linen model,
intercepting each quantized conv/dense call (nn.Conv, nn.Dense, or a custom layer owning a
`kernel`): the float input is quantized with the static scale (one multiply-round-clip-convert
pass, no reductions), the layer runs int8 x int8 -> int32 (per `conv_lowering`: the CPU kernel,
an im2col dot, or `lax.conv_general_dilated` / `lax.dot_general` with
`preferred_element_type=int32`), and the int32 accumulator is rescaled once (zero-point
correction, `* out_scale + bias`). Layers in `skip` stay float.

The result equals `quant.apply_fake_quant` with the same weight config and `skip` up to float
summation order: integer codes are computed exactly as `fake_quant` does (multiply by the float32
inverse scale, round half to even, clamp).

Speed on CPU (BENCHMARKS.md, `jaxaccel bench infer`): XLA:CPU's own int8 dot gains little over
its float32 matmul on CPUs without VNNI, and XLA fuses a float conv + bias + ReLU + max-pool into
one kernel that an int8 conv's int32 output cannot join, so with XLA's int8 ops the whole model
ran slower than float32. `conv_lowering="auto"` therefore runs int8 convs and dense layers on CPU
in `kernels.int8` (an AVX2 / AVX-512 / AVX-512 VNNI implicit-GEMM kernel, exact; the models' conv + 2x2 max-pool,
`conv_impls.Conv.max_pooled`, as one call that writes only the pooled int32 values). Where the
kernel cannot run, "auto" falls back to "im2col" (one int8 dot of patches, faster than XLA's int8
conv for narrow layers) on CPU, and to the native int8 conv on GPU/TPU. Exported programs never use the kernel (`portable=True`).

Imports `compress.quant`, `kernels.int8`, `models.conv_impls` and trees; never config, stages,
state, the loop or anything above.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.extend.core import Literal, Primitive

from jaxaccel.compress.quant import (WEIGHT_CONFIG, QParams, QuantConfig, _check_skip, layer_kind,
                                     quantize, tensor_qparams)
from jaxaccel.trees import is_kernel, path_str
from jaxaccel.kernels import int8 as int8_cpu
from jaxaccel.models.conv_impls import im2col_patches, max_pool_2d


@struct.dataclass
class Int8Layer:
    """One int8 conv/dense layer. `kernel` holds (q_w - zp_w) as int8, output channel last."""

    kernel: jax.Array            # int8, HWIO or (in, out)
    out_scale: jax.Array         # float32 (out,): s_x * s_w
    bias: jax.Array              # float32 (out,) (zeros if the layer has none)
    inv_input_scale: jax.Array   # float32 scalar: 1 / s_x (as fake_quant multiplies)
    input_zero_point: jax.Array  # float32 scalar, in the int8 code space
    zp_correction: jax.Array     # int32 (out,): zp_x * sum of the kernel over its input axes
    qmin: int = struct.field(pytree_node=False)
    qmax: int = struct.field(pytree_node=False)
    zero_point: int = struct.field(pytree_node=False)  # the same zero point, as a static int

    @property
    def zero_point_is_zero(self) -> bool:
        return self.zero_point == 0

    @property
    def code_dtype(self) -> Any:
        """Dtype holding the shifted codes q - zp (real 0 -> 0), or None if they fit neither 8-bit type."""
        lo, hi = self.qmin - self.zero_point, self.qmax - self.zero_point
        if lo >= -128 and hi <= 127:
            return jnp.int8
        if lo >= 0 and hi <= 255:
            return jnp.uint8
        return None


@struct.dataclass
class Int8Model:
    """Int8 layers by module path plus the float remainder of the variables (other layers, BN...)."""

    layers: dict[str, Int8Layer]
    variables: dict


def _module_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _get(tree: Mapping, parts: list[str]) -> Any:
    for p in parts:
        tree = tree[p]
    return tree


def _strip(params: Any, module_paths: set[str]) -> dict:
    """Copy of `params` without the kernel/bias leaves of `module_paths` (empty dicts dropped)."""
    def rec(tree: Mapping, prefix: str) -> dict:
        out = {}
        for k, v in tree.items():
            p = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                sub = rec(v, p)
                if sub:
                    out[k] = sub
            elif not (prefix in module_paths and k in ("kernel", "bias")):
                out[k] = v
        return out
    return rec(params, "")


def convert_int8(variables: Mapping, act_qparams: Mapping[str, QParams], *,
                 weight_config: QuantConfig = WEIGHT_CONFIG, skip: Iterable[str] = ()) -> Int8Model:
    """Int8 form of every conv/dense kernel not in `skip` (call outside jit: it inspects values).

    Needs symmetric weights (zero point folded into the int8 codes) quantized per output channel
    (last axis) or per tensor, and per-tensor activation QParams for each layer's input. 8-bit
    unsigned activation codes are shifted by -128 into int8 (same real values).
    """
    skip = _check_skip(skip)
    if not weight_config.symmetric:
        raise ValueError("int8 inference needs symmetric weights (weight_config.symmetric=True), "
                         f"got {weight_config!r}")
    params = variables["params"]
    kernels, biases, scales, zps, ranges = {}, {}, {}, {}, {}
    for path, kernel in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(path)
        mod = _module_path(p)
        if not is_kernel(p, kernel) or mod in skip:
            continue
        if mod not in act_qparams:
            raise ValueError(f"no activation qparams for layer {mod!r}; calibrate it or add it to skip")
        aq = act_qparams[mod]
        if aq.axis is not None or jnp.ndim(aq.scale) != 0:
            raise ValueError(f"int8 inference needs per-tensor activation qparams, layer {mod!r} has axis={aq.axis!r}")
        if weight_config.per_channel and weight_config.axis % kernel.ndim != kernel.ndim - 1:
            raise ValueError(f"int8 inference needs per-channel weight scales along the last (output) axis, "
                             f"got axis={weight_config.axis!r} for {p!r}")
        # Activation codes in int8: shift uint8's [0, 255] by -128 (the zero point moves with it).
        offset = 128 if aq.qmax > 127 else 0
        if aq.qmin - offset < -128 or aq.qmax - offset > 127:
            raise ValueError(f"activation range [{aq.qmin}, {aq.qmax}] of layer {mod!r} does not fit int8")
        bias = _get(params, p.split("/")[:-1]).get("bias")
        kernels[mod] = kernel
        biases[mod] = jnp.zeros((kernel.shape[-1],), jnp.float32) if bias is None else bias
        scales[mod], zps[mod] = aq.scale, aq.zero_point
        ranges[mod] = (aq.qmin - offset, aq.qmax - offset, offset)
    arrays = _convert_arrays(kernels, biases, scales, zps, {k: r[2] for k, r in ranges.items()}, weight_config)
    layers = {}
    for mod, a in arrays.items():
        layers[mod] = Int8Layer(**a, qmin=ranges[mod][0], qmax=ranges[mod][1],
                                zero_point=int(np.asarray(a["input_zero_point"])))
    rest = {k: v for k, v in variables.items() if k != "params"}
    rest["params"] = _strip(params, set(layers))
    return Int8Model(layers=layers, variables=rest)


@functools.partial(jax.jit, static_argnames=("offsets", "weight_config"))
def _convert_arrays_jit(kernels, biases, scales, zps, offsets, weight_config):
    out = {}
    for mod, off in offsets:
        kernel = kernels[mod]
        wq = tensor_qparams(kernel, weight_config)
        codes = (quantize(kernel, wq, jnp.int32) - _bcast_last(wq.zero_point, kernel.ndim, wq.axis)).astype(jnp.int8)
        w_scale = jnp.broadcast_to(jnp.asarray(wq.scale, jnp.float32), (kernel.shape[-1],))
        x_scale = jnp.asarray(scales[mod], jnp.float32)
        zp = jnp.asarray(zps[mod], jnp.int32) - off
        kernel_sum = jnp.sum(codes.astype(jnp.int32), axis=tuple(range(kernel.ndim - 1)))
        out[mod] = dict(kernel=codes, out_scale=x_scale * w_scale, bias=jnp.asarray(biases[mod], jnp.float32),
                        inv_input_scale=jnp.float32(1.0) / x_scale, input_zero_point=zp.astype(jnp.float32),
                        zp_correction=zp * kernel_sum)
    return out


def _convert_arrays(kernels, biases, scales, zps, offsets: dict, weight_config):
    """All layers' int8 arrays in one compiled program (eager op-by-op would compile dozens of ops)."""
    return _convert_arrays_jit(kernels, biases, scales, zps, tuple(sorted(offsets.items())), weight_config)


def _bcast_last(v: jax.Array, ndim: int, axis: int | None) -> jax.Array:
    v = jnp.asarray(v)
    if axis is None:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def quantize_input(x: jax.Array, layer: Int8Layer) -> jax.Array:
    """int8 codes clamp(round_half_even(x * (1/s_x)) + zp, qmin, qmax): one fused elementwise pass."""
    # The zero point is used as a static constant: a traced scalar gets materialized as a
    # full-size broadcast by XLA:CPU's YNNPACK fusions.
    q = jnp.round(x.astype(jnp.float32) * layer.inv_input_scale) + np.float32(layer.zero_point)
    return jnp.clip(q, layer.qmin, layer.qmax).astype(jnp.int8)


def _codes_for(y: jax.Array, consumer: Int8Layer) -> jax.Array:
    """Shifted input codes (q - zp, real 0 -> 0) of `consumer` for float values `y`."""
    zp = consumer.zero_point
    q = jnp.round(y.astype(jnp.float32) * consumer.inv_input_scale)
    return jnp.clip(q, consumer.qmin - zp, consumer.qmax - zp).astype(consumer.code_dtype)


def _codes_to_int8(u: jax.Array, layer: Int8Layer) -> jax.Array:
    if layer.zero_point_is_zero and u.dtype == jnp.int8:
        return u
    return (u.astype(jnp.int32) + layer.zero_point).astype(jnp.int8)


def _broadcast_int(v: Any, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(v)


CONV_LOWERINGS: tuple[str, ...] = ("auto", "cpu_kernel", "im2col", "native")


def resolve_conv_lowering(lowering: str, *, portable: bool = False) -> str:
    """'auto' -> 'cpu_kernel' on CPU when `kernels.int8.available()` (else 'im2col'), 'native' on
    other backends. `portable` (exported artifacts) rules out 'cpu_kernel', a custom call of this
    process: 'auto' then means 'im2col' on CPU. Unknown names, and 'cpu_kernel' where it cannot
    run, raise ValueError naming the choices."""
    if lowering not in CONV_LOWERINGS:
        raise ValueError(f"unknown int8 conv lowering {lowering!r}; valid choices: {', '.join(CONV_LOWERINGS)}")
    if lowering == "auto":
        if jax.default_backend() != "cpu":
            return "native"
        return "cpu_kernel" if not portable and int8_cpu.available() else "im2col"
    if lowering == "cpu_kernel":
        choices = ", ".join(c for c in CONV_LOWERINGS if c != "cpu_kernel")
        if portable:
            raise ValueError("int8 conv lowering 'cpu_kernel' is a custom call of this process and cannot be "
                             f"exported; valid choices here: {choices}")
        if not int8_cpu.available():
            raise ValueError(f"int8 conv lowering 'cpu_kernel' cannot run here ({int8_cpu.unavailable_reason()}); "
                             f"valid choices here: {choices}")
    return lowering


# Patch lengths are padded with zero columns (and the kernel with zero rows) to a multiple of
# this: XLA:CPU's int8 dot runs a K = 27 first layer about 2x slower than K = 32.
_IM2COL_K_MULTIPLE = 16


def _im2col_int8_acc(q: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                     padding: Any) -> jax.Array:
    """int32 accumulator of a 2-D conv as one int8 x int8 -> int32 dot of im2col patches
    (`conv_impls.im2col_patches`, zero padding); exact like the native int8 conv."""
    kh, kw, cin, cout = kernel.shape
    pads = lax.padtype_to_pads(q.shape[1:3], (kh, kw), strides, padding) if isinstance(padding, str) else padding
    n, h, w, _ = q.shape
    ho = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    wo = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    patches = im2col_patches(q, (kh, kw), [tuple(p) for p in pads], strides)
    weights = kernel.reshape(kh * kw * cin, cout)
    extra = -patches.shape[1] % _IM2COL_K_MULTIPLE  # zero columns x zero rows: exact
    if extra:
        patches = jnp.pad(patches, ((0, 0), (0, extra)))
        weights = jnp.pad(weights, ((0, extra), (0, 0)))
    acc = lax.dot_general(patches, weights, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.reshape(n, ho, wo, cout)


def _conv_acc(module: nn.Conv, layer: Int8Layer, q: jax.Array, lowering: str = "native",
              max_pool: int = 1) -> jax.Array:
    """int32 accumulator of an int8 conv of int8 codes `q` (zero-point corrected), max-pooled
    `max_pool` x `max_pool` (exact: the rescale that follows is increasing, s_x * s_w > 0).

    `lowering` "cpu_kernel" runs ungrouped, undilated 2-D convs (and a 2x2 pool) in
    `kernels.int8`; "im2col" as one int8 dot of patches (on XLA:CPU ~3x faster than its int8
    conv for ResNet-20's narrow layers); "native" (and every other conv) runs
    `lax.conv_general_dilated` with int8 operands. All are exact.
    """
    n = layer.kernel.ndim - 2
    if getattr(module, "mask", None) is not None:
        raise ValueError(f"int8 conv does not support a masked nn.Conv ({'/'.join(module.path)})")
    batch_shape = q.shape[: q.ndim - (n + 1)]
    q = q.reshape((-1,) + q.shape[q.ndim - (n + 1):])
    # nn.Conv's attributes; custom conv modules need `strides` / `padding`, the rest default.
    strides = _broadcast_int(getattr(module, "strides", 1), n)
    lhs_dil = _broadcast_int(getattr(module, "input_dilation", 1), n)
    rhs_dil = _broadcast_int(getattr(module, "kernel_dilation", 1), n)
    groups = getattr(module, "feature_group_count", 1)
    padding = getattr(module, "padding", "SAME")
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"int8 conv supports SAME/VALID/explicit padding, got {padding!r}")
    elif isinstance(padding, int):
        padding = [(padding, padding)] * n
    else:
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if not layer.zero_point_is_zero and padding != "VALID":
        # Pad with the code of real 0 (the zero point), then run VALID: exact for affine inputs.
        if any(d != 1 for d in lhs_dil):
            raise ValueError("int8 conv with input_dilation needs a zero activation zero point")
        if isinstance(padding, str):
            dilated = [(k - 1) * d + 1 for k, d in zip(layer.kernel.shape[:n], rhs_dil)]
            padding = lax.padtype_to_pads(q.shape[1:-1], dilated, strides, padding)
        q = jnp.pad(q, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)],
                    constant_values=np.int8(layer.zero_point))
        padding = "VALID"
    plain_2d = n == 2 and groups == 1 and lhs_dil == (1, 1) and rhs_dil == (1, 1)
    if lowering == "cpu_kernel" and plain_2d:
        if padding != "VALID":  # here the zero point is 0: pad with the code of real 0
            pads = lax.padtype_to_pads(q.shape[1:3], layer.kernel.shape[:2], strides, padding) \
                if isinstance(padding, str) else padding
            q = jnp.pad(q, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
        acc = int8_cpu.conv_acc(q, layer.kernel, strides, max_pool if max_pool == 2 else 1)
        if max_pool == 2:
            max_pool = 1  # done in the kernel
    elif lowering == "im2col" and plain_2d:
        acc = _im2col_int8_acc(q, layer.kernel, strides, padding)
    else:
        lhs_spec = (0, n + 1) + tuple(range(1, n + 1))
        dn = lax.ConvDimensionNumbers(lhs_spec, (n + 1, n) + tuple(range(n)), lhs_spec)
        acc = lax.conv_general_dilated(q, layer.kernel, strides, padding, lhs_dilation=lhs_dil,
                                       rhs_dilation=rhs_dil, dimension_numbers=dn, feature_group_count=groups,
                                       preferred_element_type=jnp.int32)
    if max_pool > 1:
        acc = max_pool_2d(acc, max_pool)  # the models' pool (reshape-then-max), on int32
    if not layer.zero_point_is_zero:
        acc = acc - layer.zp_correction
    return acc.reshape(batch_shape + acc.shape[1:])


def _dense_acc(layer: Int8Layer, q: jax.Array, lowering: str = "native") -> jax.Array:
    if lowering == "cpu_kernel":
        acc = int8_cpu.matmul_acc(q, layer.kernel)
    else:
        acc = lax.dot_general(q, layer.kernel, (((q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if not layer.zero_point_is_zero:
        acc = acc - layer.zp_correction
    return acc


def _add_bias_arg(key: str, args: tuple, kwargs: Mapping) -> bool:
    """The call must be layer(x) or layer(x, add_bias=...) (the models' conv module)."""
    extra = set(kwargs) - {"add_bias"}
    if len(args) != 1 or extra:
        raise ValueError(f"int8 layer {key!r} called with unsupported arguments "
                         f"({len(args)} positional, keywords {sorted(kwargs)}); expected layer(x[, add_bias=])")
    return bool(kwargs.get("add_bias", True))


def _pool_window_arg(key: str, args: tuple, kwargs: Mapping) -> int:
    """The call must be layer.max_pooled(x, window) (`conv_impls.Conv.max_pooled`)."""
    if len(args) + len(kwargs) != 2 or set(kwargs) - {"window"}:
        raise ValueError(f"int8 layer {key!r}: max_pooled called with unsupported arguments "
                         f"({len(args)} positional, keywords {sorted(kwargs)}); expected max_pooled(x, window)")
    window = kwargs["window"] if "window" in kwargs else args[1]
    return int(window)


# ---------------------------------------------------------------------------------------------
# Fusion analysis: where may a layer hand the NEXT layer's int8 codes to the model code?
# ---------------------------------------------------------------------------------------------
# Quantization q(y) = clamp(round(y/s) + zp) is monotone, so it commutes with ReLU (max(., 0),
# since q(0) = zp) and with max-pooling, and (per-tensor) with any reshape/slice/transpose. When
# everything the model does between a conv/dense output and the next int8 layer's input is such
# an op, the layer can emit the next layer's codes directly: the requantization is fused into its
# int32 epilogue and the model's ReLU / pooling run on bytes instead of float32 -- with results
# identical to quantizing after them. Anything else (residual adds, averages, casts) keeps the
# float hand-off. The check runs on the jaxpr of the model with marker primitives around layers.
_LAYER_OUT = Primitive("jaxaccel_int8_layer_out")
_LAYER_IN = Primitive("jaxaccel_int8_layer_in")
for _p in (_LAYER_OUT, _LAYER_IN):
    _p.def_impl(lambda x, **_: x)
    _p.def_abstract_eval(lambda x, **_: x)

_SELECTION_OPS = frozenset({"reshape", "slice", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
                            "copy", "copy_p", "reduce_max", "reduce_window_max", "rev"})
_CALL_JAXPR_PARAM = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
                     "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}


def _is_zero_literal(v: Any) -> bool:
    return isinstance(v, Literal) and np.ndim(v.val) == 0 and float(v.val) == 0.0


def _commutes_with_quantization(eqn: Any, var: Any) -> bool:
    """True if `eqn`, applied to `var` (its only non-constant input), commutes with q(.)."""
    name = eqn.primitive.name
    if len(eqn.outvars) != 1:
        return False
    if name in _CALL_JAXPR_PARAM:
        if len(eqn.invars) != 1 or eqn.params.get("num_consts", 0):
            return False
        closed = eqn.params[_CALL_JAXPR_PARAM[name]]
        inner = getattr(closed, "jaxpr", closed)
        return not inner.constvars and _is_linear_chain(inner)
    if name == "max":
        others = [v for v in eqn.invars if v is not var]
        return len(eqn.invars) == 2 and len(others) == 1 and _is_zero_literal(others[0])
    if name == "convert_element_type":
        return eqn.params["new_dtype"] == var.aval.dtype
    return name in _SELECTION_OPS and len(eqn.invars) == 1


def _is_linear_chain(jaxpr: Any) -> bool:
    """One input flows through commuting ops, each used once, to the one output."""
    if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        return False
    cur = jaxpr.invars[0]
    for eqn in jaxpr.eqns:
        uses = [v for v in eqn.invars if v is cur]
        if not uses or not _commutes_with_quantization(eqn, cur):
            return False
        cur = eqn.outvars[0]
    return cur is jaxpr.outvars[0]


def _fusion_plan(jaxpr: Any) -> dict[str, str]:
    """{producer layer: consumer int8 layer} for marked outputs that reach one marked input
    through commuting ops only (each intermediate used exactly once)."""
    users: dict[Any, list] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                users.setdefault(v, []).append(eqn)
    outs = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    outs_k = [e.params["key"] for e in jaxpr.eqns if e.primitive is _LAYER_OUT]
    ins_k = [e.params["key"] for e in jaxpr.eqns if e.primitive is _LAYER_IN]
    shared = {k for k in outs_k + ins_k if outs_k.count(k) > 1 or ins_k.count(k) > 1}  # applied twice
    plan: dict[str, str] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is not _LAYER_OUT or eqn.params["key"] in shared:
            continue
        cur = eqn.outvars[0]
        while True:
            us = users.get(cur, [])
            if cur in outs or len(us) != 1:
                break
            nxt = us[0]
            if nxt.primitive is _LAYER_IN:
                if nxt.params["key"] not in shared:
                    plan[eqn.params["key"]] = nxt.params["key"]
                break
            if not _commutes_with_quantization(nxt, cur):
                break
            cur = nxt.outvars[0]
    return plan


def _run(model: nn.Module, int8_model: Int8Model, images: jax.Array, plan: Mapping[str, str] | None,
         mark: bool = False, conv_lowering: str = "native") -> jax.Array:
    """Apply `model` with its int8 layers in integer arithmetic; `plan` = producer -> consumer fusions."""
    layers = int8_model.layers
    plan = dict(plan or {})
    plan = {p: c for p, c in plan.items() if p in layers and layers[c].code_dtype is not None}
    receives_codes = set(plan.values())

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name not in ("__call__", "max_pooled") or module.scope is None:
            return next_fun(*args, **kwargs)
        key = "/".join(module.path)
        layer = layers.get(key)
        pooled = context.method_name == "max_pooled"
        if layer is None and (pooled or layer_kind(module) is None):
            return next_fun(*args, **kwargs)
        x = args[0]
        out_dtype = getattr(module, "dtype", None) or (
            x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
        if layer is None:  # a float conv/dense layer (skipped)
            y = next_fun(*args, **kwargs)
        else:
            if pooled:  # the models' conv + max-pool (`conv_impls.Conv.max_pooled`): pool the int32 accumulator
                window = _pool_window_arg(key, args, kwargs)
                add_bias = False
            else:
                window = 1
                add_bias = _add_bias_arg(key, args, kwargs)
            if mark:
                x = _LAYER_IN.bind(x, key=key)
            if key in receives_codes:
                q = lax.optimization_barrier(_codes_to_int8(x, layer))
            else:
                q = quantize_input(x, layer)
            conv = layer.kernel.ndim >= 3 and not isinstance(module, nn.Dense)
            if conv:
                acc = _conv_acc(module, layer, q, conv_lowering, window)
            else:
                acc = _dense_acc(layer, q, conv_lowering)
            y = acc.astype(jnp.float32) * layer.out_scale
            if not add_bias:  # the models' conv: (output before bias, bias) so they can pool first
                bias = layer.bias.astype(out_dtype) if getattr(module, "use_bias", True) else None
                return y.astype(out_dtype), bias
            y = y + layer.bias
        if isinstance(y, tuple):
            return y
        y = y.astype(out_dtype)
        if key in plan:
            # Barriers keep the codes int8 in memory; without them XLA:CPU keeps them as float32
            # and pulls ReLU / pooling into the next conv's YNNPACK fusion, which runs slower.
            y = lax.optimization_barrier(_codes_for(y, layers[plan[key]]))
        if mark and layer is not None:
            y = _LAYER_OUT.bind(y, key=key)
        return y

    with nn.intercept_methods(interceptor):
        return model.apply(int8_model.variables, images, train=False)


def fusion_plan(model: nn.Module, int8_model: Int8Model, images: jax.Array) -> dict[str, str]:
    """{int8 layer: next int8 layer} hand-offs that can carry int8 codes exactly (see the note above)."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), (int8_model, images))
    closed = jax.make_jaxpr(lambda m, x: _run(model, m, x, None, mark=True))(*abstract)
    return _fusion_plan(closed.jaxpr)


def int8_apply(model: nn.Module, int8_model: Int8Model, images: jax.Array, *, fuse: bool = False,
               conv_lowering: str = "auto") -> jax.Array:
    """Eval-mode logits of `model` with its int8 layers run in integer arithmetic. Jittable.

    Each int8 layer quantizes its input with the static calibrated scale (no reductions), runs
    int8 x int8 -> int32, and rescales once (`* s_x s_w + bias`) in the epilogue. With `fuse`,
    where provably exact (`fusion_plan`), an int8 layer instead requantizes straight to the next
    int8 layer's codes and the model's ReLU / max-pool run on bytes. Both give the same results
    (up to fused-multiply-add rounding at ties); on XLA:CPU with YNNPACK fusions they also run
    equally fast, hence off by default. `conv_lowering` picks how int8 convs and dense layers run
    (`CONV_LOWERINGS`; "auto": `kernels.int8` on an x86 CPU with AVX2 or wider, else im2col patches @ kernel as one
    int8 dot on CPU, the native int8 conv on GPU/TPU; see `resolve_conv_lowering`).
    """
    lowering = resolve_conv_lowering(conv_lowering)
    plan = fusion_plan(model, int8_model, images) if fuse else {}
    return _run(model, int8_model, images, plan, conv_lowering=lowering)


def int8_size_bytes(int8_model: Int8Model) -> int:
    """Bytes of all arrays in an Int8Model (int8 kernels, scales, float remainder)."""
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(int8_model)))
