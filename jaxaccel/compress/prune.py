"""Magnitude pruning as pure functions on Flax parameter pytrees.

A *mask* is a pytree of booleans with exactly the structure and shapes of the params
(True = keep). Leaves that are not prunable get all-True masks, so masks can always be
applied with one ``jax.tree.map``.

Everything here is jit-friendly: ``magnitude_masks`` accepts a traced ``sparsity`` (for
unstructured and channel granularity) so a gradual schedule can recompute masks inside a
jitted train step, and each mask is computed elementwise from its parameter, so XLA's
sharding propagation gives it the parameter's sharding (no sharding rules needed).

Ranking rule: entries (or channels) are ordered by the key ``(score, flat index)``; the
``round(sparsity * size)`` smallest keys are pruned (``round`` = round-half-to-even of the
float32 product). The ordering is total, so the pruned count is exact even with ties, and
the mask at a higher sparsity is a subset of the mask at a lower one.

Layer order for ``skip_first``/``skip_last`` (see ``default_filter``): JAX flattens dicts
in sorted key order, which is not the order of the layers. So "first" and "last" are
either given explicitly (``layer_order``, e.g. from ``execution_order(model, ...)``, which
records the real call order) or found by a fixed name rule documented in
``default_filter``.

Owns `magnitude_masks`, `apply_masks`, `execution_order`, `sparsity_summary` and the masked
optimizer (`masked`, `get_masks`, `set_masks`). Imports trees and `models.conv_impls`
(`max_pool_2d`, to trace the models' fused conv + pool); never config, stages, state, the
loop or anything above.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccel.models.conv_impls import max_pool_2d
from jaxaccel.trees import is_kernel, named_leaves, path_str  # noqa: F401 - public here too

PyTree = Any
Params = PyTree
Masks = PyTree
Filter = Callable[[Params], PyTree]

SCOPES = ("layer", "global")
GRANULARITIES = ("unstructured", "channel", "n:m")
DISTRIBUTIONS = ("uniform", "erk")
NORMS = (1, 2)


# --------------------------------------------------------------------------- paths


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; valid choices: {', '.join(map(repr, choices))}")


def is_traced(x: Any) -> bool:
    """True for values only known at run time (inside jit), which cannot be validated."""
    return isinstance(x, jax.core.Tracer)


def check_fraction(value: Any, what: str) -> None:
    """ValueError unless ``value`` lies in [0, 1); traced values are taken on trust."""
    if is_traced(value):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r} is not a number") from None
    if not 0.0 <= v < 1.0:  # also rejects NaN
        raise ValueError(f"{what}={value!r} outside [0, 1)")


def check_masks(params: Params, masks: Masks, name: str = "masks") -> None:
    """ValueError naming the first leaf path where ``masks`` does not match ``params``."""
    p_leaves = dict(named_leaves(params))
    m_leaves = dict(named_leaves(masks))
    missing = [p for p in p_leaves if p not in m_leaves]
    extra = [p for p in m_leaves if p not in p_leaves]
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ValueError(f"{name} tree does not match params: {what}")
    if jax.tree.structure(params) != jax.tree.structure(masks):
        raise ValueError(f"{name} tree structure does not match params: "
                         f"{jax.tree.structure(masks)} vs {jax.tree.structure(params)}")
    for path, p in p_leaves.items():
        ms, ps = np.shape(m_leaves[path]), np.shape(p)
        if ms != ps:
            raise ValueError(f"{name}[{path!r}] has shape {ms}, params have {ps}")


# --------------------------------------------------------------------------- filters


def _numbered(names: Sequence[str], prefix: str) -> list[tuple[int, str]]:
    pattern = re.compile(rf"{prefix}(\d+)")
    return sorted((int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n)))


def _first_last_by_name(kernel_paths: Sequence[str]) -> tuple[str | None, str | None]:
    top = [p.split("/")[0] for p in kernel_paths if p.count("/") == 1]
    first = None
    if "conv_init" in top:
        first = "conv_init"
    elif convs := _numbered(top, "conv"):
        first = convs[0][1]
    elif fcs := _numbered(top, "fc"):
        first = fcs[0][1]
    last = None
    if "fc" in top:
        last = "fc"
    elif "head" in top:
        last = "head"
    elif fcs := _numbered(top, "fc"):
        last = fcs[-1][1]
    as_path = lambda name: None if name is None else f"{name}/kernel"  # noqa: E731
    return as_path(first), as_path(last)


def default_filter(*, skip_first: bool = False, skip_last: bool = False,
                   layer_order: Sequence[str] | None = None) -> Filter:
    """Filter selecting conv/dense kernels (``is_kernel``), optionally without first/last layer.

    A filter maps params to a pytree of Python bools (True = prunable).

    First and last layer: if ``layer_order`` (module paths like ``"conv1"`` or kernel paths
    like ``"conv1/kernel"``, in execution order; see ``execution_order``) is given, they are
    its first and last entries. Otherwise a name rule over top-level modules is used:
    first = ``conv_init``, else the lowest-numbered ``conv<k>``, else the lowest-numbered
    ``fc<k>``; last = ``fc``, else ``head``, else the highest-numbered ``fc<k>``. This
    matches every model in ``jaxaccel.models``; if it finds nothing, ValueError.
    """
    order = None if layer_order is None else [
        p if p.endswith("/kernel") else f"{p}/kernel" for p in layer_order]

    def filter_fn(params: Params) -> PyTree:
        leaves = named_leaves(params)
        kernels = [p for p, leaf in leaves if is_kernel(p, leaf)]
        skipped = set()
        if skip_first or skip_last:
            if order is not None:
                for p in order:
                    if p not in kernels:
                        raise ValueError(f"layer_order entry {p!r} is not a kernel of params; "
                                         f"valid: {', '.join(kernels)}")
                first, last = (order[0], order[-1]) if order else (None, None)
            else:
                first, last = _first_last_by_name(kernels)
            for want, name, layer in ((skip_first, "first", first), (skip_last, "last", last)):
                if want:
                    if layer is None:
                        raise ValueError(f"cannot tell the {name} layer from the param names "
                                         f"{kernels}; pass layer_order=execution_order(...)")
                    skipped.add(layer)
        flags = [is_kernel(p, leaf) and p not in skipped for p, leaf in leaves]
        return jax.tree.unflatten(jax.tree.structure(params), flags)

    return filter_fn


def layer_calls(model: nn.Module, variables: PyTree, *args: Any,
                **kwargs: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(module path, output shape)`` of every call of a layer that owns a ``kernel``.

    In call order; traces ``model.apply(variables, *args, **kwargs)`` abstractly (no
    FLOPs, ``variables`` may be ``jax.eval_shape`` structs) with a Flax method interceptor.
    """
    kernels = {p.rsplit("/", 1)[0] for p, leaf in named_leaves(variables["params"])
               if is_kernel(p, leaf)}
    calls: list[tuple[str, tuple[int, ...]]] = []

    def record(next_fun, call_args, call_kwargs, context):
        path = "/".join(context.module.path)
        window = call_kwargs.get("pool_window") if context.method_name == "__call__" else None
        if window is not None:
            # The models' conv + pool (`conv_impls.Conv.max_pooled`) returns the pooled output: record
            # the conv's own output shape (only shapes are traced here, so pool it separately).
            y, bias = next_fun(*call_args, **{**call_kwargs, "pool_window": None})
            out = (max_pool_2d(y, window), bias)
        else:
            out = next_fun(*call_args, **call_kwargs)
            # The models' fast conv may return (y, bias) for a later fused bias add.
            y = out[0] if isinstance(out, tuple) else out
        if path in kernels and context.method_name == "__call__":
            calls.append((path, tuple(y.shape)))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, *a: model.apply(v, *a, **kwargs), variables, *args)
    return calls


