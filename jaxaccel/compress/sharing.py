"""Weight sharing in training: a layer's kernel as a few shared values (Deep Compression).

Han, Mao & Dally 2016 cluster each layer's kept weights into 2^bits centroids (`cluster.
kmeans_1d`) and then fine-tune the *centroids*: the gradient of a centroid is the sum of the
gradients of the weights that share it, while assignments and pruning masks stay fixed.

Here the params keep their dense shapes (the models are unchanged) and the optimizer does the
tying: `tied(inner)` replaces every weight's gradient by the sum over its cluster before
`inner` runs. Weights of a cluster then see the same gradient, the same optimizer moments and
the same update, so they stay bit-identical — the layer keeps at most 2^bits distinct values
through any elementwise optimizer (SGD, momentum, Adam, weight decay) — and one step moves a
centroid by what the paper's centroid update prescribes (before the optimizer's own scaling).

Assignments live in the optimizer state (`TiedState`, like `prune.masked`'s masks), so they
are checkpointed and placed with the state; a leaf that is not clustered holds a scalar -1 and
passes its gradient through; -1 inside a clustered leaf marks a weight that belongs to no
cluster (a pruned one) and gets no gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccel.compress import cluster
from jaxaccel.trees import is_kernel, named_leaves, path_str

PyTree = Any
MAX_CLUSTERS = 256        # 8 bits
_SEGMENTS = MAX_CLUSTERS + 1  # the last segment collects the unassigned (-1) weights


class TiedState(NamedTuple):
    """Optimizer state of `tied`: cluster assignments per leaf and the inner state."""
    assignments: PyTree
    inner_state: optax.OptState


def untied_like(params: PyTree, clustered: Callable[[str, Any], bool] = is_kernel) -> PyTree:
    """Assignments for `params` before clustering: -1 everywhere, full-shape int32 for the
    leaves `clustered(path, leaf)` selects (kernels by default), scalar for the others."""
    def one(keypath, leaf):
        shape = leaf.shape if clustered(path_str(keypath), leaf) else ()
        return jnp.full(shape, -1, jnp.int32)
    return jax.tree_util.tree_map_with_path(one, params)


def tie_gradients(grads: PyTree, assignments: PyTree) -> PyTree:
    """Each weight's gradient replaced by the sum of its cluster's gradients (0 for -1)."""
    def one(g, a):
        if a.ndim == 0:  # not clustered
            return g
        flat = a.reshape(-1)
        segment = jnp.where(flat < 0, MAX_CLUSTERS, flat)
        sums = jax.ops.segment_sum(g.reshape(-1).astype(jnp.float32), segment,
                                   num_segments=_SEGMENTS)
        tied = jnp.where(flat < 0, 0.0, sums[segment])
        return tied.reshape(g.shape).astype(g.dtype)
    return jax.tree.map(one, grads, assignments)


def tied(inner: optax.GradientTransformation,
         clustered: Callable[[str, Any], bool] = is_kernel) -> optax.GradientTransformation:
    """Wrap `inner` so weights that share a cluster receive the sum of their gradients (and
    stay shared); set the assignments with `set_assignments` before training."""
    def init(params: PyTree) -> TiedState:
        return TiedState(untied_like(params, clustered), inner.init(params))

    def update(updates, state: TiedState, params: PyTree | None = None):
        new_updates, inner_state = inner.update(tie_gradients(updates, state.assignments),
                                                state.inner_state, params)
        return new_updates, TiedState(state.assignments, inner_state)

    return optax.GradientTransformation(init, update)


def snap(params: PyTree, assignments: PyTree, masks: PyTree | None = None) -> PyTree:
    """Every kept weight of a cluster set to the cluster's largest kept value; weights that
    `masks` prunes (or that belong to no cluster) are left as they are. A no-op while the
    tied optimizer keeps a cluster's weights equal; it makes sharing exact even where two code
    paths of one elementwise update could round a last bit differently."""
    if masks is None:
        masks = jax.tree.map(lambda a: jnp.ones((), bool), assignments)

    def one(w, a, m):
        if a.ndim == 0:
            return w
        flat = a.reshape(-1)
        free = (flat < 0) | ~jnp.broadcast_to(m, w.shape).reshape(-1)
        segment = jnp.where(free, MAX_CLUSTERS, flat)
        top = jax.ops.segment_max(w.reshape(-1), segment, num_segments=_SEGMENTS)
        return jnp.where(free, w.reshape(-1), top[segment]).reshape(w.shape)
    return jax.tree.map(one, params, assignments, masks)


def _is_tied(x: Any) -> bool:
    return isinstance(x, TiedState)


def has_assignments(opt_state: PyTree) -> bool:
    """Whether `opt_state` contains a `TiedState` (the stage trains shared weights)."""
    return any(_is_tied(x) for x in jax.tree.leaves(opt_state, is_leaf=_is_tied))


def get_assignments(opt_state: PyTree) -> PyTree:
    """The assignments of the (single) `TiedState` inside `opt_state`."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_tied) if _is_tied(x)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one TiedState in opt_state, found {len(found)}")
    return found[0].assignments


