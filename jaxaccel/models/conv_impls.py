"""The conv and pooling implementations that `conv_impl` selects.

Every model builds its convs with `conv(...)`, its conv->activation->pool stages with
`conv_act_pool(...)` and its other pools with `max_pool(...)`; the `conv_impl` string picks
how the arithmetic is lowered, never which parameters exist: all implementations declare
the same `kernel` (HWIO) / `bias` leaves with nn.Conv's shapes, initialisers and RNG
streams, so checkpoints are interchangeable between implementations.

Implementations (`CONV_IMPLS`):
  * "xla":    plain flax: `nn.Conv` (`lax.conv_general_dilated`) and `nn.max_pool`.
  * "im2col": every stride-1 conv as patches @ kernel with a custom VJP: filter gradient
              `patches.T @ dy` (patches rebuilt from the saved input), input gradient a forward
              conv of `dy` with the flipped, transposed kernel. Max-pool via `max_pool_2d`
              (no select-and-scatter), taken before bias and activation.
  * "cpu":    the mix measured fastest on XLA:CPU (BENCHMARKS.md): im2col only where the patch is short (kh*kw*Cin <=
              `CPU_IM2COL_MAX_PATCH`, i.e. first layers), the native conv elsewhere but with
              its filter gradient taken from a materialised input (`_native_materialized_input`);
              `max_pool_2d` before bias and activation; and, in models without BatchNorm, the
              conv stack run on micro-batches of `CPU_MICROBATCH` examples (`microbatched`).
  * "winograd": "cpu", except that stride-1 3x3 convs past the im2col threshold take their
              filter gradient by Winograd F(2x2, 3x3) (`winograd_conv`): 16 batched matmuls
              between transformed 4x4 input tiles and transformed output gradients (2.25x
              fewer multiplies); forward and input gradient stay the native conv. `CNN3`'s
              "auto" picks it on CPU (`CNN3.AUTO_CPU_CONV_IMPL`): its train step measured
              faster than "cpu" (XLA:CPU's native filter-gradient conv was its slowest op); in
              ResNet-20 (BatchNorm between convs) slower, so the other models' "auto" stays
              "cpu".
  * "cpu_kernel": "winograd", but its 3x3 convs run all three passes (forward, input gradient,
              filter gradient) as Winograd F(4x4, 3x3) in jaxaccel's own AVX2+FMA / AVX-512 kernel
              (`kernels.winograd`, an XLA FFI custom call compiled on first use), which fuses
              the tile transforms into its matmuls and, in `Conv.max_pooled`, the 2x2 max-pool
              into the forward (only the pooled values and each window's int8 first-maximum
              position are written; a pooled first layer's 1-7 input channels are zero-padded
              to 8 and output channels to a multiple of 16 for it) and the pool's gradient routing into
              both conv gradients. Where the kernel does not cover a conv (float32 only, "SAME",
              channels multiples of 8 / 16, even sizes for the fused pool) it is "winograd". `CNN3`'s "auto" picks it on CPU when the kernel can run (its train
              step measured faster than "winograd": BENCHMARKS.md).
              It trains on whole batches (micro-batches only at inference, see
              `microbatch_count`). Exports (`portable_conv_impl`) use "winograd" instead.
  * "auto":   resolved when the model is traced: on the CPU backend "cpu" (or the model's
              `AUTO_CPU_CONV_IMPL`), "xla" elsewhere.
Stride-1 depthwise convs (`feature_group_count` = input channels = output channels, kernel
(kh, kw, 1, C)) run under "im2col" and "cpu" as kh*kw shifted multiply-adds
(`depthwise_conv_shifted`; XLA:CPU's grouped conv, forward plus both gradients, is 3-7x
slower on dscnn_bn's shapes). Convs the fast paths do not cover (strides, dilations, other
feature groups) use the native conv.

Numerics: pooling commutes with a non-decreasing activation (ReLU, identity) and with
adding a per-channel bias, in value exactly and in gradient with first-maximum routing,
so pool(relu(conv + b)) is computed as relu(pool(conv) + b) on 4x fewer elements (the
only difference: when two window entries are within one rounding step of each other,
`+ b` can tie them and nn.max_pool would route to the earlier one). Micro-batches change
nothing per example (only the summation order of filter gradients). im2col forwards
round differently from the native conv (~1e-7 relative), which can flip the maximum of a
pool window whose entries are that close; the "cpu" path uses im2col only in first layers.
The Winograd filter gradient rounds differently too (~2e-7 relative in float32, tested), and so
do the kernel's Winograd forward and input gradient (~1e-6 relative, tested against XLA's conv).

Of jaxaccel it imports only `kernels.winograd` (the kernels and the Winograd transforms); the
models import it, it imports no model, and never compress, data, state or config.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init
from jax import lax

from jaxaccel.kernels import winograd

CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "im2col", "cpu", "winograd", "cpu_kernel")

# Under "cpu", convs whose patch length kh*kw*Cin is at most this use im2col: building their
# patches is cheap and XLA:CPU's native conv is slow for few input channels.
CPU_IM2COL_MAX_PATCH = 32
# Under "cpu", models without BatchNorm run their conv stack on micro-batches of this many
# examples: each micro-batch's activations stay in cache, and XLA:CPU runs independent
# micro-batches concurrently on its thread pool.
CPU_MICROBATCH = 32
# Under "cpu_kernel", inference runs on micro-batches of this many examples (cnn3 at batch 256,
# F(4x4, 3x3) kernels: about 10% faster than 32 or the whole batch; training runs whole batches).
KERNEL_MICROBATCH = 128

_NHWC = ("NHWC", "HWIO", "NHWC")


def check_conv_impl(conv_impl: str) -> str:
    """Return `conv_impl` unchanged, or raise ValueError if it is not a known name."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {conv_impl!r}; valid choices: {', '.join(CONV_IMPLS)}")
    return conv_impl


