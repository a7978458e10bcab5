"""Convolution and pooling building blocks with selectable implementations.

Every model builds its convs with `conv(...)` and its pools with `max_pool(...)`; the
`conv_impl` string picks how the arithmetic is lowered, never which parameters exist:
all implementations produce a flax `nn.Conv` with the same `kernel`/`bias` leaves, so
checkpoints are interchangeable between implementations.

Implementations:
  * "xla":  `lax.conv_general_dilated` and `nn.max_pool` as Flax uses them.
  * "auto": resolved when the model is traced: the CPU-fast path on CPU, "xla" elsewhere.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS: tuple[str, ...] = ("auto", "xla")


def check_conv_impl(conv_impl: str) -> str:
    """Return `conv_impl` unchanged, or raise ValueError if it is not a known name."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {conv_impl!r}; valid choices: {', '.join(CONV_IMPLS)}")
    return conv_impl


def resolve_conv_impl(conv_impl: str) -> str:
    """Map "auto" to the concrete implementation for the default backend."""
    check_conv_impl(conv_impl)
    if conv_impl != "auto":
        return conv_impl
    return "xla"


def conv_general_dilated_fn(conv_impl: str) -> Callable:
    """The `lax.conv_general_dilated`-compatible function used for `conv_impl`."""
    impl = resolve_conv_impl(conv_impl)
    return jax.lax.conv_general_dilated


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = True,
    dtype=jnp.float32,
    conv_impl: str = "auto",
    name: str | None = None,
) -> nn.Conv:
    """A flax `nn.Conv` (float32 params, compute in `dtype`) lowered per `conv_impl`."""
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_general_dilated_fn(conv_impl),
        name=name,
    )


def max_pool(x: jax.Array, window: int = 2, *, conv_impl: str = "auto") -> jax.Array:
    """Non-overlapping `window`x`window` max pool, stride `window`, VALID (floors odd sizes)."""
    resolve_conv_impl(conv_impl)
    return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")
