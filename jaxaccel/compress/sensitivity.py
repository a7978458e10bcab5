"""Per-layer sensitivity to pruning and to weight quantization, and a per-layer allocation.

`layer_sensitivity(evaluate, params, masks, layers, sparsities, bits)` measures, for every
layer alone, the accuracy and loss when ONLY that layer's kernel is magnitude-pruned to each
sparsity (on top of its current mask: ``prune.magnitude_masks`` with ``prior_masks``) or
fake-quantized to each bit width (symmetric, narrow range, per output channel:
``package.weight_config``, the codes a compressed package stores), every other leaf the very
same array (Han et al. 2015, Fig. 5). ``evaluate(params)`` returns at least ``accuracy`` and
``loss`` (`make_evaluate` builds one from a model and eval batches).

`allocate(table, sizes, target_bytes=... | target_macs=...)` picks one sparsity and one bit
width per layer meeting the target with the least predicted loss. The prediction is additive:
predicted drop = sum over layers of the layer's pruning drop at its sparsity plus its
quantization drop at its bits, each drop being ``max(0, baseline - accuracy)`` from the table
(a layer measured above the baseline counts as no drop, not as a gain). "No further pruning"
(sparsity 0, drop 0) is always an option; every layer is quantized to one of the table's
bits. Sizes are those of a compressed package (``package.kernel_bytes``: codes of the
nonzeros + bit-mask + scales, plus biases and BatchNorm as float32, the constant
``fixed_bytes``); MACs per image are output positions × nonzero weights, as
``layer_table`` counts effective MACs. A layer pruned to ``s`` keeps
``min(nonzeros, size - round(s * size))`` weights (magnitude pruning on top of its mask).

The solver is exact for this model: a dynamic program over layers that keeps, after each
layer, the Pareto frontier of partial allocations (cost, predicted drop) — every partial
allocation not dominated by one at most as costly and at most as lossy — and drops those that
cannot meet the target even with the cheapest options of the remaining layers. Drops are
summed in integer units of 1e-9 accuracy, so comparisons are exact. Among allocations of
equal predicted drop the cheapest wins (then the one with fewer bytes, for a MAC target).

`layer_sizes` reads the sizes from a model and its variables (via ``layer_table``), `predict`
gives the prediction for any per-layer choice (e.g. uniform), `to_markdown` renders a
`jaxaccel compress sensitivity` record and `plot` draws it (matplotlib, Agg canvas).

Imports io, layer_table, package, prune and quant; never loading, config, stages, state, the
loop or anything above.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import io
from jaxaccel.compress import layer_table as layer_table_lib
from jaxaccel.compress import package, prune, quant

PyTree = Any
DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_BITS = (8, 6, 4, 3, 2)
UNIT = 10 ** 9  # drops are summed as integers in units of 1e-9 accuracy


# --------------------------------------------------------------------------- inputs


def check_grid(sparsities: Iterable[Any], bits: Iterable[Any]) -> tuple[tuple[float, ...],
                                                                         tuple[int, ...]]:
    """The grids sorted and without repeats (sparsities ascending, bits descending); a
    ValueError names the first sparsity outside [0, 1) or bit width outside 2..8."""
    sparsities, bits = list(sparsities), list(bits)
    if not sparsities or not bits:
        raise ValueError("sensitivity needs at least one sparsity and one bit width")
    for s in sparsities:
        if isinstance(s, bool):
            raise ValueError(f"sparsity {s!r} is not a number")
        prune.check_fraction(s, "sparsity")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= 8:
            raise ValueError(f"bits {b!r} must be an integer in 2..8")
    return (tuple(sorted({float(s) for s in sparsities})),
            tuple(sorted({int(b) for b in bits}, reverse=True)))


def check_targets(target_bytes: Any = None, target_macs: Any = None) -> tuple[str, int] | None:
    """``("bytes" | "macs", value)``, or None without a target; ValueError for both targets
    or a target that is not a positive integer."""
    if target_bytes is not None and target_macs is not None:
        raise ValueError("give one target: target_bytes or target_macs, not both")
    for kind, value in (("bytes", target_bytes), ("macs", target_macs)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"target_{kind}={value!r} must be a positive integer")
        return kind, int(value)
    return None


# --------------------------------------------------------------------------- one layer


def _leaf(params: PyTree, layer: str) -> Any:
    leaves = dict(prune.named_leaves(params))
    kernels = [p for p, leaf in leaves.items() if prune.is_kernel(p, leaf)]
    if layer not in kernels:
        raise ValueError(f"layer {layer!r} is not a conv/dense kernel of params; valid: "
                         f"{', '.join(kernels)}")
    return leaves[layer]


def _replace(params: PyTree, layer: str, new: Any) -> PyTree:
    """``params`` with the leaf at path ``layer`` replaced; every other leaf the same object."""
    def one(path, leaf):
        return new if prune.path_str(path) == layer else leaf
    return jax.tree_util.tree_map_with_path(one, params)


@jax.jit
def _pruned_kernel(w, mask, sparsity):
    keep = prune.magnitude_masks({"k": {"kernel": w}}, 0.0, per_layer={"k/kernel": sparsity},
                                 prior_masks={"k": {"kernel": mask}})["k"]["kernel"]
    return jnp.where(keep, w, jnp.zeros((), w.dtype))


def prune_layer(params: PyTree, masks: PyTree, layer: str, sparsity: float) -> PyTree:
    """``params`` with only ``layer`` magnitude-pruned to ``sparsity`` on top of its mask."""
    prune.check_fraction(sparsity, "sparsity")
    w = _leaf(params, layer)
    mask = dict(prune.named_leaves(masks))[layer]
    return _replace(params, layer, _pruned_kernel(w, jnp.asarray(mask, bool), sparsity))


def quantize_layer(params: PyTree, layer: str, bits: int) -> PyTree:
    """``params`` with only ``layer`` fake-quantized to ``bits`` (symmetric, narrow range,
    per output channel, as a compressed package codes it); pruned zeros stay zero."""
    w = _leaf(params, layer)
    q, _ = quant.quantize_weights({"k": {"kernel": w}}, package.weight_config(bits))
    return _replace(params, layer, q["k"]["kernel"])


def make_evaluate(model: Any, variables: Mapping[str, PyTree],
                  batches: Iterable[Mapping[str, Any]]) -> Callable[[PyTree], dict[str, Any]]:
    """``evaluate(params) -> {"accuracy", "loss", "count"}`` of ``model`` with ``params`` and
    the other collections of ``variables``, over ``batches`` (dicts of normalised ``image``,
    ``label``, ``mask``, as ``data.eval_batches`` yields; read once and kept). One compile."""
    held = [(jnp.asarray(b["image"]), jnp.asarray(b["label"]), jnp.asarray(b["mask"]))
            for b in batches]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def sums(params, x, labels, mask):
        logits = model.apply({**rest, "params": params}, x, train=False).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        m = mask.astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum((jnp.argmax(logits, -1) == labels) * m), jnp.sum(m)

    def evaluate(params: PyTree) -> dict[str, Any]:
        loss = correct = count = 0.0
        for x, labels, mask in held:
            l_, c_, n_ = jax.device_get(sums(params, x, labels, mask))
            loss, correct, count = loss + float(l_), correct + float(c_), count + float(n_)
        n = max(count, 1.0)
        return {"accuracy": correct / n, "loss": loss / n, "count": int(count)}

    return evaluate


def layer_sensitivity(evaluate: Callable[[PyTree], Mapping[str, Any]], params: PyTree,
                      masks: PyTree | None, layers: Sequence[str] | None,
                      sparsities: Sequence[float], bits: Sequence[int]) -> dict[str, Any]:
    """Accuracy and loss when only one layer is pruned or quantized (see the module doc).

    ``masks``: the current masks (None: the nonzero entries of ``params``). ``layers``: kernel
    paths such as ``"fc1/kernel"`` (None: every kernel). Returns ``{"baseline": evaluate(params),
    "sparsities": [...], "bits": [...], "layers": [{"layer", "prune": {"accuracy": [...],
    "loss": [...]}, "quant": {...}}, ...]}``, the lists aligned with the (sorted) grids.
    """
    sparsities, bits = check_grid(sparsities, bits)
    if masks is None:
        masks = jax.tree.map(lambda p: p != 0, params)
    else:
        prune.check_masks(params, masks)
    if layers is None:
        layers = [p for p, leaf in prune.named_leaves(params) if prune.is_kernel(p, leaf)]
    for layer in layers:
        _leaf(params, layer)
    baseline = dict(evaluate(params))
    rows = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer}
        for kind, grid, change in (("prune", sparsities, lambda s: prune_layer(
                params, masks, layer, s)), ("quant", bits, lambda b: quantize_layer(
                params, layer, b))):
            results = [evaluate(change(v)) for v in grid]
            row[kind] = {k: [float(r[k]) for r in results] for k in ("accuracy", "loss")}
        rows.append(row)
    return {"baseline": baseline, "sparsities": list(sparsities), "bits": list(bits),
            "layers": rows}


# --------------------------------------------------------------------------- sizes


def layer_sizes(model: Any, variables: Mapping[str, PyTree],
                input_shape: Sequence[int]) -> dict[str, Any]:
    """``{"layers": {kernel path: {"size", "nonzeros", "channels", "positions"}},
    "fixed_bytes": int}`` in call order: what `allocate` needs. ``positions`` are the output
    positions per image (MACs = positions × nonzeros); ``fixed_bytes`` everything a package
    stores besides the kernels (biases, BatchNorm) as float32."""
    table = layer_table_lib.layer_table(model, variables, input_shape)
    layers = {}
    fixed = table["totals"]["packed_bytes"]
    for row in table["layers"]:
        if row["kind"] == "other":
            continue
        size, nnz, channels = row["params"], row["nonzeros"], row["shape"][-1]
        fixed -= package.kernel_bytes(size, nnz, channels, row["bits"])
        layers[f"{row['layer']}/kernel"] = {
            "size": size, "nonzeros": nnz, "channels": channels,
            "positions": row["macs_dense"] // size if size else 0}
    return {"layers": layers, "fixed_bytes": int(fixed)}


def kept(size: int, nonzeros: int, sparsity: float) -> int:
    """Nonzeros left after magnitude-pruning to ``sparsity`` on top of the current mask."""
    return min(int(nonzeros), int(size) - int(np.round(np.float32(sparsity) * size)))


def _costs(info: Mapping[str, int], sparsity: float, bits: int) -> tuple[int, int]:
    nnz = kept(info["size"], info["nonzeros"], sparsity)
    return (package.kernel_bytes(info["size"], nnz, info["channels"], bits),
            info["positions"] * nnz)


def _options(table: Mapping[str, Any], sizes: Mapping[str, Any]):
    """Per layer: (sparsity, bits, bytes, macs, drop in UNITs) of every choice."""
    rows = {r["layer"]: r for r in table["layers"]}
    missing = [layer for layer in sizes["layers"] if layer not in rows]
    if missing:
        raise ValueError(f"the sensitivity table has no row for layer {missing[0]!r}")
    base = float(table["baseline"]["accuracy"])

    def drop(acc: float) -> int:
        return max(0, int(round((base - float(acc)) * UNIT)))

    out = {}
    for layer, info in sizes["layers"].items():
        row = rows[layer]
        p_drop = dict(zip(table["sparsities"], (drop(a) for a in row["prune"]["accuracy"])))
        p_drop.setdefault(0.0, 0)
        q_drop = dict(zip(table["bits"], (drop(a) for a in row["quant"]["accuracy"])))
        out[layer] = [(s, b, *_costs(info, s, b), p_drop[s] + q_drop[b])
                      for s in sorted(p_drop) for b in sorted(q_drop, reverse=True)]
    return out


def predict(table: Mapping[str, Any], sizes: Mapping[str, Any],
            sparsity: Mapping[str, float] | float, bits: Mapping[str, int] | int
            ) -> dict[str, Any]:
    """Bytes, MACs per image and predicted drop / accuracy of one choice per layer
    (``sparsity`` and ``bits``: a per-layer map or one value for every layer, e.g. uniform;
    values from the table's grids, sparsity 0 also allowed)."""
    options = _options(table, sizes)
    total_bytes, macs, drop = sizes["fixed_bytes"], 0, 0
    for layer, opts in options.items():
        s = sparsity[layer] if isinstance(sparsity, Mapping) else sparsity
        b = bits[layer] if isinstance(bits, Mapping) else bits
        match = [o for o in opts if o[0] == float(s) and o[1] == int(b)]
        if not match:
            raise ValueError(f"layer {layer!r}: sparsity {s!r} and bits {b!r} are not in the "
                             f"table's grids (sparsities {table['sparsities']}, bits "
                             f"{table['bits']})")
        _, _, nbytes, nmacs, d = match[0]
        total_bytes, macs, drop = total_bytes + nbytes, macs + nmacs, drop + d
    base = float(table["baseline"]["accuracy"])
    return {"bytes": int(total_bytes), "macs": int(macs), "predicted_drop": drop / UNIT,
            "predicted_accuracy": base - drop / UNIT}


def smallest(sizes: Mapping[str, Any], sparsities: Sequence[float],
             bits: Sequence[int]) -> dict[str, int]:
    """The smallest total bytes and MACs any choice from the grids reaches (no evaluation
    needed: check a target with it before measuring anything)."""
    grid_s = sorted({0.0, *map(float, sparsities)})
    total_bytes, macs = sizes["fixed_bytes"], 0
    for info in sizes["layers"].values():
        costs = [_costs(info, s, b) for s in grid_s for b in bits]
        total_bytes += min(c[0] for c in costs)
        macs += min(c[1] for c in costs)
    return {"bytes": int(total_bytes), "macs": int(macs)}


def check_reachable(sizes: Mapping[str, Any], sparsities: Sequence[float], bits: Sequence[int],
                    target: tuple[str, int] | None) -> None:
    """ValueError when ``target`` (from `check_targets`) is below what the grids reach."""
    if target is None:
        return
    kind, value = target
    least = smallest(sizes, sparsities, bits)[kind]
    if value < least:
        unit = "bytes" if kind == "bytes" else "MACs per image"
        raise ValueError(f"target_{kind}={value:,} is smaller than the smallest achievable "
                         f"{least:,} {unit} (sparsities up to {max(sparsities)}, bits down to "
                         f"{min(bits)})")


# --------------------------------------------------------------------------- allocation


def allocate(table: Mapping[str, Any], sizes: Mapping[str, Any], *,
             target_bytes: int | None = None, target_macs: int | None = None) -> dict[str, Any]:
    """Per-layer sparsity and bits meeting the one target with the least predicted drop
    (exact; see the module doc). Returns ``{"target": {"bytes" | "macs": N},
    "prune_per_layer": {"fc1/kernel": 0.9, ...}, "bits_per_layer": {"fc1/kernel": 4, ...},
    "bytes", "macs", "predicted_drop", "predicted_accuracy", "baseline_accuracy"}``."""
    target = check_targets(target_bytes, target_macs)
    if target is None:
        raise ValueError("allocate needs target_bytes or target_macs")
    kind, limit = target
    check_reachable(sizes, table["sparsities"], table["bits"], target)
    options = _options(table, sizes)
    layers = list(options)
    primary = 2 if kind == "bytes" else 3  # index of the cost in an option tuple
    secondary = 5 - primary
    opt_arrays = [np.asarray([[o[primary], o[secondary], o[4]] for o in options[layer]],
                             np.int64) for layer in layers]
    # Cheapest completion of layers i.. (to drop partial allocations that cannot fit).
    rest = np.zeros(len(layers) + 1, np.int64)
    for i in range(len(layers) - 1, -1, -1):
        rest[i] = rest[i + 1] + opt_arrays[i][:, 0].min()
    fixed = sizes["fixed_bytes"] if kind == "bytes" else 0
    cost = np.asarray([fixed], np.int64)
    other = np.asarray([sizes["fixed_bytes"] if kind == "macs" else 0], np.int64)
    loss = np.zeros(1, np.int64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i, opts in enumerate(opt_arrays):
        c = (cost[:, None] + opts[None, :, 0]).ravel()
        o = (other[:, None] + opts[None, :, 1]).ravel()
        lo = (loss[:, None] + opts[None, :, 2]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(opts))
        choice = np.tile(np.arange(len(opts)), len(cost))
        ok = c + rest[i + 1] <= limit
        c, o, lo, parent, choice = c[ok], o[ok], lo[ok], parent[ok], choice[ok]
        order = np.lexsort((o, lo, c))  # by cost, then drop, then the other cost
        c, o, lo, parent, choice = c[order], o[order], lo[order], parent[order], choice[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.iinfo(np.int64).max], lo]))[:-1]
        keep = lo < best_before  # Pareto frontier: strictly less drop than anything cheaper
        cost, other, loss = c[keep], o[keep], lo[keep]
        back.append((parent[keep], choice[keep]))
    j = int(np.argmin(loss))  # the frontier's drop falls as its cost rises: the last point
    picks = []
    for i in range(len(layers) - 1, -1, -1):
        parent, choice = back[i]
        picks.append(int(choice[j]))
        j = int(parent[j])
    picks.reverse()
    prune_map = {layer: options[layer][k][0] for layer, k in zip(layers, picks)}
    bits_map = {layer: options[layer][k][1] for layer, k in zip(layers, picks)}
    pred = predict(table, sizes, prune_map, bits_map)
    return {"target": {kind: limit}, "prune_per_layer": prune_map, "bits_per_layer": bits_map,
            **pred, "baseline_accuracy": float(table["baseline"]["accuracy"])}