def resolve_conv_impl(conv_impl: str, cpu_choice: str = "cpu") -> str:
    """Map "auto" to the concrete implementation for the default backend: `cpu_choice` on CPU
    (a model's measured fastest; "cpu" unless the model says otherwise), "xla" elsewhere.

    A `cpu_choice` of "cpu_kernel" becomes "winograd" where the kernel cannot run; an explicit
    "cpu_kernel" there raises ValueError saying why.
    """
    check_conv_impl(conv_impl)
    check_conv_impl(cpu_choice)
    if conv_impl == "cpu_kernel" and not winograd.available():
        raise ValueError(f"conv_impl 'cpu_kernel' cannot run here ({winograd.unavailable_reason()}); "
                         f"valid choices here: {', '.join(i for i in CONV_IMPLS if i != 'cpu_kernel')}")
    if conv_impl != "auto":
        return conv_impl
    if jax.default_backend() != "cpu":
        return "xla"
    return "winograd" if cpu_choice == "cpu_kernel" and not winograd.available() else cpu_choice


def portable_conv_impl(conv_impl: str, cpu_choice: str = "cpu") -> str:
    """`resolve_conv_impl` for a program that leaves this process (`jax.export`): "winograd"
    where that gives "cpu_kernel", whose custom calls exist only where the kernel is registered."""
    check_conv_impl(conv_impl)
    if conv_impl == "cpu_kernel":
        return "winograd"
    return resolve_conv_impl(conv_impl, "winograd" if cpu_choice == "cpu_kernel" else cpu_choice)


# ----------------------------------------------------------------------------- convolution

