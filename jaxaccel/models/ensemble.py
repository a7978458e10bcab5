"""An ensemble of K members used as one model: `Ensemble(model, weights)`.

Members of one architecture (`model` a module): the variables are the members' variables
stacked on a leading axis of size K and every member runs vmapped. Members of different
architectures or programs (`model` a tuple of K modules, trained one after another): the
variables are `{"params": (p_0, ..., p_K-1), "batch_stats": (b_0, ...)}`, member k applied
with its own. Either way `apply` runs every member and returns the log of their (weighted) mean probabilities, the
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
    model: Any  # a module (stacked members) or a tuple of modules (one per member)
    weights: tuple[float, ...] | None = None
    logistic: tuple[tuple[tuple[float, ...], ...], tuple[float, ...]] | None = None

    @property
    def heterogeneous(self) -> bool:
        """True when the members are different modules (a tuple), not one stacked module."""
        return isinstance(self.model, tuple)

    @property
    def member_modules(self) -> tuple[Any, ...]:
        """The member modules (K of them; the same module K times is not listed: (model,))."""
        return self.model if self.heterogeneous else (self.model,)

    @property
    def conv_impl(self) -> str:
        return self.member_modules[0].conv_impl

    @property
    def AUTO_CPU_CONV_IMPL(self) -> str:  # noqa: N802 - the models' attribute name
        return getattr(self.member_modules[0], "AUTO_CPU_CONV_IMPL", "cpu")

    def map_members(self, fn: Any) -> "Ensemble":
        """The ensemble of `fn(member)` for every member module (e.g. a portable clone)."""
        if self.heterogeneous:
            return dataclasses.replace(self, model=tuple(fn(m) for m in self.model))
        return dataclasses.replace(self, model=fn(self.model))

    def clone(self, **fields: Any) -> "Ensemble":
        """The ensemble of `member.clone(**fields)` (e.g. another conv_impl)."""
        return self.map_members(lambda m: m.clone(**fields))

    def member_logits(self, variables: Any, x: jax.Array) -> jax.Array:
        """(K, B, C): every member's logits on `x` (eval mode)."""
        if self.heterogeneous:
            return jnp.stack([
                m.apply({"params": variables["params"][k],
                         "batch_stats": variables["batch_stats"][k]}, x, train=False
                        ).astype(jnp.float32)
                for k, m in enumerate(self.model)])
        return jax.vmap(lambda v: self.model.apply(v, x, train=False))(variables)

    def apply(self, variables: Any, x: jax.Array, train: bool = False, **kwargs: Any) -> jax.Array:
        """The ensemble's logits on normalised `x` (inference only)."""
        if train:
            raise ValueError("an Ensemble is for inference; train its members (ensemble.members)")
        if self.logistic is not None:
            return logistic_logits(self.member_logits(variables, x), *self.logistic)
        return average_logits(self.member_logits(variables, x), self.weights)