# --------------------------------------------------------------------------- rendering


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def to_markdown(record: Mapping[str, Any]) -> str:
    """A `jaxaccel compress sensitivity` record as markdown: accuracy (%) per layer and
    sparsity, per layer and bits, then the allocation (if any)."""
    base = record["baseline"]
    out = [f"# Sensitivity: {record.get('workdir', '')}\n",
           f"{record['split']} split, {base['count']} examples; baseline accuracy "
           f"{_pct(base['accuracy'])}%, loss {base['loss']:.4f}. Accuracy (%) with only that "
           f"layer changed.\n"]
    out += [f"- {n}" for n in record.get("notes", [])] + ([""] if record.get("notes") else [])
    for kind, grid, head in (("prune", record["sparsities"], "sparsity"),
                             ("quant", record["bits"], "bits")):
        cols = ["layer"] + [f"{head} {v:g}" for v in grid]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for row in record["layers"]:
            out.append("| " + " | ".join([row["layer"]] + [_pct(a) for a in
                                                            row[kind]["accuracy"]]) + " |")
        out.append("")
    alloc = record.get("allocation")
    if alloc:
        (kind, limit), = alloc["target"].items()
        out.append(f"Allocation for at most {limit:,} {'bytes' if kind == 'bytes' else 'MACs'}"
                   f": {alloc['bytes']:,} bytes, {alloc['macs']:,} MACs per image; predicted "
                   f"accuracy {_pct(alloc['predicted_accuracy'])}% (additive drops, "
                   f"selected on {record['split']})\n")
        out.append("| layer | sparsity | bits |\n|---|---|---|")
        out += [f"| {layer} | {s:g} | {alloc['bits_per_layer'][layer]} |"
                for layer, s in alloc["prune_per_layer"].items()]
        out.append("")
        out.append(f"prune stage: {alloc['prune_stage']}")
        bits = io.dumps(alloc["bits_per_layer"], indent=None, sort_keys=False)
        out.append(f"bits per layer: {bits}")
    return "\n".join(out) + "\n"


