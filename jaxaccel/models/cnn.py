"""Small plain CNNs: `CNN3` (three conv/pool stages, no BN) and `CNNBN` (two stages with BN).

Also `batch_norm`, the BatchNorm every BN model uses (`BN_MOMENTUM`, `BN_EPSILON`). Imports
only `models.conv_impls`; never compress, data, state, config or anything above.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.models.conv_impls import (conv, conv_act_pool, max_pool, microbatch_count, microbatched,
                                        resolve_conv_impl)

# BatchNorm settings shared by every BN model: PyTorch's momentum 0.1 (flax's 0.9) and eps.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Any, axis_name: str | None, name: str) -> nn.BatchNorm:
    """BatchNorm with float32 params, running stats used at eval, optional cross-device sync."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        name=name,
    )


class CNN3(nn.Module):
    """conv1-conv2-conv3 (3x3 SAME + ReLU + 2x2 max-pool each), fc1 + ReLU, fc2.

    `microbatch`: examples per micro-batch for the conv stack (None: the conv_impl's choice,
    see `conv_impls.microbatch_count`); results do not depend on it beyond float rounding.
    On CPU, conv_impl "auto" is "cpu_kernel" (`AUTO_CPU_CONV_IMPL`, measured fastest for cnn3;
    "winograd" where the kernel cannot run).
    """

    AUTO_CPU_CONV_IMPL = "cpu_kernel"  # what "auto" means on CPU (a class constant, not a field)

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    hidden: int = 128
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    microbatch: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        impl = resolve_conv_impl(self.conv_impl, self.AUTO_CPU_CONV_IMPL)
        convs = [conv(f, 3, padding="SAME", dtype=self.dtype, conv_impl=impl, name=f"conv{i + 1}")
                 for i, f in enumerate(self.features)]

        def conv_stack(x):
            for layer in convs:
                x = conv_act_pool(layer, x, nn.relu, 2, impl)
            return x.reshape((x.shape[0], -1))

        x = x.astype(self.dtype)
        x = microbatched(conv_stack, x, microbatch_count(x.shape[0], impl, self.microbatch, train))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
        return x.astype(jnp.float32)


class CNNBN(nn.Module):
    """conv1(32)+bn1+ReLU+pool, conv2(64)+bn2+ReLU+pool, fc. With `use_bn=False` the convs carry biases."""

    num_classes: int
    features: Sequence[int] = (32, 64)
    use_bn: bool = True
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            x = conv(
                f, 3, padding="SAME", use_bias=not self.use_bn, dtype=self.dtype,
                conv_impl=self.conv_impl, name=f"conv{i + 1}",
            )(x)
            if self.use_bn:
                x = batch_norm(train, self.dtype, self.bn_axis_name, f"bn{i + 1}")(x)
            x = max_pool(nn.relu(x), 2, conv_impl=self.conv_impl)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
