"""Serialized StableHLO artifacts of inference functions (`jax.export`), loadable without jaxaccel.

Each exported function takes what ``jaxaccel.load(W).predict`` takes: a batch of RAW images,
uint8 NHWC as the dataset gives them (symbolic batch dimension "b" by default), and returns
float32 logits; the dataset's normalisation ``(x/255 - mean) / std`` is inside (the
``spec: data.DatasetSpec`` argument), as are the weights (float, fake-quantized, or int8
kernels + scales), baked in as constants, gathered to the host first so sharded params export
like any others. Load anywhere with only jax:

    exp = jax.export.deserialize(bytearray(open(path, "rb").read()))
    logits = exp.call(images_uint8)

The command line: ``jaxaccel compress export WORKDIR --out PATH [--int8 | --fake-quant]``.
Serialization needs the `flatbuffers` package.

Owns `export_inference`, `export_float` / `export_fake_quant` / `export_int8` and
`load_exported`. Imports compress's quant and int8, `models.conv_impls` and data
(`DatasetSpec`); never config, stages, state, the loop or anything above.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import export as jax_export

from jaxaccel import data
from jaxaccel.compress.int8 import Int8Model, int8_apply, resolve_conv_lowering
from jaxaccel.compress.quant import WEIGHT_CONFIG, QParams, QuantConfig, _layer_filter, apply_fake_quant, quantize_weights
from jaxaccel.models.conv_impls import portable_conv_impl
from jaxaccel.models.ensemble import Ensemble

INPUT_DTYPE = jnp.uint8


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape):
        raise ValueError(f"input_shape must be positive ints without the batch dim (e.g. (28, 28, 1)), got {input_shape!r}")
    return shape


def export_inference(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int], path: str | os.PathLike,
                     *, dtype=jnp.float32, batch_size: int | None = None) -> jax_export.Exported:
    """Export `fn(images) -> logits` to `path`; returns the Exported.

    The batch dimension is symbolic ("b") unless `batch_size` fixes it (for functions whose
    Python code branches on the batch size). `fn` must close over its weights (they become
    constants of the artifact). Written to a temporary name and renamed into place.
    """
    shape = _check_input_shape(input_shape)
    if batch_size is None:
        (b,) = jax_export.symbolic_shape("b")
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int or None (symbolic), got {batch_size!r}")
    else:
        b = batch_size
    exported = jax_export.export(jax.jit(fn))(jax.ShapeDtypeStruct((b,) + shape, dtype))
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(exported.serialize())
        os.replace(tmp, path)  # never half an artifact under `path`
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return exported


def load_exported(path: str | os.PathLike) -> jax_export.Exported:
    """Deserialize an artifact written by this module (plain `jax.export.deserialize`)."""
    with open(path, "rb") as f:
        return jax_export.deserialize(bytearray(f.read()))


def _host(tree):
    """Host (numpy) copies: constants must not carry device shardings into the artifact."""
    return jax.device_get(tree)


def _portable(model: nn.Module, symbolic_batch: bool = False) -> nn.Module:
    """`model` with a `conv_impl` an exported program can carry: never the process-local
    "cpu_kernel" custom calls (`conv_impls.portable_conv_impl`). With a symbolic batch, a model
    that would run its conv stack in micro-batches (whose count depends on the batch size,
    `conv_impls.microbatch_count`) gets the plain "xla" convs instead: same function, one batch."""
    if isinstance(model, Ensemble):  # each member made portable on its own
        return model.map_members(lambda m: _portable(m, symbolic_batch))
    if not hasattr(model, "conv_impl"):
        return model
    impl = portable_conv_impl(model.conv_impl, getattr(model, "AUTO_CPU_CONV_IMPL", "cpu"))
    if symbolic_batch and "microbatch" in getattr(model, "__dataclass_fields__", {}) and \
            (impl in ("cpu", "winograd") or model.microbatch is not None):
        return model.clone(conv_impl="xla", microbatch=None)
    return model.clone(conv_impl=impl)


def _raw_pixels(fn: Callable[[jax.Array], jax.Array],
                spec: data.DatasetSpec) -> Callable[[jax.Array], jax.Array]:
    """`fn` of normalised images as a function of raw pixels (`data.normalize`, as training)."""
    return lambda x: fn(data.normalize(x, spec))


def export_float(model: nn.Module, variables: Mapping, spec: data.DatasetSpec | str,
                 path: str | os.PathLike, *, batch_size: int | None = None) -> jax_export.Exported:
    """Export the eval-mode float model as a function of raw uint8 images of `spec.image_shape`."""
    spec = data.as_spec(spec)
    variables, model = _host(variables), _portable(model, batch_size is None)
    return export_inference(
        _raw_pixels(lambda x: model.apply(variables, x, train=False), spec),
        spec.image_shape, path, dtype=INPUT_DTYPE, batch_size=batch_size)


def export_fake_quant(model: nn.Module, variables: Mapping, act_qparams: Mapping[str, QParams],
                      spec: data.DatasetSpec | str, path: str | os.PathLike, *,
                      weight_config: QuantConfig | None = WEIGHT_CONFIG, skip: Iterable[str] = (),
                      batch_size: int | None = None) -> jax_export.Exported:
    """Export the fake-quant simulation (`quant.apply_fake_quant`) of raw uint8 images; weights
    are quantized once, here. `model`/`variables` are the ones `act_qparams` were calibrated on
    (the BN-folded model when they come from the pipeline's quantize stage)."""
    spec = data.as_spec(spec)
    skip, model = tuple(skip), _portable(model, batch_size is None)
    variables = dict(_host(variables))
    if weight_config is not None:
        variables["params"], _ = quantize_weights(variables["params"], weight_config, _layer_filter(skip))
    act_qparams = _host(act_qparams)
    return export_inference(
        _raw_pixels(lambda x: apply_fake_quant(model, variables, x, act_qparams, weight_config=None,
                                               skip=skip), spec),
        spec.image_shape, path, dtype=INPUT_DTYPE, batch_size=batch_size)


def export_int8(model: nn.Module, int8_model: Int8Model, spec: data.DatasetSpec | str,
                path: str | os.PathLike, *, batch_size: int | None = None,
                conv_lowering: str = "auto") -> jax_export.Exported:
    """Export real int8 inference (`int8.int8_apply`) of raw uint8 images: int8 kernels stored
    as int8 constants.

    `conv_lowering` as in `int8_apply`, but portable: "auto" resolves on the exporting machine's
    backend to "im2col" (CPU) or "native", never to the process-local "cpu_kernel" custom call;
    pass "native" for an artifact meant for GPU/TPU when exporting on a CPU host.
    """
    spec = data.as_spec(spec)
    int8_model, model = _host(int8_model), _portable(model, batch_size is None)
    lowering = resolve_conv_lowering(conv_lowering, portable=True)  # a bad name fails here, before tracing
    return export_inference(
        _raw_pixels(lambda x: int8_apply(model, int8_model, x, conv_lowering=lowering), spec),
        spec.image_shape, path, dtype=INPUT_DTYPE, batch_size=batch_size)
