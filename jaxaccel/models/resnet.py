"""ResNet-20 for CIFAR (He et al. 2016, Sec. 4.2): 3 stages x 3 basic blocks, widths 16/32/64.

Shortcut choice: where a block changes shape (stride 2 and/or a new width) the shortcut is
a projection, 1x1 conv (stride 2) + BN ("option B"), rather than the paper's parameter-free
zero-padding ("option A"). Projections are ordinary conv/BN leaves, so pruning, BN folding
and shrinking treat them like every other layer. They add 2,752 parameters: 272,474 in
total with 10 classes (269,722 with option A; the paper's "0.27M"). Identity shortcuts
elsewhere. Convs use flax's default (LeCun normal) init; BN uses PyTorch's momentum/eps.

Owns `ResNet20` and `BasicBlock`. Imports `models.cnn` (`batch_norm`) and `models.conv_impls`;
never compress, data, state, config or anything above.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.models.cnn import batch_norm
from jaxaccel.models.conv_impls import conv

BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    """conv1(3x3, `inner_width`, stride) bn1 ReLU, conv2(3x3, `width`) bn2, + shortcut, ReLU."""

    width: int
    inner_width: int
    strides: int = 1
    use_bn: bool = True
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def _conv_bn(self, x: jax.Array, features: int, kernel: int, strides: int, train: bool, tag: str,
                 bn_name: str) -> jax.Array:
        x = conv(features, kernel, strides=strides, padding="SAME" if kernel > 1 else "VALID",
                 use_bias=not self.use_bn, dtype=self.dtype, conv_impl=self.conv_impl, name=tag)(x)
        if self.use_bn:
            x = batch_norm(train, self.dtype, self.bn_axis_name, bn_name)(x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(self._conv_bn(x, self.inner_width, 3, self.strides, train, "conv1", "bn1"))
        y = self._conv_bn(y, self.width, 3, 1, train, "conv2", "bn2")
        if self.strides != 1 or x.shape[-1] != self.width:
            x = self._conv_bn(x, self.width, 1, self.strides, train, "proj_conv", "proj_bn")
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """conv_init(16)+bn_init+ReLU, stage{1,2,3}_block{1,2,3}, global average pool, fc."""

    num_classes: int
    stage_widths: Sequence[int] = (16, 32, 64)
    inner_widths: Sequence[int] | None = None
    use_bn: bool = True
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def setup_inner(self) -> tuple[int, ...]:
        """The conv1 output width of each of the 9 blocks (defaults to the stage width)."""
        if self.inner_widths is None:
            return tuple(w for w in self.stage_widths for _ in range(BLOCKS_PER_STAGE))
        n = len(self.stage_widths) * BLOCKS_PER_STAGE
        if len(self.inner_widths) != n:
            raise ValueError(f"inner_widths must have {n} entries, got {len(self.inner_widths)}: {self.inner_widths!r}")
        return tuple(int(w) for w in self.inner_widths)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inner = self.setup_inner()
        x = x.astype(self.dtype)
        x = conv(self.stage_widths[0], 3, padding="SAME", use_bias=not self.use_bn, dtype=self.dtype,
                 conv_impl=self.conv_impl, name="conv_init")(x)
        if self.use_bn:
            x = batch_norm(train, self.dtype, self.bn_axis_name, "bn_init")(x)
        x = nn.relu(x)
        k = 0
        for s, width in enumerate(self.stage_widths):
            for b in range(BLOCKS_PER_STAGE):
                x = BasicBlock(
                    width, inner[k], strides=2 if (s > 0 and b == 0) else 1, use_bn=self.use_bn,
                    bn_axis_name=self.bn_axis_name, dtype=self.dtype, conv_impl=self.conv_impl,
                    name=f"stage{s + 1}_block{b + 1}",
                )(x, train)
                k += 1
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