def _explicit_padding(padding: Any, in_hw: Sequence[int], k_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(k_hw), (1, 1), padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def im2col_patches(x: jax.Array, kernel_hw: Sequence[int], padding: Sequence[tuple[int, int]],
                   strides: Sequence[int] = (1, 1)) -> jax.Array:
    """Patches of NHWC `x` (zero-padded by `padding`) as a (N*Ho*Wo, kh*kw*C) matrix, columns
    in HWIO kernel order, one row per output position of a conv with `strides`.

    Built in two passes (kw shifts along W, then kh shifts along H): fewer, longer copies
    than stacking all kh*kw shifted slices at once, which XLA:CPU runs faster.
    """
    kh, kw = kernel_hw
    sh, sw = strides
    (plo, phi), (qlo, qhi) = padding
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
    ho, wo = (h + plo + phi - kh) // sh + 1, (w + qlo + qhi - kw) // sw + 1
    rows = jnp.concatenate([xp[:, :, j:j + (wo - 1) * sw + 1:sw, :] for j in range(kw)], axis=-1)
    p = jnp.concatenate([rows[:, i:i + (ho - 1) * sh + 1:sh] for i in range(kh)], axis=-1)
    return p.reshape(n * ho * wo, kh * kw * c)


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
        # Keep x, not the kh*kw times larger patches: rebuilding them in the backward costs
        # the same time (measured) and saves memory.
        return forward(x, kernel)[0], (x, kernel)

    def bwd(res, dy):
        x, kernel = res
        p = im2col_patches(x, kernel.shape[:2], padding)
        cout = kernel.shape[-1]
        dk = (p.T @ dy.reshape(-1, cout)).reshape(kernel.shape).astype(kernel.dtype)
        return _input_grad(dy, kernel, padding).astype(dy.dtype), dk

    conv_fn.defvjp(fwd, bwd)
    return conv_fn


# ----------------------------------------------------------------------------- Winograd F(2x2, 3x3)
# Lavin & Gray (2016), with the transforms `BT`, `G`, `AT` of `kernels.winograd`: a 2x2 output
# tile of a 3x3 conv from a 4x4 input tile as Y = A^T [(G k G^T) * (B^T d B)] A. Over all tiles and
# channels the elementwise product becomes 16 independent matmuls (one per tile position) of
# (tiles, Cin) @ (Cin, Cout). Y is linear in k, so the filter gradient is its transpose:
# G^T [sum over tiles (B^T d B)^T (A dY A^T)] G, 16 matmuls of (Cin, tiles) @ (tiles, Cout):
# 2.25x fewer multiplies than the direct one. The 2-D transforms as matrices on flattened tiles
# (row-major): kron(M, M).
_WINO_BB = np.kron(winograd.BT, winograd.BT)  # (16, 16) input tile -> transformed tile
_WINO_GG = np.kron(winograd.G, winograd.G)    # (16, 9)  3x3 kernel -> transformed kernel
_WINO_AA = np.kron(winograd.AT, winograd.AT)  # (4, 16)  transformed product -> 2x2 output tile


def _along0(m: np.ndarray, t: jax.Array) -> jax.Array:
    """The constant matrix `m` (r, s) applied along axis 0 of `t` (s, ...): one small matmul
    per transform (XLA:CPU runs it as one pass; elementwise sums of 16 slices became 16 passes)."""
    return lax.dot_general(jnp.asarray(m, t.dtype), t, (((1,), (0,)), ((), ())))


def _winograd_geometry(x_shape: Sequence[int], padding: Sequence[tuple[int, int]]) -> tuple[int, int, int, int]:
    _, h, w, _ = x_shape
    (plo, phi), (qlo, qhi) = padding
    ho, wo = h + plo + phi - 2, w + qlo + qhi - 2
    return ho, wo, -(-ho // 2), -(-wo // 2)


def _winograd_input_tiles(x: jax.Array, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """B^T d B for every 4x4 tile (stride 2) of zero-padded NHWC `x`: (16, N*th*tw, C)."""
    n, _, _, c = x.shape
    (plo, phi), (qlo, qhi) = padding
    ho, wo, th, tw = _winograd_geometry(x.shape, padding)
    xp = jnp.pad(x, ((0, 0), (plo, phi + 2 * th - ho), (qlo, qhi + 2 * tw - wo), (0, 0)))
    # Overlapping 4x4 tiles at stride 2 from row/column pairs: tile t = pairs t and t + 1.
    xr = xp.reshape(n, th + 1, 2, tw + 1, 2, c)
    rows = jnp.concatenate([xr[:, :th], xr[:, 1:]], axis=2)                   # (n, th, 4, tw+1, 2, c)
    tiles = jnp.concatenate([rows[:, :, :, :tw], rows[:, :, :, 1:]], axis=4)  # (n, th, 4, tw, 4, c)
    tiles = tiles.transpose(2, 4, 0, 1, 3, 5).reshape(16, -1)
    return _along0(_WINO_BB, tiles).reshape(16, n * th * tw, c)


def _winograd_filter_grad(x: jax.Array, dy: jax.Array, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """d loss / d kernel: the forward's transposes, G^T [sum over tiles (B^T d B)^T (A dY A^T)] G."""
    n, ho, wo, cout = dy.shape
    _, _, th, tw = _winograd_geometry(x.shape, padding)
    dyp = jnp.pad(dy, ((0, 0), (0, 2 * th - ho), (0, 2 * tw - wo), (0, 0))).reshape(n, th, 2, tw, 2, cout)
    dm = _along0(_WINO_AA.T, dyp.transpose(2, 4, 0, 1, 3, 5).reshape(4, -1)).reshape(16, n * th * tw, cout)
    du = lax.dot_general(_winograd_input_tiles(x, padding), dm, (((1,), (1,)), ((0,), (0,))))  # (16, cin, cout)
    return _along0(_WINO_GG.T, du.reshape(16, -1)).reshape(3, 3, *du.shape[1:])


def winograd_conv(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]],
                  use_kernel: bool = False) -> jax.Array:
    """Stride-1 NHWC conv of `x` with a 3x3 HWIO `kernel` whose filter gradient is Winograd F(2x2, 3x3)
    (in XLA ops; F(4x4, 3x3) in the kernel with `use_kernel`).

    The forward is XLA's conv (it stays fusable with its neighbours: a Winograd forward measured
    as fast in the cnn3 train step and 2x slower for inference); the input gradient is XLA's conv
    of `dy` with the flipped kernel (Winograd there measured slower on XLA:CPU: the tile
    transposes of the wide `dy` cost more than the multiplies saved). Odd output sizes are
    padded to whole tiles.

    `use_kernel` (conv_impl "cpu_kernel"): all three (forward, input gradient, filter gradient)
    run as Winograd F(4x4, 3x3) in jaxaccel's CPU kernel (`kernels.winograd`) where it supports
    the shapes (float32, "SAME", channels multiples of 8 and 16), with every transform fused
    into the kernel's matmuls; elsewhere as above.
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv needs a 3x3 kernel, got {kernel.shape[:2]}")
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _winograd_fn(padding, use_kernel)(x, kernel)


_WINOGRAD_FNS: dict[tuple[tuple[tuple[int, int], ...], bool], Callable] = {}


def _with_backward(forward: Callable, backward: Callable) -> Callable:
    """`forward(x, kernel)` whose VJP is `backward(x, kernel, dy) -> (dx, dkernel)` (saves x, kernel)."""

    @jax.custom_vjp
    def f(x, kernel):
        return forward(x, kernel)

    def fwd(x, kernel):
        return forward(x, kernel), (x, kernel)

    f.defvjp(fwd, lambda res, dy: backward(*res, dy))
    return f


def _winograd_fn(padding: tuple[tuple[int, int], ...], use_kernel: bool) -> Callable:
    if (padding, use_kernel) in _WINOGRAD_FNS:
        return _WINOGRAD_FNS[padding, use_kernel]

    def kernel_ok(x, kernel):
        return (use_kernel and winograd.supports(x.shape, kernel.shape, padding, x.dtype)
                and kernel.dtype == jnp.float32)

    def forward(x, kernel):
        if kernel_ok(x, kernel):
            return winograd.conv(x, kernel)
        return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)

    def backward(x, kernel, dy):
        dx = _winograd_input_grad(dy, kernel, padding, use_kernel).astype(x.dtype)
        if kernel_ok(x, kernel) and dy.dtype == jnp.float32:
            dk = winograd.filter_grad(x, dy)
        else:
            dk = _winograd_filter_grad(x, dy, padding).astype(kernel.dtype)
        return dx, dk

    _WINOGRAD_FNS[padding, use_kernel] = _with_backward(forward, backward)
    return _WINOGRAD_FNS[padding, use_kernel]


def _winograd_input_grad(dy: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...],
                         use_kernel: bool) -> jax.Array:
    """Input gradient of a stride-1 3x3 conv: in the Winograd kernel (a "SAME" conv of `dy` with
    the flipped kernel) if `use_kernel` and it takes the shapes, else XLA's (`_input_grad`)."""
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    if use_kernel and winograd.supports(dy.shape, flipped.shape, padding, dy.dtype) \
            and flipped.dtype == jnp.float32:
        return winograd.conv(dy, flipped)
    return _input_grad(dy, kernel, padding)


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


def _depthwise_ok(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count) -> bool:
    """A stride-1 depthwise conv (channel multiplier 1) in NHWC/HWIO."""
    return (_fast_path_ok(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, 1,
                          batch_group_count)
            and feature_group_count > 1 and rhs.shape[2] == 1
            and feature_group_count == lhs.shape[-1] == rhs.shape[-1])


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Stride-1 depthwise conv of NHWC `x` with a (kh, kw, 1, C) kernel as kh*kw shifted
    multiply-adds (elementwise: its gradients, by autodiff, are elementwise ops and sums too)."""
    kh, kw = kernel.shape[:2]
    (plo, phi), (qlo, qhi) = padding
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
    ho, wo = h + plo + phi - kh + 1, w + qlo + qhi - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i:i + ho, j:j + wo, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _materialized(x: jax.Array, token: jax.Array) -> jax.Array:
    """`x`, but as the output of a conditional, which XLA cannot fuse its producers through.

    `lax.optimization_barrier` does not survive XLA:CPU's pipeline; a conditional on a
    data-dependent scalar (`token`, a replicated kernel entry: no communication when the
    batch is sharded) does. Both branches return `x` exactly (v * 1 == v for every float).
    """
    return lax.cond(token >= 0, lambda v: v, lambda v: v * jnp.ones((), v.dtype), x)


def _native_materialized_input(conv_fn: Callable, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_fn(x, kernel)` with XLA's own gradients, computed from a materialised `x`.

    Otherwise XLA:CPU fuses the elementwise producers of `x` (bias, BatchNorm, ReLU,
    residual adds — recursively through earlier blocks) into the transpose that feeds its
    native filter-gradient conv and recomputes them there in a cache-hostile transposed
    order: about a third of ResNet-20's train step on this machine.
    """

    def backward(x, kernel, dy):
        return jax.vjp(conv_fn, _materialized(x, kernel.reshape(-1)[0]), kernel)[1](dy)

    f = _with_backward(conv_fn, backward)
    return f(x, kernel)


def _make_conv_general_dilated(impl: str) -> Callable:
    """A `lax.conv_general_dilated` stand-in lowering eligible convs per `impl`."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None):
        def native_fn(x, k):
            return lax.conv_general_dilated(
                x, k, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)

        if preferred_element_type is not None:
            return native_fn(lhs, rhs)
        if _depthwise_ok(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count, batch_group_count):
            return depthwise_conv_shifted(lhs, rhs, _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2]))
        if not _fast_path_ok(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                             feature_group_count, batch_group_count):
            return _native_materialized_input(native_fn, lhs, rhs)
        kh, kw, cin, _ = rhs.shape
        pads = _explicit_padding(padding, lhs.shape[1:3], (kh, kw))
        if impl in ("cpu", "winograd", "cpu_kernel") and kh * kw * cin > CPU_IM2COL_MAX_PATCH:
            if impl in ("winograd", "cpu_kernel") and (kh, kw) == (3, 3):
                return winograd_conv(lhs, rhs, pads, use_kernel=impl == "cpu_kernel")
            return _native_materialized_input(native_fn, lhs, rhs)
        return _make_im2col_conv(pads)(lhs, rhs)

    conv_general_dilated.__name__ = f"conv_general_dilated_{impl}"
    return conv_general_dilated


# One function object per implementation, so modules stay hashable and comparable.
_CONV_FNS: dict[str, Callable] = {
    "xla": lax.conv_general_dilated,
    "im2col": _make_conv_general_dilated("im2col"),
    "cpu": _make_conv_general_dilated("cpu"),
    "winograd": _make_conv_general_dilated("winograd"),
    "cpu_kernel": _make_conv_general_dilated("cpu_kernel"),
}


def conv_general_dilated_fn(conv_impl: str) -> Callable:
    """The `lax.conv_general_dilated`-compatible function used for `conv_impl`."""
    return _CONV_FNS[resolve_conv_impl(conv_impl)]


class Conv(nn.Module):
    """2-D NHWC conv with nn.Conv's parameters (`kernel` HWIO, `bias`), lowered per `conv_impl`.

    Unlike nn.Conv it can return its output before the bias (`add_bias=False` returns
    `(y, bias)`), so a following max-pool can run before the bias and activation.
    `feature_group_count` splits the input channels into that many groups, as in nn.Conv
    (kernel (kh, kw, cin // groups, features); `groups == cin == features` is a depthwise
    conv, see `depthwise_conv_shifted`; other grouped convs run as the native conv).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    feature_group_count: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, add_bias: bool = True, pool_window: int | None = None):
        kh, kw = self.kernel_size
        groups = self.feature_group_count
        cin = x.shape[-1]
        if groups < 1 or cin % groups or self.features % groups:
            raise ValueError(f"feature_group_count={groups!r} must divide the input channels ({cin}) "
                             f"and the output features ({self.features})")
        kernel = self.param("kernel", default_kernel_init, (kh, kw, cin // groups, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        strides = (self.strides, self.strides) if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
        if pool_window is not None:  # see max_pooled
            return _conv_max_pool(self.conv_impl, x, kernel, strides, padding, groups, pool_window), bias
        y = conv_general_dilated_fn(self.conv_impl)(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                                    feature_group_count=groups)
        if not add_bias:
            return y, bias
        return y if bias is None else y + bias

    def max_pooled(self, x: jax.Array, window: int):
        """`(max_pool_2d(y, window), bias)` for y = this conv's output before the bias.

        The same values as pooling `self(x, add_bias=False)`'s output; a method of its own so
        that transforms which intercept module methods (int8 inference) can run conv + pool as
        one kernel. It calls `self(x, add_bias=False, pool_window=window)`, so interceptors of
        `__call__` (calibration, fake-quant) see the conv's input as usual; under "cpu_kernel"
        the Winograd kernel pools inside the conv (`kernels.winograd.conv_max_pool`).
        """
        return self(x, add_bias=False, pool_window=window)


def _conv_max_pool(conv_impl: str, x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Any,
                   groups: int, window: int) -> jax.Array:
    """max_pool_2d(conv(x, kernel), window), fused into one Winograd kernel call where it can be.

    Channels the kernel cannot take are zero-padded for it: input channels up to a multiple of 8
    (a first layer's 1-7, e.g. RGB) and output channels of at least 8 up to a multiple of 16
    (e.g. 24 in a channel-pruned, shrunk model; the extra outputs are dropped). The kernel's
    Winograd tiles and fused pool then beat im2col and XLA's convs even with the extra zeros
    (measured on cnn3 and its shrunk versions); the zeros add nothing to the conv, and the
    pads' VJPs drop their gradients."""
    # `supports` covers 3x3, "SAME", float32 (x and kernel share a dtype here) and channels % 8, % 16.
    pad_c = -x.shape[-1] % 8
    pad_k = -kernel.shape[-1] % 16 if kernel.ndim == 4 and kernel.shape[-1] >= 8 else 0
    if (window == 2 and resolve_conv_impl(conv_impl) == "cpu_kernel" and groups == 1 and strides == (1, 1)
            and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0 and kernel.ndim == 4
            and winograd.supports((*x.shape[:3], x.shape[3] + pad_c), (*kernel.shape[:2], kernel.shape[2] + pad_c,
                                                                        kernel.shape[3] + pad_k),
                                  _explicit_padding(padding, x.shape[1:3], kernel.shape[:2]), x.dtype)):
        features = kernel.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad_c))) if pad_c else x
        kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, pad_c), (0, pad_k))) if pad_c or pad_k else kernel
        pooled = _winograd_conv_max_pool(x, kernel)
        return pooled[..., :features] if pad_k else pooled
    y = conv_general_dilated_fn(conv_impl)(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                           feature_group_count=groups)
    return max_pool_2d(y, window)


