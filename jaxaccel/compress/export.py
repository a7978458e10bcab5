"""Serialized StableHLO artifacts of inference functions (`jax.export`), loadable without jaxaccel.

Each exported function maps a batch of NHWC images (symbolic batch dimension by default) to logits;
the weights (float, fake-quantized, or int8 kernels + scales) are baked in as constants, gathered
to the host first so sharded params export like any others. Load anywhere with only jax:

    exp = jax.export.deserialize(bytearray(open(path, "rb").read()))
    logits = exp.call(images)

Serialization needs the `flatbuffers` package.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import export as jax_export

from jaxaccel.compress.int8 import Int8Model, int8_apply, resolve_conv_lowering
from jaxaccel.compress.quant import WEIGHT_CONFIG, QParams, QuantConfig, _layer_filter, apply_fake_quant, quantize_weights
from jaxaccel.models.layers import portable_conv_impl


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
    constants of the artifact).
    """
    shape = _check_input_shape(input_shape)
    if batch_size is None:
        (b,) = jax_export.symbolic_shape("b")
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int or None (symbolic), got {batch_size!r}")
    else:
        b = batch_size
    exported = jax_export.export(jax.jit(fn))(jax.ShapeDtypeStruct((b,) + shape, dtype))
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return exported


def load_exported(path: str | os.PathLike) -> jax_export.Exported:
    """Deserialize an artifact written by this module (plain `jax.export.deserialize`)."""
    with open(path, "rb") as f:
        return jax_export.deserialize(bytearray(f.read()))


def _host(tree):
    """Host (numpy) copies: constants must not carry device shardings into the artifact."""
    return jax.device_get(tree)


def _portable(model: nn.Module) -> nn.Module:
    """`model` with a `conv_impl` an exported program can carry: never the process-local
    "cpu_kernel" custom calls (`layers.portable_conv_impl`)."""
    if not hasattr(model, "conv_impl"):
        return model
    return model.clone(conv_impl=portable_conv_impl(model.conv_impl, getattr(model, "AUTO_CPU_CONV_IMPL", "cpu")))


def export_float(model: nn.Module, variables: Mapping, input_shape: Sequence[int],
                 path: str | os.PathLike, *, batch_size: int | None = None) -> jax_export.Exported:
    """Export the eval-mode float model."""
    variables, model = _host(variables), _portable(model)
    return export_inference(lambda x: model.apply(variables, x, train=False), input_shape, path,
                            batch_size=batch_size)


def export_fake_quant(model: nn.Module, variables: Mapping, act_qparams: Mapping[str, QParams],
                      input_shape: Sequence[int], path: str | os.PathLike, *,
                      weight_config: QuantConfig | None = WEIGHT_CONFIG, skip: Iterable[str] = (),
                      batch_size: int | None = None) -> jax_export.Exported:
    """Export the fake-quant simulation (`quant.apply_fake_quant`); weights are quantized once, here."""
    skip, model = tuple(skip), _portable(model)
    variables = dict(_host(variables))
    if weight_config is not None:
        variables["params"], _ = quantize_weights(variables["params"], weight_config, _layer_filter(skip))
    act_qparams = _host(act_qparams)
    return export_inference(
        lambda x: apply_fake_quant(model, variables, x, act_qparams, weight_config=None, skip=skip),
        input_shape, path, batch_size=batch_size)


def export_int8(model: nn.Module, int8_model: Int8Model, input_shape: Sequence[int],
                path: str | os.PathLike, *, batch_size: int | None = None,
                conv_lowering: str = "auto") -> jax_export.Exported:
    """Export real int8 inference (`int8.int8_apply`): int8 kernels stored as int8 constants.

    `conv_lowering` as in `int8_apply`, but portable: "auto" resolves on the exporting machine's
    backend to "im2col" (CPU) or "native", never to the process-local "cpu_kernel" custom call;
    pass "native" for an artifact meant for GPU/TPU when exporting on a CPU host.
    """
    int8_model, model = _host(int8_model), _portable(model)
    lowering = resolve_conv_lowering(conv_lowering, portable=True)  # a bad name fails here, before tracing
    return export_inference(lambda x: int8_apply(model, int8_model, x, conv_lowering=lowering),
                            input_shape, path, batch_size=batch_size)
