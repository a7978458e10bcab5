"""Per-layer compression report: shape, params, nonzeros, sparsity, bits, bytes, MACs.

`layer_table(model, variables, input_shape, bits=...)` is the pure part: one row per layer
that owns a conv/dense kernel (in call order), an ``other`` row for the remaining variables
(BatchNorm parameters and statistics), and totals. Bytes are what a compressed package
(``compress.package``) stores for the layer — kernel codes + bit-mask + scales
(``package.kernel_bytes``) plus the layer's bias in float32; ``bits=32`` counts an
unquantized kernel in the same sparse layout (dense: plain float32). MACs are per image:
output positions × kernel size (``shrink.flops`` counts the same), and the effective MACs of
a sparse layer are output positions × nonzeros, i.e. dense × density.

`weights_report` tables what a run ended with (`jaxaccel.loading.final_weights`),
`package_report` a compressed package; `to_markdown` renders either. Pure functions of
models and weights: nothing here reads a workdir.

Imports `compress.package` and `compress.prune`; never loading, config, stages, state, the
loop or anything above.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.compress import package, prune

PyTree = Any
FLOAT_BITS = 32


# --------------------------------------------------------------------------- the table


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or \
            not (2 <= bits <= 8 or bits == FLOAT_BITS):
        raise ValueError(f"bits must be an integer in 2..8 or 32, got {bits!r}")
    return int(bits)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer))
                              or d <= 0 for d in shape):
        raise ValueError(f"input_shape must be three positive ints (H, W, C), got {input_shape!r}")
    return tuple(int(d) for d in shape)


def layer_macs(model: nn.Module, variables: PyTree,
               input_shape: Sequence[int]) -> dict[str, int]:
    """Dense MACs per image of every layer owning a kernel, ``{module path: MACs}`` in call
    order (a layer called twice counts twice); traced abstractly, no FLOPs spent."""
    shape = _check_input_shape(input_shape)
    kernels = {p.rsplit("/", 1)[0]: np.shape(leaf)
               for p, leaf in prune.named_leaves(variables["params"]) if prune.is_kernel(p, leaf)}
    x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
    out: dict[str, int] = {}
    for path, out_shape in prune.layer_calls(model, variables, x, train=False):
        positions = int(np.prod(out_shape[:-1]))
        out[path] = out.get(path, 0) + positions * int(np.prod(kernels[path]))
    return out


def layer_table(model: nn.Module, variables: Mapping[str, PyTree], input_shape: Sequence[int],
                *, bits: int = FLOAT_BITS, masks: PyTree | None = None,
                per_channel: bool = True, float_bytes: int = 4) -> dict[str, Any]:
    """``{"layers": [row, ...], "totals": {...}}`` for ``variables`` (see the module doc).

    Each row: ``layer, kind ("conv" | "dense" | "other"), shape, params, nonzeros, sparsity,
    bits, bytes, macs_dense, macs_effective``; params/nonzeros/sparsity are the kernel's.
    Totals: kernel ``params``, ``nonzeros``, ``sparsity``; ``packed_bytes`` of everything
    stored (the rows' bytes summed; equal to `package.packed_bytes`);
    ``variables`` (all elements) and ``dense_float32_bytes`` (4 bytes each); their ratio
    ``compression``; summed MACs and ``mac_reduction`` (dense / effective).
    ``masks`` (over params) zero entries first, as ``prune.apply_masks``. ``per_channel``
    and ``float_bytes`` (scales, biases, other variables: 4 = float32, 2 = float16) follow
    the package layout being counted.
    """
    bits = _check_bits(bits)
    if "params" not in variables:
        raise ValueError(f"variables need a 'params' collection, got {sorted(variables)}")
    params = jax.device_get(variables["params"])
    if masks is not None:
        prune.check_masks(params, masks)
        params = jax.tree.map(lambda p, mk: np.where(np.asarray(mk, bool), p, 0),
                              params, jax.device_get(masks))
    leaves = dict(prune.named_leaves(params))
    kernel_modules = [p.rsplit("/", 1)[0] for p, leaf in leaves.items()
                      if prune.is_kernel(p, leaf)]
    macs = layer_macs(model, {**variables, "params": params}, input_shape)
    order = [m for m in macs if m in kernel_modules] + \
        [m for m in kernel_modules if m not in macs]
    if float_bytes not in (2, 4):
        raise ValueError(f"float_bytes must be 2 or 4, got {float_bytes!r}")
    rows, used = [], set()
    for module in order:
        kernel = np.asarray(leaves[f"{module}/kernel"])
        size, nnz = int(kernel.size), int(np.count_nonzero(kernel))
        extra = [p for p in leaves if p.rsplit("/", 1)[0] == module and p != f"{module}/kernel"]
        used.update(extra + [f"{module}/kernel"])
        nbytes = package.kernel_bytes(size, nnz, kernel.shape[-1], bits, per_channel=per_channel,
                                        scale_bytes=float_bytes) \
            + float_bytes * sum(int(np.size(leaves[p])) for p in extra)
        dense_macs = macs.get(module, 0)
        rows.append({"layer": module, "kind": "conv" if kernel.ndim > 2 else "dense",
                     "shape": list(kernel.shape), "params": size, "nonzeros": nnz,
                     "sparsity": 1.0 - nnz / size if size else 0.0, "bits": bits,
                     "bytes": nbytes, "macs_dense": dense_macs,
                     "macs_effective": dense_macs // size * nnz if size else 0})
    other = [np.size(leaf) for p, leaf in leaves.items() if p not in used]
    for name, tree in variables.items():
        if name != "params":
            other += [np.size(leaf) for leaf in jax.tree.leaves(tree)]
    other_count = int(sum(other))
    if other_count:
        rows.append({"layer": "other", "kind": "other", "shape": [], "params": other_count,
                     "nonzeros": None, "sparsity": None, "bits": 8 * float_bytes,
                     "bytes": float_bytes * other_count, "macs_dense": 0, "macs_effective": 0})
    layer_rows = [r for r in rows if r["kind"] != "other"]
    size = sum(r["params"] for r in layer_rows)
    nnz = sum(r["nonzeros"] for r in layer_rows)
    total_vars = sum(int(np.size(leaf)) for tree in variables.values()
                     for leaf in jax.tree.leaves(tree))
    stored = sum(r["bytes"] for r in rows)
    dense_macs = sum(r["macs_dense"] for r in rows)
    eff_macs = sum(r["macs_effective"] for r in rows)
    totals = {"params": size, "nonzeros": nnz, "sparsity": 1.0 - nnz / size if size else 0.0,
              "bits": bits, "packed_bytes": stored, "variables": total_vars,
              "dense_float32_bytes": 4 * total_vars,
              "compression": 4 * total_vars / stored if stored else None,
              "macs_dense": dense_macs, "macs_effective": eff_macs,
              "mac_reduction": dense_macs / eff_macs if eff_macs else None}
    return {"layers": rows, "totals": totals}


def weights_report(weights: Any, *, bits: int | None = None,
                   input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """`layer_table` of a run's final weights (`jaxaccel.loading.final_weights(W)`: `.model`,
    `.variables`, `.bits`, `.input_shape`, …); ``bits`` overrides the run's."""
    if bits is not None:
        _check_bits(bits)
    shape = tuple(input_shape) if input_shape is not None else weights.input_shape
    bits = weights.bits if bits is None else bits
    table = layer_table(weights.model, weights.variables, shape, bits=bits)
    return {"source": weights.workdir, "kind": "workdir", "model": weights.config.model.name,
            "step": weights.step, "stage": weights.stage, "bits": bits,
            "input_shape": list(shape), "notes": weights.notes, **table}