@jax.custom_vjp
def _winograd_conv_max_pool(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """2x2 max-pool of the "SAME" 3x3 conv, in the Winograd kernel; the gradient routes each window's
    gradient to its first maximum (as `max_pool_2d`) and runs both conv gradients in the kernel."""
    return winograd.conv_max_pool(x, kernel)[0]


def _winograd_conv_max_pool_fwd(x, kernel):
    pooled, first = winograd.conv_max_pool(x, kernel)
    return pooled, (x, kernel, first)


def _winograd_conv_max_pool_bwd(res, g):
    # Both gradients read the pooled gradient `g` unpooled (routed to each window's first maximum)
    # inside the kernel; the conv output's gradient is written out only for an input gradient the
    # kernel cannot take (fewer than 8 input channels: a first layer's, usually not needed).
    # x's channels (the input gradient's outputs) are zero-padded as in `_conv_max_pool`.
    x, kernel, first = res
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    channels = flipped.shape[-1]
    pad = -channels % 16 if channels >= 8 else 0
    if winograd.supports((*x.shape[:3], g.shape[-1]), (*flipped.shape[:3], channels + pad), winograd.PADDING,
                          g.dtype):
        flipped = jnp.pad(flipped, ((0, 0), (0, 0), (0, 0), (0, pad))) if pad else flipped
        dx = winograd.unpool_conv(g, first, flipped)[..., :channels]
    else:
        dx = _input_grad(_route_to_first(first, g, 2, x.shape[:3] + kernel.shape[-1:]), kernel, winograd.PADDING)
    return dx, winograd.unpool_filter_grad(x, g, first)


_winograd_conv_max_pool.defvjp(_winograd_conv_max_pool_fwd, _winograd_conv_max_pool_bwd)


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
    feature_group_count: int = 1,
    name: str | None = None,
) -> nn.Module:
    """A conv layer (float32 params, compute in `dtype`): nn.Conv for "xla", else `Conv`.

    `feature_group_count=C` with `features=C` on C input channels is a depthwise conv
    (kernel (kh, kw, 1, C)); the parameters are the same for every `conv_impl`.
    """
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    if resolve_conv_impl(conv_impl) == "xla":
        return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias,
                       feature_group_count=feature_group_count, dtype=dtype, param_dtype=jnp.float32, name=name)
    return Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
                conv_impl=conv_impl, feature_group_count=feature_group_count, name=name)


