"""Tests for jaxaccel.compress.cluster: k-means against a plain reference, masks, inits, errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxaccel.compress import cluster

SETTINGS = settings(max_examples=60, deadline=None)


def reference_kmeans(values, mask, k, iters, init_centroids=None):
    """Straightforward 1-D Lloyd's algorithm in Python floats (float64), written out:
    linear initialisation from min to max of the kept values (or the given centroids),
    nearest centroid with the lower index on a tie, an empty cluster keeps its centroid,
    stop when the assignments no longer change. Returns (centroids, assignments) lists."""
    flat = [float(v) for v in np.asarray(values, np.float64).ravel()]
    keep = [bool(m) for m in np.asarray(mask).ravel()]
    kept = [v for v, m in zip(flat, keep) if m]
    if init_centroids is None:
        lo, hi = min(kept), max(kept)
        ts = [i / (k - 1) for i in range(k)] if k > 1 else [0.5]
        cents = [lo * (1.0 - t) + hi * t for t in ts]
    else:
        cents = [float(c) for c in init_centroids]
    cents = sorted(cents)

    def assign(cs):
        out = []
        for v in kept:
            best, best_d = 0, abs(v - cs[0])
            for j in range(1, len(cs)):
                d = abs(v - cs[j])
                if d < best_d:
                    best, best_d = j, d
            out.append(best)
        return out

    labels = assign(cents)
    for _ in range(iters):
        sums, counts = [0.0] * k, [0] * k
        for v, j in zip(kept, labels):
            sums[j] += v
            counts[j] += 1
        cents = [sums[j] / counts[j] if counts[j] else cents[j] for j in range(k)]
        new = assign(cents)
        if new == labels:
            break
        labels = new
    it = iter(labels)
    full = [next(it) if m else -1 for m in keep]
    return cents, full


# values on a 1/256 grid in [-8, 8]: float32-exact, and far from rounding-level near-ties
grid = st.integers(-2048, 2048).map(lambda i: i / 256)


@st.composite
def layers(draw, max_size=60, masked=True):
    n = draw(st.integers(1, max_size))
    values = np.array(draw(st.lists(grid, min_size=n, max_size=n)), np.float32)
    if draw(st.booleans()):
        values = values.reshape(-1, 1) if n % 2 else values.reshape(2, n // 2)
    mask = None
    if masked and draw(st.booleans()):
        mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
        mask = mask.reshape(values.shape)
        mask.flat[draw(st.integers(0, n - 1))] = True  # at least one kept value
    return values, mask


@SETTINGS
@given(layers(), st.integers(1, 10), st.integers(0, 30))
def test_linear_matches_reference(layer, k, iters):
    values, mask = layer
    cents, assign = cluster.kmeans_1d(values, k, iters=iters, mask=mask)
    keep = np.ones(values.shape, bool) if mask is None else mask
    ref_c, ref_a = reference_kmeans(values, keep, k, iters)
    assert cents.dtype == np.float32 and cents.shape == (k,)
    assert assign.dtype == np.int32 and assign.shape == values.shape
    assert np.all(np.diff(cents) >= 0)
    np.testing.assert_array_equal(assign.ravel(), ref_a)
    np.testing.assert_allclose(cents, np.float32(ref_c), rtol=1e-6, atol=1e-7)


@SETTINGS
@given(layers(masked=False), st.integers(1, 8))
def test_density_matches_reference_from_quantiles(layer, k):
    values, _ = layer
    cents, assign = cluster.kmeans_1d(values, k, init="density")
    quantiles = np.quantile(values.astype(np.float64).ravel(), (np.arange(k) + 0.5) / k)
    ref_c, ref_a = reference_kmeans(values, np.ones(values.shape, bool), k, 30, quantiles)
    # Quantiles can coincide (repeated values): which of two equal centroids takes the
    # weights is arbitrary, so compare the shared value of every weight, and the codebooks.
    np.testing.assert_allclose(cents[assign.ravel()], np.float32(ref_c)[ref_a],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.sort(cents), np.sort(np.float32(ref_c)), rtol=1e-6, atol=1e-7)


@SETTINGS
@given(layers(), st.integers(1, 12), st.sampled_from(cluster.INITS), st.integers(0, 5))
def test_assignments_are_nearest_and_valid(layer, k, init, seed):
    values, mask = layer
    cents, assign = cluster.kmeans_1d(values, k, init=init, mask=mask, seed=seed)
    keep = np.ones(values.shape, bool) if mask is None else mask
    assert np.all(np.diff(cents) >= 0)
    assert np.all(assign[~keep] == -1)
    a = assign[keep]
    assert a.min() >= 0 and a.max() < k
    dist = np.abs(values[keep][:, None].astype(np.float64) - cents[None, :].astype(np.float64))
    chosen = dist[np.arange(a.size), a]
    assert np.all(chosen <= dist.min(axis=1) + 1e-6)


def test_tie_goes_to_smaller_centroid():
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0], np.float32)  # linear init: 0, 2, 4
    _, assign = cluster.kmeans_1d(values, 3, iters=0)
    np.testing.assert_array_equal(assign, [0, 0, 1, 1, 2])
    cents, assign = cluster.kmeans_1d(values, 3)
    ref_c, ref_a = reference_kmeans(values, np.ones(5, bool), 3, 30)
    np.testing.assert_array_equal(assign, ref_a)
    np.testing.assert_allclose(cents, np.float32(ref_c), rtol=1e-6)


def test_masked_weights_do_not_move_centroids():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(20, 30)).astype(np.float32)
    mask = rng.random(values.shape) < 0.4
    wild = np.where(mask, values, np.float32(1e6))  # pruned entries far outside the kept range
    for init in cluster.INITS:
        cents, assign = cluster.kmeans_1d(wild, 8, init=init, mask=mask, seed=3)
        alone_c, alone_a = cluster.kmeans_1d(values[mask], 8, init=init, seed=3)
        np.testing.assert_array_equal(cents, alone_c)
        np.testing.assert_array_equal(assign[mask], alone_a)
        assert np.all(assign[~mask] == -1)
        assert np.all(cluster.shared_weights(cents, assign)[~mask] == 0.0)


@SETTINGS
@given(layers(), st.integers(2, 16))
def test_linear_init_spans_min_to_max(layer, k):
    values, mask = layer
    keep = np.ones(values.shape, bool) if mask is None else mask
    cents, _ = cluster.kmeans_1d(values, k, iters=0, mask=mask)
    kept = values[keep]
    assert cents[0] == kept.min() and cents[-1] == kept.max()
    step = (np.float64(kept.max()) - kept.min()) / (k - 1)
    np.testing.assert_allclose(np.diff(cents.astype(np.float64)), step, rtol=1e-5, atol=1e-6)


def test_linear_init_single_cluster_is_the_mean():
    values = np.array([1.0, 2.0, 6.0], np.float32)
    cents, assign = cluster.kmeans_1d(values, 1, iters=0)
    np.testing.assert_array_equal(cents, [3.5])  # midpoint of min and max
    cents, assign = cluster.kmeans_1d(values, 1)
    np.testing.assert_array_equal(cents, [3.0])
    np.testing.assert_array_equal(assign, [0, 0, 0])


def test_random_init_draws_kept_values_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(size=200).astype(np.float32)
    mask = rng.random(200) < 0.5
    c0, _ = cluster.kmeans_1d(values, 8, init="random", iters=0, mask=mask, seed=7)
    assert set(c0.tolist()) <= set(values[mask].tolist())
    again, _ = cluster.kmeans_1d(values, 8, init="random", iters=0, mask=mask, seed=7)
    other, _ = cluster.kmeans_1d(values, 8, init="random", iters=0, mask=mask, seed=8)
    np.testing.assert_array_equal(c0, again)
    assert not np.array_equal(c0, other)


@SETTINGS
@given(layers(max_size=40), st.integers(1, 5), st.sampled_from(cluster.INITS))
def test_shared_weights_has_at_most_2_bits_values(layer, bits, init):
    values, mask = layer
    k = cluster.bits_to_clusters(bits)
    cents, assign = cluster.kmeans_1d(values, k, init=init, mask=mask)
    shared = cluster.shared_weights(cents, assign)
    keep = np.ones(values.shape, bool) if mask is None else mask
    assert shared.dtype == np.float32 and shared.shape == values.shape
    assert np.unique(shared[keep]).size <= 2 ** bits
    assert set(np.unique(shared[keep]).tolist()) <= set(cents.tolist())
    assert np.all(shared[~keep] == 0.0)


def test_fewer_distinct_values_than_clusters():
    values = np.array([[0.5, 0.5, -1.0], [0.5, -1.0, 0.5]], np.float32)
    for init in cluster.INITS:
        cents, assign = cluster.kmeans_1d(values, 8, init=init)
        assert assign.min() >= 0 and assign.max() < 8
        np.testing.assert_array_equal(cluster.shared_weights(cents, assign), values)
    cents, assign = cluster.kmeans_1d(np.full(5, 2.0, np.float32), 4)
    np.testing.assert_array_equal(cents, [2.0] * 4)  # duplicates, all assigned to the first
    np.testing.assert_array_equal(assign, [0] * 5)


def test_kmeans_reduces_error_and_converges():
    rng = np.random.default_rng(2)
    values = rng.normal(size=5000).astype(np.float32)
    c0, a0 = cluster.kmeans_1d(values, 16, iters=0)
    c1, a1 = cluster.kmeans_1d(values, 16, iters=10_000)  # converges long before
    err0 = np.mean((cluster.shared_weights(c0, a0) - values) ** 2)
    err1 = np.mean((cluster.shared_weights(c1, a1) - values) ** 2)
    assert err1 < err0
    for j in range(16):  # a fixed point: each centroid is its cluster's mean
        np.testing.assert_allclose(c1[j], values[a1 == j].astype(np.float64).mean(), rtol=1e-6)
    c2, a2 = cluster.kmeans_1d(values, 16, iters=20_000)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)


def test_no_kept_values():
    values = np.ones((3, 4), np.float32)
    cents, assign = cluster.kmeans_1d(values, 4, mask=np.zeros((3, 4), bool))
    np.testing.assert_array_equal(cents, np.zeros(4, np.float32))
    assert np.all(assign == -1)
    np.testing.assert_array_equal(cluster.shared_weights(cents, assign), np.zeros((3, 4)))


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "4", None])
def test_bad_num_clusters(k):
    with pytest.raises(ValueError, match=rf"num_clusters={k!r}.*int >= 1"):
        cluster.kmeans_1d(np.ones(4), k)


def test_bad_init():
    with pytest.raises(ValueError, match=r"init='kmeans\+\+'.*'linear', 'random', 'density'"):
        cluster.kmeans_1d(np.ones(4), 2, init="kmeans++")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    values = np.zeros((2, 3), np.float32)
    values[1, 2] = bad
    with pytest.raises(ValueError, match=rf"value {bad}.*\(1, 2\).*finite"):
        cluster.kmeans_1d(values, 2)


def test_bad_mask_iters_and_dtype():
    with pytest.raises(ValueError, match=r"mask.*shape=\(3,\).*\(4,\)"):
        cluster.kmeans_1d(np.ones(4), 2, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"mask.*dtype=int64"):
        cluster.kmeans_1d(np.ones(4), 2, mask=np.ones(4, np.int64))
    with pytest.raises(ValueError, match=r"iters=-1"):
        cluster.kmeans_1d(np.ones(4), 2, iters=-1)
    with pytest.raises(ValueError, match=r"dtype=complex128"):
        cluster.kmeans_1d(np.ones(4, complex), 2)


@pytest.mark.parametrize("bits", [0, 9, -1, 3.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=rf"bits={bits!r}.*1–8"):
        cluster.bits_to_clusters(bits)


def test_bits_to_clusters():
    assert [cluster.bits_to_clusters(b) for b in range(1, 9)] == [2 ** b for b in range(1, 9)]
    assert cluster.bits_to_clusters(np.int64(5)) == 32


def test_shared_weights_rejects_bad_assignments():
    with pytest.raises(ValueError, match=r"assignment 4.*0–3"):
        cluster.shared_weights(np.zeros(4, np.float32), np.array([0, 4]))
    with pytest.raises(ValueError, match=r"assignment -2"):
        cluster.shared_weights(np.zeros(4, np.float32), np.array([-2, 0]))
