"""LeNet-300-100 (fully connected) and Caffe's LeNet-5 (20-50-500), as used in pruning papers.

Owns `LeNet300100` and `LeNet5`. Imports only `models.conv_impls`; never compress, data,
state, config or anything above.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.models.conv_impls import conv, conv_act_pool, microbatch_count, microbatched


class LeNet300100(nn.Module):
    """flatten, fc1(300) ReLU, fc2(100) ReLU, fc3(num_classes)."""

    num_classes: int
    hidden: Sequence[int] = (300, 100)
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # unused (no convs); accepted so every model has the same fields

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype).reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f"fc{i + 1}")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name=f"fc{len(self.hidden) + 1}")(x)
        return x.astype(jnp.float32)


class LeNet5(nn.Module):
    """conv1(20, 5x5) pool, conv2(50, 5x5) pool, fc1(500) ReLU, fc2. No ReLU after convs (Caffe).

    `padding="SAME"` lets it run on tiny inputs such as 8x8 digits. `microbatch` as in CNN3.
    """

    num_classes: int
    features: Sequence[int] = (20, 50)
    hidden: int = 500
    padding: str = "VALID"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    microbatch: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        convs = [conv(f, 5, padding=self.padding, dtype=self.dtype, conv_impl=self.conv_impl, name=f"conv{i + 1}")
                 for i, f in enumerate(self.features)]

        def conv_stack(x):
            for layer in convs:
                x = conv_act_pool(layer, x, None, 2, self.conv_impl)
            return x.reshape((x.shape[0], -1))

        x = x.astype(self.dtype)
        x = microbatched(conv_stack, x, microbatch_count(x.shape[0], self.conv_impl, self.microbatch))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
        return x.astype(jnp.float32)
