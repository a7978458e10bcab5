"""Weight sharing: one layer's weights clustered by 1-D k-means into a few shared values.

This is the "trained quantization" step of Deep Compression (Han, Mao & Dally, "Deep
Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and Huffman
Coding", ICLR 2016, arXiv:1510.00149). A layer is stored as a float32 codebook of
``2**bits`` centroids plus a ``bits``-bit cluster index per kept weight, which `huffman`
then entropy-codes. Why: a 4-5 bit index per weight is 6-8x smaller than float32, and the
paper found the network keeps its accuracy after fine-tuning the centroids.

Pure numpy (numpy in, numpy out), one layer at a time:

* `kmeans_1d`: Lloyd's algorithm in float64 on the kept (unpruned) weights. Initialisation
  "linear" (centroids evenly spaced from the smallest to the largest kept weight; the paper
  found it best, because it keeps centroids for the rare large weights), "random" (kept
  weights drawn with ``seed``) or "density" (quantiles of the kept weights). Each weight goes
  to its nearest centroid, the smaller centroid on a tie. An empty cluster keeps its centroid.
* `shared_weights`: the layer rebuilt from centroids and assignments (pruned -> 0.0).
* `bits_to_clusters`: ``2**bits`` for an index width of 1-8 bits.

Imports only numpy; nothing else of the project.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

INITS = ("linear", "random", "density")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, valid: str = "") -> int:
    """``value`` as an int in [lo, hi] (bools are not ints here), else a one-line ValueError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if ok:
        value = int(value)
        ok = value >= lo and (hi is None or value <= hi)
    if not ok:
        valid = valid or (f"an int >= {lo}" if hi is None else f"an int in {lo}–{hi}")
        raise ValueError(f"invalid {name}={value!r}; valid: {valid}")
    return value


def _check_values(values: Any) -> np.ndarray:
    """``values`` as a finite float64 array (ints and floats accepted)."""
    x = np.asarray(values)
    if x.dtype.kind not in "iuf":
        raise ValueError(f"invalid values dtype={x.dtype}; valid: real (int or float) numbers")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"invalid value {float(x[where])} at index {where}; valid: finite numbers")
    return x


def _check_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, bool)
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != shape:
        raise ValueError(f"invalid mask (dtype={m.dtype}, shape={m.shape}); "
                         f"valid: a bool array of the values' shape {shape}")
    return m


def _initial_centroids(kept: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """k float64 centroids, sorted ascending, from the (non-empty) kept values."""
    if init == "linear":
        lo, hi = kept.min(), kept.max()
        # lo*(1-t) + hi*t is exactly lo at t=0 and exactly hi at t=1
        t = np.arange(k) / (k - 1) if k > 1 else np.array([0.5])
        c = lo * (1.0 - t) + hi * t
    elif init == "random":
        rng = np.random.default_rng(seed)
        c = rng.choice(kept, size=k, replace=kept.size < k)
    else:  # density: the values at evenly spaced levels of the empirical CDF
        c = np.quantile(kept, (np.arange(k) + 0.5) / k)
    return np.sort(c, kind="stable")


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted centroids ``c`` for each of ``x``: on equal distance
    the lower index (so among equal centroids, the first). O(n log k) memory O(n)."""
    k = c.size
    i = np.searchsorted(c, x, side="left")  # c[i-1] < x <= c[i]
    lo = np.clip(i - 1, 0, k - 1)
    hi = np.clip(i, 0, k - 1)
    j = np.where(np.abs(x - c[lo]) <= np.abs(x - c[hi]), lo, hi)
    return np.searchsorted(c, c[j], side="left")  # first of equal centroids


def _means(x: np.ndarray, idx: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Each cluster's mean (summed in value order); an empty cluster keeps its centroid."""
    k = c.size
    sums = np.bincount(idx, weights=x, minlength=k)
    counts = np.bincount(idx, minlength=k)
    new = c.copy()
    full = counts > 0
    new[full] = sums[full] / counts[full]
    return new


def kmeans_1d(values: np.ndarray, num_clusters: int, *, init: str = "linear", iters: int = 30,
              mask: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means of one layer's weights: ``(centroids, assignments)``.

    ``centroids``: float32, shape ``(num_clusters,)``, sorted ascending (duplicates possible
    when there are fewer distinct kept values than clusters). ``assignments``: int32 of the
    values' shape, the centroid index of every value, -1 where ``mask`` is False (pruned
    weights neither move centroids nor get a cluster). Computed in float64 with up to
    ``iters`` Lloyd iterations (update each centroid to its cluster's mean, reassign), stopping
    early once the assignments stop changing; the returned assignments are always the nearest
    (the smaller on a tie) of the centroids before the float32 cast. With no kept values the
    centroids are zeros and every assignment is -1.
    """
    x = _check_values(values)
    k = _check_int("num_clusters", num_clusters, 1)
    if init not in INITS:
        raise ValueError(f"unknown init={init!r}; valid choices: {', '.join(map(repr, INITS))}")
    iters = _check_int("iters", iters, 0)
    keep = _check_mask(mask, x.shape)
    assignments = np.full(x.shape, -1, np.int32)
    kept = x[keep]
    if kept.size == 0:
        return np.zeros(k, np.float32), assignments
    c = _initial_centroids(kept, k, init, seed)
    idx = _nearest(kept, c)
    for _ in range(iters):
        c = _means(kept, idx, c)
        # 1-D Lloyd keeps the centroids in order; the stable sort only guards rounding
        order = np.argsort(c, kind="stable")
        if (order != np.arange(k)).any():
            c = c[order]
        new = _nearest(kept, c)
        if np.array_equal(new, idx):
            break
        idx = new
    assignments[keep] = idx
    return c.astype(np.float32), assignments


def bits_to_clusters(bits: int) -> int:
    """The number of clusters a ``bits``-bit index addresses: ``2**bits`` (bits in 1–8)."""
    return 2 ** _check_int("bits", bits, 1, 8, valid="an int in 1–8")


def shared_weights(centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """The layer rebuilt from its codebook: ``centroids[assignments]`` as float32, with 0.0
    where the assignment is -1 (pruned)."""
    c = np.asarray(centroids, np.float32)
    a = np.asarray(assignments)
    if c.ndim != 1:
        raise ValueError(f"invalid centroids shape {c.shape}; valid: one dimension")
    if a.dtype.kind not in "iu":
        raise ValueError(f"invalid assignments dtype={a.dtype}; valid: integers")
    if a.size and (a.min() < -1 or a.max() >= c.size):
        bad = a.min() if a.min() < -1 else a.max()
        valid = f"-1 (pruned) or 0–{c.size - 1}" if c.size else "-1 (pruned), no centroids"
        raise ValueError(f"invalid assignment {int(bad)}; valid: {valid}")
    table = np.append(c, np.float32(0.0))  # index -1 reads the trailing 0.0
    return table[a.astype(np.int64)]
