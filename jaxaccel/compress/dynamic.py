"""Dynamic sparse training: masks that change during training at a fixed sparsity.

* SET (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science"): every few steps each layer drops the
  kept weights of smallest magnitude and grows as many new connections uniformly at random
  (`set_update`).
* RigL (Evci et al. 2020, "Rigging the lottery: making all tickets winners"): the same drop,
  but grows where the dense gradient (the gradient of the loss w.r.t. every weight, pruned
  ones included) is largest in magnitude (`rigl_update`).

The number dropped per update follows a cosine decay (`drop_fraction`) and stops at
`end_step` (`is_update_step`). Per layer exactly k weights are dropped and k grown, so each
layer's sparsity is constant across updates; grown weights are chosen only among entries
pruned before the update (a weight just dropped is not grown back in the same update).
Grown weights are exactly zero (they were pruned, and `prune.masked` keeps pruned weights at
zero); `zero_moments` clears their optimizer moments, so they start like fresh weights.

Ranking rule (as `compress.prune`): ties are broken by flat index, so the masks are a pure
function of their inputs. Everything is jnp with static shapes (sort-based ranking with a
traced count), for use inside a jitted, sharded train step.

Owns `drop_fraction`, `is_update_step`, `drop_and_grow`, `rigl_update`, `set_update`,
`grown` and `zero_moments`. Imports `compress.prune` only; never config, stages, state, the
loop or anything above.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.compress import prune

PyTree = Any


def drop_fraction(step: Any, *, initial: Any, end_step: Any) -> jax.Array:
    """Cosine-decayed drop fraction: initial * (1 + cos(pi * t / end_step)) / 2, t = step
    clipped to [0, end_step]; `initial` at step 0, 0 from `end_step` on (float32).

    Invariant: in [0, initial] and non-increasing in `step`.
    """
    prune.check_fraction(initial, "drop_fraction")
    t = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, jnp.asarray(end_step, jnp.float32))
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * t / jnp.maximum(jnp.asarray(end_step, jnp.float32),
                                                           1.0)))
    return jnp.asarray(initial, jnp.float32) * cosine


def is_update_step(step: Any, *, update_every: Any, end_step: Any) -> jax.Array:
    """True at the mask-update steps update_every, 2 * update_every, ... < end_step.

    Invariant: never at step 0 (the stage's initial masks are set there) nor from
    `end_step` on (masks stay fixed afterwards).
    """
    if not prune.is_traced(update_every) and int(update_every) < 1:
        raise ValueError(f"update_every={update_every!r} must be >= 1")
    step = jnp.asarray(step, jnp.int32)
    return (step > 0) & (step < end_step) & (step % update_every == 0)


def _ranks(primary: jax.Array, secondary: jax.Array) -> jax.Array:
    """Rank of every entry in the order (primary, secondary, flat index), ascending."""
    order = jnp.lexsort((secondary, primary))  # the last key is the primary one; stable
    return jnp.zeros(order.shape, jnp.int32).at[order].set(
        jnp.arange(order.size, dtype=jnp.int32))


def drop_and_grow(weights: jax.Array, mask: jax.Array, grow_scores: jax.Array,
                  fraction: Any) -> jax.Array:
    """One layer's new mask: drop the k kept entries of smallest |weights|, grow the k
    previously pruned entries of largest `grow_scores`, k = min(round(fraction * kept),
    pruned) (round half to even of the float32 product).

    Invariant: the count of kept entries is unchanged; dropped entries were kept, grown ones
    were pruned before this update (so nothing dropped is grown back at once); ties go to the
    lower flat index; NaN magnitudes count as the largest, NaN scores as the smallest.
    """
    m = jnp.asarray(mask, bool).ravel()
    mag = jnp.nan_to_num(jnp.abs(weights).astype(jnp.float32).ravel(), nan=jnp.inf)
    score = jnp.nan_to_num(jnp.asarray(grow_scores, jnp.float32).ravel(), nan=-jnp.inf)
    kept = jnp.sum(m, dtype=jnp.int32)
    k = jnp.round(jnp.asarray(fraction, jnp.float32) * kept.astype(jnp.float32))
    k = jnp.minimum(k.astype(jnp.int32), m.size - kept)
    dropped = m & (_ranks(~m, mag) < k)         # kept entries first, smallest |w| first
    grown_ = ~m & (_ranks(m, -score) < k)       # pruned entries first, largest score first
    return ((m & ~dropped) | grown_).reshape(jnp.shape(mask))


def _update(params: PyTree, masks: PyTree, scores: PyTree, fraction: Any,
            filter_fn: prune.Filter | None) -> PyTree:
    prune.check_masks(params, masks)
    flags = jax.tree.leaves((filter_fn or prune.default_filter())(params))
    leaves, treedef = jax.tree.flatten(params)
    out = [drop_and_grow(w, mk, s, fraction) if flag else mk
           for w, mk, s, flag in zip(leaves, jax.tree.leaves(masks), jax.tree.leaves(scores),
                                     flags)]
    return jax.tree.unflatten(treedef, out)


def rigl_update(params: PyTree, masks: PyTree, grads: PyTree, fraction: Any, *,
                filter_fn: prune.Filter | None = None) -> PyTree:
    """RigL: per prunable leaf (`filter_fn`, default `prune.default_filter()`), drop the
    `fraction` of kept weights of smallest |w| and grow as many where |grads| (the dense
    gradient, pruned entries included) is largest among the previously pruned entries.

    Invariant: every leaf keeps its count of kept entries; non-prunable leaves keep their
    masks; a grown entry has the largest |grad| of all entries pruned before the update that
    were not grown.
    """
    return _update(params, masks, jax.tree.map(jnp.abs, grads), fraction, filter_fn)


def set_update(key: jax.Array, params: PyTree, masks: PyTree, fraction: Any, *,
               filter_fn: prune.Filter | None = None) -> PyTree:
    """SET: per prunable leaf, drop the `fraction` of kept weights of smallest |w| and grow
    as many uniformly at random among the previously pruned entries (leaf k's scores drawn
    from `fold_in(key, k)`, flattening order).

    Invariant: every leaf keeps its count of kept entries; non-prunable leaves keep their
    masks; deterministic in `key`.
    """
    leaves, treedef = jax.tree.flatten(params)
    scores = [jax.random.uniform(jax.random.fold_in(key, k), jnp.shape(leaf), jnp.float32)
              for k, leaf in enumerate(leaves)]
    return _update(params, masks, jax.tree.unflatten(treedef, scores), fraction, filter_fn)


def grown(old_masks: PyTree, new_masks: PyTree) -> PyTree:
    """Entries kept by `new_masks` that `old_masks` pruned (`new & ~old`).

    Invariant: all False when the new masks are a subset of the old (gradual pruning).
    """
    return jax.tree.map(lambda o, n: jnp.asarray(n, bool) & ~jnp.asarray(o, bool),
                        old_masks, new_masks)


def zero_moments(opt_state: PyTree, grown_masks: PyTree) -> PyTree:
    """`opt_state` with every per-parameter float buffer (Adam's mu and nu, SGD momentum's
    trace, ...) set to exactly 0 where `grown_masks` is True.

    A per-parameter buffer is any subtree of `opt_state` with the structure and leaf shapes of
    `grown_masks`; only its floating-point leaves change (boolean masks and integer cluster
    assignments, counts and everything else are left as they are).
    Invariant: entries where `grown_masks` is False are bitwise unchanged.
    """
    treedef = jax.tree.structure(grown_masks)
    shapes = [np.shape(g) for g in jax.tree.leaves(grown_masks)]

    def matches(x: Any) -> bool:
        if jax.tree.structure(x) != treedef:
            return False
        return [np.shape(leaf) for leaf in jax.tree.leaves(x)] == shapes

    def zero(x: Any) -> Any:
        if not matches(x):
            return x
        return jax.tree.map(
            lambda v, g: jnp.where(g, jnp.zeros((), v.dtype), v)
            if jnp.issubdtype(v.dtype, jnp.inexact) else v, x, grown_masks)

    return jax.tree.map(zero, opt_state, is_leaf=matches)
