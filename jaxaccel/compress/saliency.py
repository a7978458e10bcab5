"""Pruning by a score other than |w|: SNIP's connection sensitivity, and random masks.

* SNIP (Lee, Ajanthan & Torr, ICLR 2019, "Single-shot network pruning based on connection
  sensitivity"): the score of a weight is |∂L/∂w · w|, summed here over a few batches
  (`snip_scores`); one global ranking over all prunable weights then keeps the highest
  (`score_masks`). Usable at initialization (no training needed) or at any later weights.
* Random (the control for pruning at initialization): every weight gets an independent
  uniform score from a PRNG key, and the same exact-count ranking as magnitude pruning keeps
  the highest (`random_masks`), so a random mask has exactly the sparsity a magnitude mask
  of the same section would have, per layer or globally.

Masks are those of `jaxaccel.compress.prune` (True = keep, all-True for leaves that are not
prunable); with `prior_masks` the new mask is a subset of them, and already-pruned weights
count towards the requested sparsity (they rank first, and stay pruned).

Owns `snip_scores`, `score_masks` and `random_masks`. Imports `compress.prune` only; never
config, stages, state, the loop or anything above (the loss comes in as a function).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxaccel.compress import prune

PyTree = Any


@jax.jit
def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def snip_scores(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree,
                batches: Iterable[Any]) -> PyTree:
    """SNIP connection sensitivities: ``sum over batches of |∂loss_fn(params, b)/∂w · w|``.

    ``loss_fn(params, batch) -> scalar`` is the loss whose gradient is taken (the caller
    decides the forward pass: e.g. the model's cross-entropy as its train step computes it);
    ``params`` are the weights the sensitivities are taken at (at initialization for SNIP
    proper; a pruned weight is exactly 0, so its score is 0); ``batches`` an iterable of
    whatever ``loss_fn`` takes, at least one. Each batch's |gradient · weight| is computed by
    one jitted function of (params, batch), so it runs where those arrays live (placed on a
    mesh: sharded as they are); the per-batch absolute values are summed, in float32.

    Returns a pytree with the structure and shapes of ``params`` (every leaf scored, biases
    too; which leaves are prunable is the mask function's filter). Pure: same inputs, same
    scores.
    """
    @jax.jit
    def sensitivity(p: PyTree, batch: Any) -> PyTree:
        grads = jax.grad(loss_fn)(p, batch)
        return jax.tree.map(
            lambda g, w: jnp.abs(g.astype(jnp.float32) * w.astype(jnp.float32)), grads, p)

    total = None
    for batch in batches:
        scores = sensitivity(params, batch)
        total = scores if total is None else _add(total, scores)
    if total is None:
        raise ValueError("snip_scores needs at least one batch")
    return total


def score_masks(scores: PyTree, sparsity: Any, *, scope: str = "global",
                filter_fn: prune.Filter | None = None,
                prior_masks: prune.Masks | None = None) -> prune.Masks:
    """Masks keeping the highest-``scores`` entries of the prunable leaves (True = keep).

    ``scores`` (>= 0, the structure of the params, e.g. ``snip_scores``'s) are ranked exactly
    as ``prune.magnitude_masks`` ranks |w|: ``round(sparsity * size)`` entries pruned, over
    all prunable leaves at once (``scope="global"``, SNIP's single top-k) or per leaf
    (``"layer"``), ties by flat index. ``filter_fn`` picks the prunable leaves (default
    ``prune.default_filter()``; pass ``default_filter(skip_first=..., skip_last=...)`` to keep
    layers dense); ``prior_masks``: already-pruned entries stay pruned and count as pruned.
    """
    return prune.magnitude_masks(scores, sparsity, scope=scope, filter_fn=filter_fn,
                                 prior_masks=prior_masks)


def random_masks(key: jax.Array, params: PyTree, sparsity: Any, **kwargs: Any) -> prune.Masks:
    """Uniformly random masks at the counts ``prune.magnitude_masks(params, sparsity,
    **kwargs)`` would prune (the control for pruning at initialization).

    Every entry of every leaf gets an independent uniform score drawn from ``key`` (leaf k from
    ``fold_in(key, k)``, in flattening order), and those scores are ranked as magnitudes are:
    ``scope="layer"`` prunes ``round(sparsity * size)`` entries of each prunable leaf at
    random, ``"global"`` that many of all of them together (so layers get binomially varying
    sparsities); every other keyword (``filter_fn``, ``prior_masks``, ``distribution``,
    ``per_layer``, ``granularity``, ...) means what it means there. Deterministic in ``key``.
    """
    leaves, treedef = jax.tree.flatten(params)
    scores = [jax.random.uniform(jax.random.fold_in(key, k), jnp.shape(leaf), jnp.float32)
              for k, leaf in enumerate(leaves)]
    return prune.magnitude_masks(jax.tree.unflatten(treedef, scores), sparsity, **kwargs)
