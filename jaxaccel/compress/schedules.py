"""Sparsity schedules (one-shot, gradual, iterative magnitude pruning) and ticket rewinding.

The step-indexed schedules are jnp expressions, so they can be evaluated inside a jitted
train step on a traced step counter and fed straight into ``prune.magnitude_masks``.

Owns `one_shot`, `polynomial`, `imp_sparsity` / `imp_masks`, `rewind` and `random_reinit`.
Imports only `compress.prune`; never config, stages, state, the loop or anything above.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxaccel.compress import prune

PyTree = Any


def _check_steps(begin_step: Any, end_step: Any, frequency: Any) -> None:
    concrete = lambda x: not prune.is_traced(x)  # noqa: E731
    if concrete(frequency) and int(frequency) < 1:
        raise ValueError(f"frequency={frequency!r} must be >= 1")
    if concrete(begin_step) and concrete(end_step) and int(end_step) <= int(begin_step):
        raise ValueError(f"end_step={end_step!r} must be > begin_step={begin_step!r}")


def one_shot(step: Any, target: Any, at_step: Any) -> jax.Array:
    """0 before ``at_step``, ``target`` from ``at_step`` on."""
    prune.check_fraction(target, "target")
    return jnp.where(jnp.asarray(step) >= at_step, jnp.float32(target), jnp.float32(0.0))


def polynomial(step: Any, *, initial: Any, final: Any, begin_step: Any, end_step: Any,
               frequency: Any, power: float = 3) -> jax.Array:
    """Zhu & Gupta (2017) gradual sparsity, held constant between mask updates.

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power evaluated at the last
    update step t = t0 + k * frequency <= step; ``initial`` before ``begin_step`` and
    ``final`` from ``end_step`` on.
    """
    prune.check_fraction(initial, "initial")
    prune.check_fraction(final, "final")
    _check_steps(begin_step, end_step, frequency)
    step = jnp.asarray(step, jnp.int32)
    updated = begin_step + (step - begin_step) // frequency * frequency
    t = jnp.clip(updated, begin_step, end_step)
    t = jnp.where(step >= end_step, end_step, t)
    progress = (t - begin_step).astype(jnp.float32) / jnp.asarray(end_step - begin_step,
                                                                   jnp.float32)
    s = final + (initial - final) * (1.0 - progress) ** power
    return jnp.asarray(s, jnp.float32)


def should_update(step: Any, begin_step: Any, end_step: Any, frequency: Any) -> jax.Array:
    """True at the mask-update steps begin_step, begin_step + frequency, ... <= end_step."""
    _check_steps(begin_step, end_step, frequency)
    step = jnp.asarray(step)
    return (step >= begin_step) & (step <= end_step) & ((step - begin_step) % frequency == 0)


# --------------------------------------------------------------------------- IMP / lottery tickets


def imp_sparsity(round: int, rate: float = 0.2) -> float:  # noqa: A002 (paper's term)
    """Sparsity after ``round`` rounds that each prune ``rate`` of the remaining weights."""
    prune.check_fraction(rate, "rate")
    if int(round) != round or round < 0:
        raise ValueError(f"round={round!r} must be a non-negative integer")
    return 1.0 - (1.0 - rate) ** int(round)


def imp_sparsities(round: int, rates: Mapping[str, float]) -> dict[str, float]:  # noqa: A002
    """Per-leaf ``imp_sparsity``, e.g. ``{"fc3/kernel": 0.1}`` for Frankle & Carbin's output layer;
    pass the result as ``magnitude_masks(..., per_layer=...)``."""
    return {path: imp_sparsity(round, rate) for path, rate in rates.items()}


def imp_masks(params: PyTree, masks: PyTree, round: int, *,  # noqa: A002
              rate: float = 0.2, per_layer_rates: Mapping[str, float] | None = None,
              **mask_kwargs: Any) -> PyTree:
    """Masks for IMP round ``round``: prune among the weights ``masks`` still keeps.

    The target is ``imp_sparsity(round, rate)`` of each prunable leaf (``per_layer_rates``
    override single leaves), so each round removes ``rate`` of the remaining weights. The
    result is a subset of ``masks``. ``mask_kwargs`` go to ``magnitude_masks``.
    """
    per_layer = imp_sparsities(round, per_layer_rates) if per_layer_rates else None
    return prune.magnitude_masks(params, imp_sparsity(round, rate), per_layer=per_layer,
                                 prior_masks=masks, **mask_kwargs)


def rewind(params: PyTree, rewind_params: PyTree, masks: PyTree) -> PyTree:
    """The weights saved at init (or step k), masked: the next lottery-ticket round's start.

    ``params`` (the current, trained weights) are only used to check that the snapshot
    belongs to the same model; a shape mismatch names the leaf.
    """
    prune.check_masks(params, rewind_params, "rewind_params")
    return prune.apply_masks(rewind_params, masks)


def random_reinit(init_fn: Callable[[jax.Array], PyTree], rng: jax.Array,
                  masks: PyTree) -> PyTree:
    """Control for lottery tickets: same masks, fresh random weights ``init_fn(rng)``."""
    return prune.apply_masks(init_fn(rng), masks)
