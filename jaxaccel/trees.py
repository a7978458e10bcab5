"""Naming the leaves of parameter pytrees, defined once for every module that needs it.

`path_str` turns a JAX key path into "conv1/kernel" (the names the config, masks, reports and
packages use), `named_leaves` flattens a tree into (name, leaf) pairs in JAX's order, and
`is_kernel` says which leaves are conv/dense kernels (what pruning and quantization act on).
Imports nothing of jaxaccel.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """'conv1/kernel' for the key path of ``params['conv1']['kernel']``."""
    return "/".join(_key_name(k) for k in keypath)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in JAX flattening order (dict keys sorted)."""
    return [(path_str(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_kernel(path: str, leaf: Any) -> bool:
    """Conv and dense kernels: leaf named ``kernel`` with ndim >= 2 (never biases or BN)."""
    ndim = leaf.ndim if hasattr(leaf, "ndim") else np.ndim(leaf)  # also ShapeDtypeStruct
    return path.rsplit("/", 1)[-1] == "kernel" and ndim >= 2