# ----------------------------------------------------------------------------- pooling

def _windows(x: jax.Array, window: int) -> jax.Array:
    n, h, w, c = x.shape
    ho, wo = h // window, w // window
    return x[:, :ho * window, :wo * window].reshape(n, ho, window, wo, window, c)


def _pool_backward(window: int, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    # The whole gradient of each window goes to its first maximum in row-major window order,
    # which is what XLA's select-and-scatter (nn.max_pool's gradient) does on ties: find that
    # position (int8, one pass over x), then write the input-sized gradient in one pass.
    x, y = res
    xr = _windows(x, window)
    first = jnp.full(y.shape, window * window - 1, jnp.int8)
    for k in range(window * window - 2, -1, -1):
        first = jnp.where(xr[:, :, k // window, :, k % window, :] == y, jnp.int8(k), first)
    return (_route_to_first(first, g, window, x.shape),)


def _route_to_first(first: jax.Array, g: jax.Array, window: int, x_shape: Sequence[int]) -> jax.Array:
    """The pool input's gradient (`x_shape`): each window's gradient `g` at the row-major position
    `first` (int8) of its first maximum, zeros elsewhere; written in one pass."""
    n, h, w, c = x_shape
    ho, wo = g.shape[1:3]
    pos = (jnp.arange(window, dtype=jnp.int8)[:, None] * window + jnp.arange(window, dtype=jnp.int8)[None, :])
    hit = first[:, :, None, :, None, :] == pos[None, None, :, None, :, None]
    dx = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype)).reshape(n, ho * window, wo * window, c)
    if (ho * window, wo * window) != (h, w):
        dx = jnp.pad(dx, ((0, 0), (0, h - ho * window), (0, w - wo * window), (0, 0)))
    return dx


def _make_max_pool_2d(window: int) -> Callable[[jax.Array], jax.Array]:
    if window * window > 127:
        raise ValueError(f"max_pool_2d supports windows up to 11x11, got {window!r}")

    @jax.custom_vjp
    def pool(x):
        return _windows(x, window).max(axis=(2, 4))

    def fwd(x):
        y = _windows(x, window).max(axis=(2, 4))
        return y, (x, y)

    pool.defvjp(fwd, lambda res, g: _pool_backward(window, res, g))
    return pool


_POOLS: dict[int, Callable] = {}


def max_pool_2d(x: jax.Array, window: int = 2) -> jax.Array:
    """`window`x`window` max pool, stride `window`, VALID, on NHWC `x`, without select-and-scatter.

    Forward: reshape-then-max. Gradient: all of each window's gradient to the position of its
    first maximum in row-major order (as nn.max_pool's select-and-scatter does, ties
    included), found with equality tests; XLA:CPU runs this 10-100x faster.
    """
    if window not in _POOLS:
        _POOLS[window] = _make_max_pool_2d(window)
    return _POOLS[window](x)


def max_pool(x: jax.Array, window: int = 2, *, conv_impl: str = "auto") -> jax.Array:
    """Non-overlapping `window`x`window` max pool, stride `window`, VALID (floors odd sizes)."""
    if resolve_conv_impl(conv_impl) == "xla":
        return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")
    return max_pool_2d(x, window)


def conv_act_pool(layer: nn.Module, x: jax.Array, act: Callable[[jax.Array], jax.Array] | None, window: int,
                  conv_impl: str = "auto") -> jax.Array:
    """max_pool(act(layer(x))) for a conv `layer` from `conv()`; `act` must be non-decreasing (ReLU).

    Fast implementations pool the conv output before the bias and the activation (same
    values and gradients, 1/window^2 of the elementwise work).
    """
    act = act or (lambda v: v)
    if resolve_conv_impl(conv_impl) == "xla":
        return max_pool(act(layer(x)), window, conv_impl="xla")
    y, bias = layer.max_pooled(x, window)
    return act(y if bias is None else y + bias)


# ----------------------------------------------------------------------------- micro-batches

def microbatch_count(batch: int, conv_impl: str, microbatch: int | None = None, train: bool = False) -> int:
    """How many micro-batches to split `batch` into: the largest divisor of `batch` not above
    batch / size, with size `microbatch` if given, else `CPU_MICROBATCH` under "cpu" and
    "winograd", `KERNEL_MICROBATCH` under "cpu_kernel" at inference; 1 otherwise.

    Measured on cnn3: a "cpu_kernel" train step is fastest whole (the kernels block for the
    cache themselves and lose efficiency on small calls), its inference in micro-batches of
    `KERNEL_MICROBATCH` (with no activations kept for a backward pass, each micro-batch's stay
    in cache).
    """
    if microbatch is None:
        impl = resolve_conv_impl(conv_impl)
        if impl not in ("cpu", "winograd", "cpu_kernel") or (impl == "cpu_kernel" and train):
            return 1
        microbatch = KERNEL_MICROBATCH if impl == "cpu_kernel" else CPU_MICROBATCH
    if microbatch < 1:
        raise ValueError(f"microbatch must be >= 1, got {microbatch!r}")
    target = max(1, batch // microbatch)
    return max(g for g in range(1, target + 1) if batch % g == 0)


def microbatched(fn: Callable[[jax.Array], jax.Array], x: jax.Array, groups: int) -> jax.Array:
    """fn applied to `groups` interleaved micro-batches of `x` (rows g, g+groups, ...), re-assembled.

    Interleaving keeps each micro-batch spread evenly over a batch-sharded mesh axis, so
    splitting needs no communication; `fn` must act on each example independently.
    """
    if groups <= 1:
        return fn(x)
    n = x.shape[0]
    xs = x.reshape((n // groups, groups) + x.shape[1:])
    outs = [fn(xs[:, g]) for g in range(groups)]
    return jnp.stack(outs, axis=1).reshape((n,) + outs[0].shape[1:])