def set_assignments(opt_state: PyTree, assignments: PyTree) -> PyTree:
    """`opt_state` with its `TiedState`'s assignments replaced (same structure and shapes)."""
    old = get_assignments(opt_state)
    if jax.tree.structure(old) != jax.tree.structure(assignments) or any(
            np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(old),
                                                       jax.tree.leaves(assignments))):
        raise ValueError("cluster assignments do not match the stage's clustered params")
    new = jax.tree.map(lambda a: jnp.asarray(a, jnp.int32), assignments)
    return jax.tree.map(lambda x: x._replace(assignments=new) if _is_tied(x) else x,
                        opt_state, is_leaf=_is_tied)


def layer_bits(params: PyTree, bits: int, per_layer: Mapping[str, int] | None = None,
               clustered: Callable[[str, Any], bool] = is_kernel) -> dict[str, int]:
    """Index bits of every clustered leaf: `per_layer[path]` where given, else `bits`; a
    `per_layer` key that names no clustered leaf is a one-line ValueError."""
    per_layer = dict(per_layer or {})
    names = [p for p, leaf in named_leaves(params) if clustered(p, leaf)]
    unknown = sorted(set(per_layer) - set(names))
    if unknown:
        raise ValueError(f"cluster.per_layer key {unknown[0]!r} matches no clustered layer; "
                         f"layers: {', '.join(names)}")
    out = {}
    for name in names:
        b = per_layer.get(name, bits)
        cluster.bits_to_clusters(b)  # 1..8, one-line error otherwise
        out[name] = int(b)
    return out


def share_weights(params: PyTree, masks: PyTree, bits: Mapping[str, int], *,
                  init: str = "linear", iters: int = 30,
                  clustered: Callable[[str, Any], bool] = is_kernel
                  ) -> tuple[PyTree, PyTree, dict[str, np.ndarray]]:
    """Cluster every leaf named in `bits` (host numpy, `cluster.kmeans_1d` over its kept
    weights); (params with those leaves replaced by their shared values — pruned stay 0 —,
    assignments as `tied` keeps them, {path: centroids})."""
    host_params, host_masks = jax.device_get(params), jax.device_get(masks)
    codebooks: dict[str, np.ndarray] = {}

    def one(keypath, w, m):
        name = path_str(keypath)
        if not clustered(name, w):
            return w, np.full((), -1, np.int32)
        values = np.asarray(w, np.float32)
        keep = np.asarray(m, bool)
        centroids, assign = cluster.kmeans_1d(values, cluster.bits_to_clusters(bits[name]),
                                              init=init, iters=iters, mask=keep)
        codebooks[name] = centroids
        shared = cluster.shared_weights(centroids, assign).astype(np.asarray(w).dtype)
        return shared, assign.astype(np.int32)

    pairs = jax.tree_util.tree_map_with_path(one, host_params, host_masks)
    leaves_are_pairs = lambda x: isinstance(x, tuple)  # noqa: E731
    new_params = jax.tree.map(lambda p: p[0], pairs, is_leaf=leaves_are_pairs)
    assignments = jax.tree.map(lambda p: p[1], pairs, is_leaf=leaves_are_pairs)
    return new_params, assignments, codebooks


def distinct_values(params: PyTree, masks: PyTree | None = None,
                    clustered: Callable[[str, Any], bool] = is_kernel) -> dict[str, int]:
    """Number of distinct kept values of every clustered leaf (≤ 2^bits while shared)."""
    if masks is None:
        masks = jax.tree.map(lambda w: np.ones(np.shape(w), bool), params)
    kept = dict(named_leaves(jax.tree.map(lambda w, m: np.asarray(w)[np.asarray(m, bool)],
                                          jax.device_get(params), jax.device_get(masks))))
    return {name: int(np.unique(kept[name]).size)
            for name, w in named_leaves(params) if clustered(name, w)}
