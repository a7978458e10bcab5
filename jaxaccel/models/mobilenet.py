"""`DSCNNBN`: a small MobileNet-v1-style CNN of depthwise-separable blocks with BatchNorm.

conv1 (3x3, full) + bn1 + ReLU, then one block per entry of `features[1:]`:
dw<i> (3x3 depthwise: `feature_group_count` = its input channels, kernel (3, 3, 1, C)) +
bn_dw<i> + ReLU, pw<i> (1x1 pointwise, C -> features[i]) + bn_pw<i> + ReLU; a 2x2 max-pool
after the stem (0) and the blocks (1, 2, ...) listed in `pool_after`; global average pool,
`fc`. Defaults on 28x28: stem at 28x28, block 1 at 14x14, block 2 at 7x7.

It exists for the quantization reproductions: folding BN into a depthwise conv scales each
of its 9-tap channels by its own gamma / sqrt(var), which spreads the per-channel weight
ranges far apart (Krishnamoorthi 2018: MobileNet's per-tensor PTQ collapses). With
`use_bn=False` (the folded form) the convs carry biases and there is no BN.

Imports `models.cnn` (`batch_norm`) and `models.conv_impls`; never compress, data, state,
config or anything above.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.models.cnn import batch_norm
from jaxaccel.models.conv_impls import conv, max_pool


class DSCNNBN(nn.Module):
    """Stem conv(features[0]), depthwise-separable blocks to features[1:], GAP, fc.

    The depthwise convs' widths are their inputs' widths (not fields): changing `features`
    (width multiplier, shrinking) changes them with it.
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    pool_after: Sequence[int] = (0, 1)
    use_bn: bool = True
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def _norm_act(self, x: jax.Array, train: bool, name: str) -> jax.Array:
        if self.use_bn:
            x = batch_norm(train, self.dtype, self.bn_axis_name, name)(x)
        return nn.relu(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.features) < 1:
            raise ValueError(f"features needs at least the stem width, got {self.features!r}")
        blocks = len(self.features) - 1
        bad = [i for i in self.pool_after if not 0 <= i <= blocks]
        if bad:
            raise ValueError(f"pool_after={tuple(self.pool_after)!r}: {bad} not in 0 (stem) .. {blocks} "
                             f"(the number of blocks)")
        common = dict(padding="SAME", use_bias=not self.use_bn, dtype=self.dtype, conv_impl=self.conv_impl)
        x = x.astype(self.dtype)
        x = conv(self.features[0], 3, name="conv1", **common)(x)
        x = self._norm_act(x, train, "bn1")
        if 0 in self.pool_after:
            x = max_pool(x, 2, conv_impl=self.conv_impl)
        for i, f in enumerate(self.features[1:], start=1):
            c = x.shape[-1]
            x = conv(c, 3, feature_group_count=c, name=f"dw{i}", **common)(x)
            x = self._norm_act(x, train, f"bn_dw{i}")
            x = conv(f, 1, name=f"pw{i}", **common)(x)
            x = self._norm_act(x, train, f"bn_pw{i}")
            if i in self.pool_after:
                x = max_pool(x, 2, conv_impl=self.conv_impl)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