def plot(path: str, record: Mapping[str, Any]) -> None:
    """Two panels: accuracy vs sparsity and accuracy vs bits, one line per layer, the
    baseline dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    fig = Figure(figsize=(12.0, 4.0), dpi=100, layout="constrained")
    axes = [fig.add_subplot(1, 2, 1)]
    axes.append(fig.add_subplot(1, 2, 2, sharey=axes[0]))
    base = 100 * record["baseline"]["accuracy"]
    for ax, kind, grid, xlabel in ((axes[0], "prune", record["sparsities"], "sparsity"),
                                   (axes[1], "quant", record["bits"], "weight bits")):
        for i, row in enumerate(record["layers"]):
            ax.plot(grid, [100 * a for a in row[kind]["accuracy"]], marker="o",
                    color=f"C{i % 10}", label=row["layer"] if kind == "prune" else None)
        ax.axhline(base, color="gray", linestyle="--", label="baseline" if kind == "prune"
                   else None)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.set_title(f"{record['split']} accuracy vs {xlabel}, one layer at a time",
                     fontsize=10)
        if kind == "quant":
            ax.set_xticks(grid, [str(b) for b in grid])
            ax.invert_xaxis()
    axes[0].set_ylabel(f"{record['split']} accuracy (%)")
    axes[0].legend(fontsize=7, ncol=1 + len(record["layers"]) // 16)
    fig.savefig(path)
