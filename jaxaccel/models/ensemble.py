"""An ensemble of K members of one architecture, used as one model: `Ensemble(model, weights)`.

Its variables are the members' variables stacked on a leading axis of size K; `apply` runs
every member (vmapped) and returns the log of their (weighted) mean probabilities, the
combination that ensembles of deep networks average in (Lakshminarayanan et al. 2017), so
`argmax` is the ensemble's prediction and softmax its probabilities. It has the module
methods the rest of the framework calls on a model (`apply`, `clone`, `conv_impl`), so a
loaded ensemble predicts, exports and teaches like a single model.

Imports nothing of jaxaccel but the registry's modules' types; never compress or above.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def average_logits(member_logits: jax.Array, weights: jax.Array | Sequence[float] | None = None
                   ) -> jax.Array:
    """Logits of an ensemble that averages its members' probabilities: log of the (weighted)
    mean of softmax(member_logits) over the leading member axis, (K, B, C) -> (B, C)."""
    log_p = jax.nn.log_softmax(member_logits.astype(jnp.float32), axis=-1)
    k = member_logits.shape[0]
    if weights is None:
        log_w = jnp.full((k,), -jnp.log(float(k)))
    else:
        w = jnp.asarray(weights, jnp.float32)
        log_w = jnp.log(w / jnp.sum(w))
    return jax.scipy.special.logsumexp(log_p + log_w[:, None, None], axis=0)


def logistic_features(member_logits: Any) -> Any:
    """(K, N, C) member logits -> (N, K*C) features of a logistic stacker: each example's
    members' logits side by side, member-major (feature k*C + c is member k's logit c).
    numpy in, numpy out; jax arrays otherwise."""
    k, n, c = member_logits.shape
    xp = np if isinstance(member_logits, np.ndarray) else jnp
    return xp.transpose(member_logits, (1, 0, 2)).reshape(n, k * c)


def logistic_logits(member_logits: jax.Array, kernel: Any, bias: Any) -> jax.Array:
    """Logits of a logistic-regression stacker, (K, B, C) -> (B, C):
    `logistic_features(member_logits) @ kernel + bias` (kernel (K*C, C), bias (C,))."""
    features = logistic_features(jnp.asarray(member_logits, jnp.float32))
    return features @ jnp.asarray(kernel, jnp.float32) + jnp.asarray(bias, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """K members of `model`, combined by averaging their probabilities (`weights`: per-member
    weights fit by stacking, or None for the plain average) or, when `logistic` is given, by
    a logistic-regression stacker: `(kernel, bias)` as nested tuples, kernel (K*C, C) rows
    and bias (C,) (`compress.distill.fit_logistic_stacker`; `logistic_logits`)."""
    model: Any
    weights: tuple[float, ...] | None = None
    logistic: tuple[tuple[tuple[float, ...], ...], tuple[float, ...]] | None = None

    @property
    def conv_impl(self) -> str:
        return self.model.conv_impl

    @property
    def AUTO_CPU_CONV_IMPL(self) -> str:  # noqa: N802 - the models' attribute name
        return getattr(self.model, "AUTO_CPU_CONV_IMPL", "cpu")

    def clone(self, **fields: Any) -> "Ensemble":
        """The ensemble of `model.clone(**fields)` (e.g. another conv_impl)."""
        return dataclasses.replace(self, model=self.model.clone(**fields))

    def member_logits(self, variables: Any, x: jax.Array) -> jax.Array:
        """(K, B, C): every member's logits on `x` (eval mode)."""
        return jax.vmap(lambda v: self.model.apply(v, x, train=False))(variables)

    def apply(self, variables: Any, x: jax.Array, train: bool = False, **kwargs: Any) -> jax.Array:
        """The ensemble's logits on normalised `x` (inference only)."""
        if train:
            raise ValueError("an Ensemble is for inference; train its members (ensemble.members)")
        if self.logistic is not None:
            return logistic_logits(self.member_logits(variables, x), *self.logistic)
        return average_logits(self.member_logits(variables, x), self.weights)