def execution_order(model: nn.Module, variables: PyTree, *args: Any, **kwargs: Any) -> list[str]:
    """Module paths of the layers that own a ``kernel``, in the order ``model`` first calls
    them (see ``layer_calls``). Use it as ``default_filter(layer_order=...)``."""
    order: list[str] = []
    for path, _ in layer_calls(model, variables, *args, **kwargs):
        if path not in order:
            order.append(path)
    return order


# --------------------------------------------------------------------------- masks


def _true_like(leaf: jax.Array) -> jax.Array:
    # Elementwise in `leaf` (not a constant) so that under jit the result inherits the
    # leaf's sharding; `x == x` alone would be False for NaN.
    return (leaf == leaf) | jnp.isnan(leaf)


def mask_tree_like(params: Params, value: bool = True) -> Masks:
    """A mask pytree of constant ``value`` with the structure, shapes and sharding of params."""
    t = jax.tree.map(_true_like, params)
    return t if value else jax.tree.map(jnp.logical_not, t)


def _num_pruned(sparsity: Any, size: int) -> jax.Array:
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def _last_pruned_key(flat_scores: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(score, index) of the k-th smallest entry by (score, index): the last one pruned."""
    order = jnp.argsort(flat_scores, stable=True)
    j = order[jnp.clip(k - 1, 0, flat_scores.size - 1)]
    return flat_scores[j], j


def _keep(scores: jax.Array, index: jax.Array, t: jax.Array, j: jax.Array,
          k: jax.Array) -> jax.Array:
    pruned = (scores < t) | ((scores == t) & (index <= j))
    return ~pruned | (k <= 0)


def _element_scores(w: jax.Array, prior: jax.Array | None) -> jax.Array:
    a = jnp.abs(w).astype(jnp.float32)
    return a if prior is None else jnp.where(prior, a, -1.0)


def _unstructured_mask(w, sparsity, prior):
    scores = _element_scores(w, prior)
    k = _num_pruned(sparsity, w.size)
    t, j = _last_pruned_key(scores.ravel(), k)
    index = jnp.arange(w.size, dtype=jnp.int32).reshape(w.shape)
    return _keep(scores, index, t, j, k)


def _channel_mask(w, sparsity, prior, norm):
    wf = w.astype(jnp.float32)
    if prior is not None:
        wf = jnp.where(prior, wf, 0.0)
    axes = tuple(range(w.ndim - 1))
    scores = jnp.sum(jnp.abs(wf), axes) if norm == 1 else jnp.sqrt(jnp.sum(wf * wf, axes))
    if prior is not None:  # channels already fully pruned rank first
        scores = jnp.where(jnp.any(prior, axes), scores, -1.0)
    cout = w.shape[-1]
    k = _num_pruned(sparsity, cout)
    t, j = _last_pruned_key(scores, k)
    keep = _keep(scores, jnp.arange(cout, dtype=jnp.int32), t, j, k)
    return _true_like(w) & keep


def _nm_mask(w, n, m, prior):
    scores = _element_scores(w, prior)
    cin = w.shape[-2]
    grouped = scores.reshape(w.shape[:-2] + (cin // m, m, w.shape[-1]))
    rank = jnp.argsort(jnp.argsort(grouped, axis=-2, stable=True), axis=-2, stable=True)
    keep = (rank >= m - n).reshape(w.shape)
    return _true_like(w) & keep


def _erk_sparsities(shapes: Sequence[tuple[int, ...]], sparsity: Any) -> list[jax.Array]:
    """Erdős–Rényi-kernel (Evci et al. 2020) per-layer sparsities hitting ``sparsity`` overall.

    density_l = eps * sum(shape_l) / prod(shape_l); layers whose density would exceed 1 are
    made dense and eps is re-solved for the rest (at most one pass per layer).
    """
    sizes = jnp.asarray([float(np.prod(s)) for s in shapes], jnp.float32)
    raw = jnp.asarray([float(sum(s)) / float(np.prod(s)) for s in shapes], jnp.float32)
    target = (1.0 - jnp.asarray(sparsity, jnp.float32)) * jnp.sum(sizes)
    dense = jnp.zeros(len(shapes), bool)
    density = jnp.ones(len(shapes), jnp.float32)
    for _ in range(len(shapes)):
        free = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
        eps = (target - jnp.sum(jnp.where(dense, sizes, 0.0))) / jnp.where(free > 0, free, 1.0)
        density = jnp.where(dense, 1.0, eps * raw)
        dense = dense | (density > 1.0)
    return list(1.0 - jnp.clip(density, 0.0, 1.0))


def magnitude_masks(
    params: Params,
    sparsity: Any,
    *,
    scope: str = "layer",
    granularity: str = "unstructured",
    n: int = 2,
    m: int = 4,
    norm: int = 1,
    filter_fn: Filter | None = None,
    distribution: str = "uniform",
    per_layer: Mapping[str, Any] | None = None,
    prior_masks: Masks | None = None,
) -> Masks:
    """Boolean masks (True = keep) pruning the smallest-magnitude weights of prunable leaves.

    - ``granularity="unstructured"``: per leaf (``scope="layer"``) or under one threshold
      over all prunable leaves (``scope="global"``) the ``round(s * size)`` smallest |w|.
    - ``"channel"``: whole output channels (last kernel axis) by L1/L2 norm (``norm``),
      ``round(s * cout)`` per layer. Masks only the kernel; for BN models see
      ``jaxaccel.compress.shrink``.
    - ``"n:m"``: in every group of ``m`` consecutive weights along the input axis (axis -2)
      keep the ``n`` largest |w|. ``sparsity`` must be None or ``1 - n/m``.
    - Layer sparsities (layer scope): ``distribution="uniform"`` (all ``sparsity``) or
      ``"erk"``, then ``per_layer={"conv1/kernel": 0.5, ...}`` overrides single leaves.
    - ``prior_masks``: rank already-pruned entries first and AND the result with them, so
      the new mask is a subset of ``prior_masks`` (iterative pruning, IMP).
    - ``filter_fn``: which leaves are prunable (default ``default_filter()``); the others
      get all-True masks.

    Works under ``jax.jit`` with a traced ``sparsity`` (and traced ``per_layer`` values).
    """
    _check_choice("scope", scope, SCOPES)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("norm", norm, NORMS)
    treedef = jax.tree.structure(params)
    leaves = named_leaves(params)
    flags = jax.tree.leaves((filter_fn or default_filter())(params))
    if len(flags) != len(leaves):
        raise ValueError(f"filter_fn returned {len(flags)} flags for {len(leaves)} leaves")
    prunable = [p for (p, _), f in zip(leaves, flags) if f]
    priors = dict(zip((p for p, _ in leaves), [None] * len(leaves)))
    if prior_masks is not None:
        check_masks(params, prior_masks, "prior_masks")
        priors = dict(named_leaves(prior_masks))
    if per_layer is not None:
        for path, value in per_layer.items():
            if path not in prunable:
                raise ValueError(f"per_layer path {path!r} is not a prunable leaf; "
                                 f"valid: {', '.join(prunable)}")
            check_fraction(value, f"per_layer[{path!r}]")
    if scope == "global" and (granularity != "unstructured" or distribution != "uniform"
                              or per_layer):
        raise ValueError(f"scope='global' supports only granularity='unstructured' with "
                         f"distribution='uniform' and no per_layer; got "
                         f"granularity={granularity!r}, distribution={distribution!r}")

    weights = dict(leaves)
    new: dict[str, jax.Array] = {}
    if granularity == "n:m":
        _check_nm(weights, prunable, sparsity, n, m, distribution, per_layer)
        for p in prunable:
            new[p] = _nm_mask(weights[p], n, m, priors[p])
    elif scope == "global":
        check_fraction(sparsity, "sparsity")
        new = _global_masks({p: weights[p] for p in prunable}, sparsity, priors)
    else:
        check_fraction(sparsity, "sparsity")
        layer_sparsity = {p: sparsity for p in prunable}
        if distribution == "erk" and prunable:
            erk = _erk_sparsities([np.shape(weights[p]) for p in prunable], sparsity)
            layer_sparsity = dict(zip(prunable, erk))
        layer_sparsity.update(per_layer or {})
        for p in prunable:
            w, s = weights[p], layer_sparsity[p]
            new[p] = (_unstructured_mask(w, s, priors[p]) if granularity == "unstructured"
                      else _channel_mask(w, s, priors[p], norm))
    for p in new:
        if priors[p] is not None:
            new[p] = new[p] & priors[p]
    out = [new[p] if p in new else (_true_like(leaf) if priors[p] is None else
                                    _true_like(leaf) & priors[p])
           for p, leaf in leaves]
    return jax.tree.unflatten(treedef, out)


def _check_nm(weights, prunable, sparsity, n, m, distribution, per_layer) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise ValueError(f"n:m needs integers, got n={n!r}, m={m!r}")
    if n < 1 or n > m:
        raise ValueError(f"n:m needs 1 <= n <= m, got n={n}, m={m}")
    if distribution != "uniform" or per_layer:
        raise ValueError(f"granularity='n:m' fixes every layer to {n}:{m}; "
                         f"distribution={distribution!r} and per_layer do not apply")
    if sparsity is not None and not is_traced(sparsity) and \
            abs(float(sparsity) - (1 - n / m)) > 1e-6:
        raise ValueError(f"granularity='n:m' with n={n}, m={m} means sparsity {1 - n / m}; "
                         f"got sparsity={sparsity!r} (pass None)")
    for p in prunable:
        shape = np.shape(weights[p])
        if shape[-2] % m:
            raise ValueError(f"leaf {p!r}: input dim {shape[-2]} (axis -2 of {shape}) is not "
                             f"divisible by m={m}; exclude it with filter_fn")


def _global_masks(weights: Mapping[str, jax.Array], sparsity: Any,
                  priors: Mapping[str, Any]) -> dict[str, jax.Array]:
    if not weights:
        return {}
    scores = {p: _element_scores(w, priors[p]) for p, w in weights.items()}
    flat = jnp.concatenate([s.ravel() for s in scores.values()])
    k = _num_pruned(sparsity, flat.size)
    t, j = _last_pruned_key(flat, k)
    out, offset = {}, 0
    for p, s in scores.items():
        index = offset + jnp.arange(s.size, dtype=jnp.int32).reshape(s.shape)
        out[p] = _keep(s, index, t, j, k)
        offset += s.size
    return out


# --------------------------------------------------------------------------- helpers


def apply_masks(params: Params, masks: Masks) -> Params:
    """Params with masked-out entries set to exactly zero (dtype kept)."""
    check_masks(params, masks)
    return jax.tree.map(lambda p, mk: jnp.where(mk, p, jnp.zeros((), p.dtype)), params, masks)


def sparsity_summary(params: Params, masks: Masks | None = None) -> dict[str, Any]:
    """Sizes, nonzeros and sparsity per leaf and in total (of ``apply_masks(params, masks)``).

    Returns ``{"leaves": {path: {"size", "nonzeros", "sparsity"}}, "total": {...}}`` with
    Python numbers (host values; not for use inside jit).
    """
    if masks is not None:
        params = apply_masks(params, masks)
    rows = {}
    for path, leaf in named_leaves(params):
        size = int(np.size(leaf))
        nnz = int(jnp.count_nonzero(leaf))
        rows[path] = {"size": size, "nonzeros": nnz,
                      "sparsity": 1.0 - nnz / size if size else 0.0}
    size = sum(r["size"] for r in rows.values())
    nnz = sum(r["nonzeros"] for r in rows.values())
    total = {"size": size, "nonzeros": nnz, "sparsity": 1.0 - nnz / size if size else 0.0}
    return {"leaves": rows, "total": total}


# --------------------------------------------------------------------------- optimizer


class MaskedState(NamedTuple):
    """Optimizer state of ``masked``: the current masks and the inner optimizer's state."""
    masks: Masks
    inner_state: optax.OptState


def masked(inner: optax.GradientTransformation, *, ste: bool = False
           ) -> optax.GradientTransformation:
    """Wrap ``inner`` so pruned weights (mask False) become and stay exactly zero.

    With ``ste`` (straight-through masks, jaxpruner's ``magnitude_ste``) nothing is zeroed
    here: the dense weights keep their gradients and updates, the forward pass applies the
    masks (``make_train_step(..., ste=True)``) and whatever reads the model applies them
    (`apply_masks` with `get_masks` of the state), so the invariant becomes "the model is
    params ⊙ masks".

    Gradients are masked before ``inner``; for pruned entries the final update is
    ``-params``, so after ``optax.apply_updates`` they are exactly 0 whatever momentum,
    Adam moments or weight decay would do. Masks start all-True; change them with
    ``set_masks``. (Not ``optax.masked``, which selects the params a transform touches.)
    """

    def init(params: Params) -> MaskedState:
        return MaskedState(mask_tree_like(params), inner.init(params))

    def update(updates, state: MaskedState, params: Params | None = None):
        if params is None:
            raise ValueError("masked(...).update needs params (to zero pruned weights)")
        grads = updates if ste else apply_masks(updates, state.masks)
        new_updates, inner_state = inner.update(grads, state.inner_state, params)
        if not ste:
            new_updates = jax.tree.map(lambda u, mk, p: jnp.where(mk, u, -p).astype(u.dtype),
                                       new_updates, state.masks, params)
        return new_updates, MaskedState(state.masks, inner_state)

    return optax.GradientTransformation(init, update)


def _is_masked_state(x: Any) -> bool:
    return isinstance(x, MaskedState)


def _masked_states(opt_state: PyTree) -> list[MaskedState]:
    nodes = jax.tree.leaves(opt_state, is_leaf=_is_masked_state)
    found = [x for x in nodes if _is_masked_state(x)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one MaskedState in opt_state, found {len(found)}")
    return found


def get_masks(opt_state: PyTree) -> Masks:
    """The masks of the (single) ``MaskedState`` anywhere inside ``opt_state``."""
    return _masked_states(opt_state)[0].masks


def set_masks(opt_state: PyTree, masks: Masks) -> PyTree:
    """``opt_state`` with the masks of its (single) ``MaskedState`` replaced by ``masks``."""
    old = _masked_states(opt_state)[0].masks
    check_masks(old, masks)
    masks = jax.tree.map(lambda mk: jnp.asarray(mk, bool), masks)
    return jax.tree.map(lambda x: x._replace(masks=masks) if _is_masked_state(x) else x,
                        opt_state, is_leaf=_is_masked_state)
