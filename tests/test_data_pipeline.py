"""jaxaccel.data.pipeline: normalisation, training batches (deterministic per seed and step,
epochs, augmentation, each process's rows), evaluation batches, and the validation split
(stratified, deterministic, disjoint from training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxaccel.data as data
from jaxaccel.data import DatasetSpec, TrainBatches, eval_batches

class ListSource(list):
    """A minimal random-access source: a list of {"image", "label"} records."""


def _synthetic_source(n: int, shape=(4, 5, 3), seed: int = 0) -> ListSource:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return ListSource({"image": images[i], "label": i} for i in range(n))


SYNTH_SPEC = DatasetSpec("synthetic", 1000, (4, 5, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "builtin")


def test_normalize_numpy_jax_and_jit():
    spec = SYNTH_SPEC
    images = np.array([0, 255, 51, 128], np.uint8).reshape(1, 2, 2, 1).repeat(3, axis=-1)
    expected = (images.astype(np.float64) / 255 - np.array(spec.mean)) / np.array(spec.std)
    out_np = data.normalize(images, spec)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, expected, rtol=1e-5, atol=1e-5)
    out_jnp = data.normalize(jnp.asarray(images), spec)
    assert isinstance(out_jnp, jax.Array) and out_jnp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jnp), expected, rtol=1e-5, atol=1e-5)
    out_jit = jax.jit(lambda x: data.normalize(x, spec))(images.astype(np.float32))
    np.testing.assert_allclose(np.asarray(out_jit), expected, rtol=1e-5, atol=1e-5)
    by_name = data.normalize(np.full((1, 8, 8, 1), 255, np.uint8), "digits")
    np.testing.assert_allclose(by_name, (1 - 0.305434) / 0.375957, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------
def test_train_batches_deterministic_and_epoch_cover():
    source = data.get_source("digits", "train")
    spec = data.dataset_spec("digits")
    a = TrainBatches(source, spec, global_batch_size=100, seed=3)
    b = TrainBatches(source, spec, global_batch_size=100, seed=3)
    assert a.steps_per_epoch == 14
    for step in (0, 5, 14, 31):
        np.testing.assert_array_equal(a.batch(step)["image"], b.batch(step)["image"])
        np.testing.assert_array_equal(a.batch(step)["label"], b.batch(step)["label"])
    first = a.batch(0)
    assert first["image"].shape == (100, 8, 8, 1) and first["image"].dtype == np.float32
    assert first["label"].dtype == np.int32 and first["label"].min() >= 0 and first["label"].max() < 10
    assert not np.array_equal(a.batch(1)["image"], first["image"])
    other_seed = TrainBatches(source, spec, global_batch_size=100, seed=4)
    assert not np.array_equal(other_seed.batch(0)["label"], first["label"])
    # One epoch: distinct examples, 14 * 100 of them; the next epoch is a new order.
    epoch = np.concatenate([a.global_indices(s) for s in range(a.steps_per_epoch)])
    assert len(np.unique(epoch)) == 1400 and epoch.max() < 1437
    assert not np.array_equal(a.global_indices(14), a.global_indices(0))
    # The batch holds exactly the examples it names.
    x_all, y_all = data.read_arrays(source, np.arange(len(source)))
    idx = a.global_indices(5)
    np.testing.assert_array_equal(a.batch(5)["label"], y_all[idx])
    np.testing.assert_allclose(a.batch(5)["image"], data.normalize(x_all[idx], spec))


def test_train_batches_uncached_equals_cached():
    source = data.get_source("digits", "train")
    spec = data.dataset_spec("digits")
    kw = dict(global_batch_size=64, seed=1, crop_padding=1, flip=True)
    cached, direct = TrainBatches(source, spec, **kw), TrainBatches(source, spec, cache=False, **kw)
    for step in (0, 22, 23):
        np.testing.assert_array_equal(cached.batch(step)["image"], direct.batch(step)["image"])
        np.testing.assert_array_equal(cached.batch(step)["label"], direct.batch(step)["label"])


def test_each_process_reads_only_its_rows():
    """What every process of the job does with the training split (uncached, as in a job)."""
    source = data.get_source("digits", "train")

    class Recording:
        def __init__(self):
            self.read = []

        def __len__(self):
            return len(source)

        def __getitems__(self, indices):
            self.read.extend(indices)
            return source.__getitems__(indices)

    spec = data.dataset_spec("digits")
    seen = []
    for pid in (0, 1):
        rec = Recording()
        batches = data.TrainBatches(rec, spec, global_batch_size=64, seed=0, process_index=pid,
                                    process_count=2, cache=False)
        batch = batches.batch(7)
        rows = batches.global_indices(7)[pid * 32:(pid + 1) * 32]
        assert sorted(rec.read) == sorted(int(i) for i in rows)
        assert batch["label"].shape == (32,)
        seen.extend(rec.read)
    assert sorted(seen) == sorted(int(i) for i in batches.global_indices(7))


@settings(max_examples=25, deadline=None)
@given(
    process_count=st.sampled_from([1, 2, 4]),
    step=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
    crop_padding=st.integers(0, 2),
    flip=st.booleans(),
)
def test_process_slices_concatenate_to_global_batch(process_count, step, seed, crop_padding, flip):
    source = _synthetic_source(50)
    kw = dict(global_batch_size=8, seed=seed, crop_padding=crop_padding, flip=flip)
    whole = TrainBatches(source, SYNTH_SPEC, **kw).batch(step)
    parts = [
        TrainBatches(source, SYNTH_SPEC, process_index=i, process_count=process_count, **kw).batch(step)
        for i in range(process_count)
    ]
    assert all(p["image"].shape == (8 // process_count, 4, 5, 3) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])


@settings(max_examples=25, deadline=None)
@given(step=st.integers(0, 100), seed=st.integers(0, 1000), padding=st.integers(1, 3))
def test_augmentation_is_crop_of_padded_or_mirror(step, seed, padding):
    source = _synthetic_source(20)
    raw = np.stack([r["image"] for r in source])
    batches = TrainBatches(source, SYNTH_SPEC, global_batch_size=10, seed=seed, crop_padding=padding, flip=True)
    plain = TrainBatches(source, SYNTH_SPEC, global_batch_size=10, seed=seed)
    out = batches.batch(step)
    np.testing.assert_array_equal(out["label"], plain.batch(step)["label"])
    h, w = raw.shape[1:3]
    for image, label in zip(out["image"], out["label"]):
        padded = np.pad(raw[label], ((padding, padding), (padding, padding), (0, 0)))
        candidates = [
            data.normalize(view, SYNTH_SPEC)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            for view in (padded[dy : dy + h, dx : dx + w], padded[dy : dy + h, dx : dx + w][:, ::-1])
        ]
        assert any(np.array_equal(image, c) for c in candidates)


def test_augmentation_varies():
    source = _synthetic_source(20)
    batches = TrainBatches(source, SYNTH_SPEC, global_batch_size=20, seed=0, crop_padding=2, flip=True)
    plain = TrainBatches(source, SYNTH_SPEC, global_batch_size=20, seed=0)
    changed = ~np.all(batches.batch(0)["image"] == plain.batch(0)["image"], axis=(1, 2, 3))
    assert 5 < changed.sum()  # P(unchanged) = 1/25 * 1/2 per image


def test_train_batches_bad_arguments():
    source = _synthetic_source(20)
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by process_count=4"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="exceeds"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=32, seed=0)
    with pytest.raises(ValueError, match="step"):
        TrainBatches(source, SYNTH_SPEC, global_batch_size=8, seed=0).batch(-1)


# ---------------------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), per_process=st.integers(1, 8), process_count=st.sampled_from([1, 2, 4]))
def test_eval_batches_cover_every_example_once(n, per_process, process_count):
    source = _synthetic_source(n)
    batch_size = per_process * process_count
    per_proc = [
        list(eval_batches(source, SYNTH_SPEC, batch_size=batch_size, process_index=i, process_count=process_count))
        for i in range(process_count)
    ]
    num_batches = -(-n // batch_size)
    assert all(len(b) == num_batches for b in per_proc)
    seen = []
    for k in range(num_batches):
        parts = [per_proc[i][k] for i in range(process_count)]
        for p in parts:
            assert p["image"].shape == (per_process, 4, 5, 3) and p["image"].dtype == np.float32
            assert p["mask"].dtype == bool and p["label"].dtype == np.int32
        labels = np.concatenate([p["label"] for p in parts])
        mask = np.concatenate([p["mask"] for p in parts])
        images = np.concatenate([p["image"] for p in parts])
        seen.extend(labels[mask].tolist())
        for label, image in zip(labels[mask], images[mask]):
            np.testing.assert_array_equal(image, data.normalize(source[label]["image"], SYNTH_SPEC))
    assert seen == list(range(n))  # in order, each once (labels are the indices)


def test_eval_batches_bad_batch_size():
    with pytest.raises(ValueError, match="not divisible"):
        next(eval_batches(_synthetic_source(4), SYNTH_SPEC, batch_size=3, process_count=2))


# ---------------------------------------------------------------------------------------
# The validation split
# ---------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=12),
       fraction=st.floats(0.01, 0.6), seed=st.integers(0, 2**31))
def test_split_sizes_stratification_disjointness_determinism(counts, fraction, seed):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    n = len(labels)
    if max(1, round(fraction * n)) >= n:
        with pytest.raises(ValueError, match="leaves none to train on"):
            data.validation_indices(labels, fraction, seed)
        return
    train, val = data.validation_indices(labels, fraction, seed)
    assert len(val) == max(1, round(fraction * n)) and len(train) + len(val) == n
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(n))
    assert np.all(np.diff(val) > 0) and np.all(np.diff(train) > 0)
    share = len(val) / n  # every class gives its share, to within one example
    for c, count in enumerate(counts):
        assert abs(np.sum(labels[val] == c) - share * count) < 1
    again_train, again_val = data.validation_indices(labels, fraction, seed)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)


def test_another_seed_holds_out_other_examples():
    labels = np.repeat(np.arange(10), 50)
    _, a = data.validation_indices(labels, 0.2, 0)
    _, b = data.validation_indices(labels, 0.2, 1)
    assert len(a) == len(b) == 100 and not np.array_equal(a, b)