def package_report(path: str, *, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """`layer_table` of a compressed package, at its bits and with its layout options."""
    pkg = package.load_compressed(path)
    meta, model, variables = pkg.meta, pkg.model, pkg.variables
    shape = _check_input_shape(input_shape if input_shape is not None else pkg.spec.image_shape)
    table = layer_table(model, variables, shape, bits=meta["bits"],
                        per_channel=meta["per_channel"],
                        float_bytes=np.dtype(meta["float_dtype"]).itemsize)
    return {"source": path, "kind": "package", "model": meta["model"]["name"],
            "step": meta.get("extra", {}).get("step"), "stage": meta.get("extra", {}).get("stage"),
            "bits": meta["bits"], "input_shape": list(shape),
            "notes": [f"compressed package, {os.path.getsize(path):,} bytes on disk"], **table}


# --------------------------------------------------------------------------- rendering


def _int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown table with a totals row and a one-line summary."""
    head = (f"# Compression report: {report['source']}\n\n"
            f"model {report['model']}, step {report.get('step')}, stage {report.get('stage')}, "
            f"weight bits {report['bits']}, MACs per image of shape "
            f"{_shape(report['input_shape'])}\n")
    notes = "".join(f"- {n}\n" for n in report.get("notes", []))
    cols = ["layer", "kind", "shape", "params", "nonzeros", "sparsity", "bits", "bytes",
            "MACs dense", "MACs effective"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["layers"]:
        lines.append("| " + " | ".join([
            r["layer"], r["kind"], _shape(r["shape"]), _int(r["params"]), _int(r["nonzeros"]),
            _pct(r["sparsity"]), str(r["bits"]), _int(r["bytes"]), _int(r["macs_dense"]),
            _int(r["macs_effective"])]) + " |")
    t = report["totals"]
    lines.append("| " + " | ".join([
        "**total**", "", "", _int(t["params"]), _int(t["nonzeros"]), _pct(t["sparsity"]),
        str(t["bits"]), _int(t["packed_bytes"]), _int(t["macs_dense"]),
        _int(t["macs_effective"])]) + " |")
    ratio = "-" if t["compression"] is None else f"{t['compression']:.1f}x"
    macs = "-" if t["mac_reduction"] is None else f"{t['mac_reduction']:.1f}x"
    summary = (f"\nstored {_int(t['packed_bytes'])} bytes vs {_int(t['dense_float32_bytes'])} float32 "
               f"dense ({ratio} smaller); effective MACs {macs} fewer. Bytes: kernel codes + "
               f"bit-mask + scales + the layer's bias (as `jaxaccel compress package` "
               f"stores them, before zlib).\n")
    return head + (("\n" + notes) if notes else "") + "\n" + "\n".join(lines) + "\n" + summary
