"""Convolution and pooling building blocks with selectable implementations.

Every model builds its convs with `conv(...)` and its pools with `max_pool(...)`; the
`conv_impl` string picks how the arithmetic is lowered, never which parameters exist:
all implementations produce a flax `nn.Conv` with the same `kernel`/`bias` leaves (same
shapes, same initialisers), so checkpoints are interchangeable between implementations.

Implementations (`CONV_IMPLS`):
  * "xla":    `lax.conv_general_dilated` and `nn.max_pool`, exactly as plain Flax.
  * "im2col": every stride-1 conv as patches @ kernel, with a custom VJP whose filter
              gradient is `patches.T @ dy` (patches saved from the forward) and whose input
              gradient is a forward conv of `dy` with the flipped, transposed kernel;
              max-pool via `max_pool_2d` (no select-and-scatter).
  * "cpu":    the per-layer mix measured fastest on XLA:CPU (see `cpu_conv_plan`):
              im2col for convs with a small patch (first layers, Cin*kh*kw <= 32),
              the native conv elsewhere; max-pool via `max_pool_2d`.
  * "auto":   resolved when the model is traced: "cpu" on the CPU backend, "xla" elsewhere.
Convs the fast paths do not cover (strides, dilations, feature groups) use the native conv.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "im2col", "cpu")

# Convs whose patch length kh*kw*Cin is at most this use im2col under "cpu": building their
# patches is cheap and the native XLA:CPU conv is slow for them (few input channels).
CPU_IM2COL_MAX_PATCH = 32


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
    return "cpu" if jax.default_backend() == "cpu" else "xla"


# ----------------------------------------------------------------------------- convolution

_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding: Any, in_hw: Sequence[int], k_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(k_hw), (1, 1), padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def im2col_patches(x: jax.Array, kernel_hw: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Stride-1 patches of NHWC `x` as a (N*Ho*Wo, kh*kw*C) matrix, rows in HWIO kernel order."""
    kh, kw = kernel_hw
    (plo, phi), (qlo, qhi) = padding
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
    ho, wo = h + plo + phi - kh + 1, w + qlo + qhi - kw + 1
    taps = [xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
    return jnp.stack(taps, axis=3).reshape(n * ho * wo, kh * kw * c)


def _input_grad(dy: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Input gradient of a stride-1 conv: forward conv of `dy` with the flipped, transposed kernel."""
    kh, kw = kernel.shape[:2]
    pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding)]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return lax.conv_general_dilated(dy, flipped, (1, 1), pads, dimension_numbers=_NHWC)


def _make_im2col_conv(padding: tuple[tuple[int, int], ...]) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A stride-1 NHWC/HWIO conv computed as patches @ kernel, with a matmul filter gradient."""

    def forward(x, kernel):
        kh, kw, cin, cout = kernel.shape
        p = im2col_patches(x, (kh, kw), padding)
        n, h, w, _ = x.shape
        ho = h + padding[0][0] + padding[0][1] - kh + 1
        wo = w + padding[1][0] + padding[1][1] - kw + 1
        return (p @ kernel.reshape(kh * kw * cin, cout)).reshape(n, ho, wo, cout), p

    @jax.custom_vjp
    def conv_fn(x, kernel):
        return forward(x, kernel)[0]

    def fwd(x, kernel):
        y, p = forward(x, kernel)
        return y, (p, kernel)

    def bwd(res, dy):
        p, kernel = res
        cout = kernel.shape[-1]
        dk = (p.T @ dy.reshape(-1, cout)).reshape(kernel.shape).astype(kernel.dtype)
        return _input_grad(dy, kernel, padding).astype(dy.dtype), dk

    conv_fn.defvjp(fwd, bwd)
    return conv_fn


def _fast_path_ok(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count) -> bool:
    dn = dimension_numbers
    if dn is not None and not isinstance(dn, lax.ConvDimensionNumbers):
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
    return (lhs.ndim == 4
            and tuple(window_strides) == (1, 1)
            and tuple(lhs_dilation or (1, 1)) == (1, 1)
            and tuple(rhs_dilation or (1, 1)) == (1, 1)
            and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            and feature_group_count == 1 and batch_group_count == 1)


def _make_conv_general_dilated(impl: str) -> Callable:
    """A `lax.conv_general_dilated` stand-in lowering eligible convs per `impl`."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None):
        native = lambda: lax.conv_general_dilated(  # noqa: E731
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type)
        if preferred_element_type is not None or not _fast_path_ok(
                lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                batch_group_count):
            return native()
        kh, kw, cin, _ = rhs.shape
        if impl == "cpu" and kh * kw * cin > CPU_IM2COL_MAX_PATCH:
            return native()
        pads = _explicit_padding(padding, lhs.shape[1:3], (kh, kw))
        return _make_im2col_conv(pads)(lhs, rhs)

    conv_general_dilated.__name__ = f"conv_general_dilated_{impl}"
    return conv_general_dilated


# One function object per implementation, so flax modules stay hashable and comparable.
_CONV_FNS: dict[str, Callable] = {
    "xla": lax.conv_general_dilated,
    "im2col": _make_conv_general_dilated("im2col"),
    "cpu": _make_conv_general_dilated("cpu"),
}


def conv_general_dilated_fn(conv_impl: str) -> Callable:
    """The `lax.conv_general_dilated`-compatible function used for `conv_impl`."""
    return _CONV_FNS[resolve_conv_impl(conv_impl)]


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = True,
    dtype: Any = jnp.float32,
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


# ----------------------------------------------------------------------------- pooling

def _pool_forward(x: jax.Array, window: int) -> jax.Array:
    n, h, w, c = x.shape
    ho, wo = h // window, w // window
    xr = x[:, :ho * window, :wo * window].reshape(n, ho, window, wo, window, c)
    return xr.max(axis=(2, 4))


def _pool_backward(window: int, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    # The whole gradient of each window goes to its first maximum in row-major window order,
    # which is what XLA's select-and-scatter (nn.max_pool's gradient) does on ties.
    x, y = res
    n, h, w, c = x.shape
    ho, wo = y.shape[1:3]
    xr = x[:, :ho * window, :wo * window].reshape(n, ho, window, wo, window, c)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for i in range(window):
        for j in range(window):
            hit = (xr[:, :, i, :, j, :] == y) & ~taken
            parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
            taken = taken | hit
    dx = jnp.stack(parts, axis=3).reshape(n, ho, wo, window, window, c)
    dx = dx.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho * window, wo * window, c)
    if (ho * window, wo * window) != (h, w):
        dx = jnp.pad(dx, ((0, 0), (0, h - ho * window), (0, w - wo * window), (0, 0)))
    return (dx,)


def _make_max_pool_2d(window: int) -> Callable[[jax.Array], jax.Array]:
    @jax.custom_vjp
    def pool(x):
        return _pool_forward(x, window)

    def fwd(x):
        y = _pool_forward(x, window)
        return y, (x, y)

    pool.defvjp(fwd, lambda res, g: _pool_backward(window, res, g))
    return pool


_POOLS: dict[int, Callable] = {}


def max_pool_2d(x: jax.Array, window: int = 2) -> jax.Array:
    """`window`x`window` max pool, stride `window`, VALID, on NHWC `x`, without select-and-scatter.

    Forward: reshape-then-max. Gradient: to the first maximum of each window in row-major order
    (as nn.max_pool's), computed with equality masks, which XLA:CPU runs ~10-20x faster.
    """
    if window not in _POOLS:
        _POOLS[window] = _make_max_pool_2d(window)
    return _POOLS[window](x)


def max_pool(x: jax.Array, window: int = 2, *, conv_impl: str = "auto") -> jax.Array:
    """Non-overlapping `window`x`window` max pool, stride `window`, VALID (floors odd sizes)."""
    if resolve_conv_impl(conv_impl) == "xla":
        return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")
    return max_pool_2d(x, window)
