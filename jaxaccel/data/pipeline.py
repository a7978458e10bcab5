"""From a random-access split to model-ready batches: normalisation, deterministic shuffled
training batches with augmentation, padded evaluation batches, and per-process slices.

Everything here is vectorised numpy over whole batches: the input pipeline has to stay far
ahead of a CPU training step (BENCHMARKS.md: the input table).

Owns `TrainBatches`, `eval_batches`, `normalize`, the sources (`ArraySource`, `Subset`) and
`validation_indices`. Imports only `data.catalog` (`DatasetSpec`); never models, compress,
state or anything above.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxaccel.data.catalog import BUILTIN_SPECS, CATALOG_SPECS, DatasetSpec

# Distinguishes the augmentation stream (seed, step) from the permutation stream (seed, epoch).
_AUGMENT_STREAM = 0x61756700
_READ_CHUNK = 4096


class ExampleSource:
    """A TFDS split as records `{"image": uint8 HWC array, "label": int}` with random access.

    Wraps a TFDS data source (len, `__getitem__`, `__getitems__`), dropping other features
    (ids, coarse labels) so every dataset looks the same to the pipeline.
    """

    def __init__(self, source: Any, *, name: str = "", split: str = "", files: str = ""):
        self._source = source
        self.name = name
        self.split = split
        self.files = files  # for error messages: which files hold this split

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _record(example: dict) -> dict:
        return {"image": np.asarray(example["image"], dtype=np.uint8), "label": int(example["label"])}

    def __getitem__(self, index: int) -> dict:
        try:
            return self._record(self._source[int(index)])
        except RuntimeError as e:  # array_record's report of a damaged file
            raise self._damaged(e) from e

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        try:
            records = self._source.__getitems__([int(i) for i in indices])
        except RuntimeError as e:
            raise self._damaged(e) from e
        return [self._record(e) for e in records]

    def _damaged(self, e: Exception) -> ValueError:
        reason = " ".join(str(e).split())[:300]
        return ValueError(f"dataset {self.name!r} split {self.split!r}: "
                          f"{self.files or 'its files'} cannot be read ({reason}); delete the "
                          f"prepared dataset directory and run again to rebuild it")

    def __repr__(self) -> str:
        return f"ExampleSource({self.name!r}, split={self.split!r}, len={len(self)})"


class ArraySource:
    """A split held in memory as arrays, with the random-access protocol the pipeline reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[int(index)], "label": int(self.labels[int(index)])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]


class Subset:
    """The examples of `source` at `indices`, in that order, with the same random-access
    protocol (len, `__getitem__`, `__getitems__`): a validation split, or the train split
    without it."""

    def __init__(self, source: Any, indices: Sequence[int] | np.ndarray, *, split: str = ""):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.split = split or getattr(source, "split", "")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[int(index)])]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        rows = [int(self.indices[int(i)]) for i in indices]
        if hasattr(self.source, "__getitems__"):
            return self.source.__getitems__(rows)
        return [self.source[i] for i in rows]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} examples, split={self.split!r})"


# Distinguishes the validation draw (validation_seed) from every other random stream.
_VALIDATION_STREAM = 0x76616C00


def read_labels(source: Any) -> np.ndarray:
    """Labels (N,) int32 of every example of `source`, in order."""
    return read_arrays(source, np.arange(len(source)))[1]


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train, validation)` example indices: a stratified, deterministic split of `labels`.

    round(fraction * N) examples (at least 1) are held out, each class contributing in
    proportion to its size (largest remainder, ties to the lower class index); which
    examples is drawn from `seed` alone. Both index arrays are sorted and disjoint, and
    together they cover every example once.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    total = max(1, int(round(fraction * n)))
    if total >= n:
        raise ValueError(f"validation_split={fraction} of {n} examples leaves none to train on")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (total / n)
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(classes)), -(exact - quota)))  # largest remainder first
    quota[order[: total - int(quota.sum())]] += 1
    rng = np.random.default_rng([int(seed), _VALIDATION_STREAM])
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, quota)]
    validation = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(n), validation, assume_unique=True)
    return train, validation


def read_arrays(source: Any, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,H,W,C) uint8 and labels (N,) int32 of `source` at `indices`, read in chunks."""
    indices = np.asarray(indices, dtype=np.int64)
    images, labels = [], []
    for start in range(0, len(indices), _READ_CHUNK):
        chunk = [int(i) for i in indices[start : start + _READ_CHUNK]]
        if hasattr(source, "__getitems__"):
            records = source.__getitems__(chunk)
        else:
            records = [source[i] for i in chunk]
        images.extend(np.asarray(r["image"], dtype=np.uint8) for r in records)
        labels.extend(int(r["label"]) for r in records)
    if not images:
        raise ValueError("read_arrays: no indices given")
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def _resolve_spec(spec: DatasetSpec | str) -> DatasetSpec:
    """A spec, or the name of a built-in / catalog dataset (image folders need their spec)."""
    if isinstance(spec, DatasetSpec):
        return spec
    known = {**BUILTIN_SPECS, **CATALOG_SPECS}
    if spec not in known:
        raise ValueError(f"dataset {spec!r} has no fixed spec; pass its DatasetSpec "
                         f"(data.dataset_spec(...)); known names: {', '.join(known)}")
    return known[spec]


def normalize(images: Any, spec: DatasetSpec | str) -> np.ndarray | jax.Array:
    """Pixels (uint8, or float in 0..255) -> float32 `(x/255 - mean) / std` per channel.

    numpy in gives numpy out (host pipeline); jax arrays and tracers give jax arrays, so the
    same function serves inside a jitted predict.
    """
    spec = _resolve_spec(spec)
    std = np.asarray(spec.std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (-np.asarray(spec.mean, np.float64) / std).astype(np.float32)
    if isinstance(images, jax.Array):
        return images.astype(jnp.float32) * scale + shift
    images = np.asarray(images)
    out = np.empty(images.shape, np.float32)
    np.multiply(images, scale, out=out, casting="unsafe")  # one pass, no temporaries
    out += shift
    return out


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
    """Validate a process layout; returns the per-process batch size."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})"
        )
    if batch_size % process_count:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by process_count={process_count}"
        )
    return batch_size // process_count


def random_crop(images: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
    """Zero-pad each image by `padding` and cut the original size at `offsets` (N,2) = (dy, dx).

    One strided gather over a sliding-window view of the padded batch (no per-image loop).
    """
    if padding == 0:
        return images
    n, h, w, c = images.shape
    padded = np.zeros((n, h + 2 * padding, w + 2 * padding, c), images.dtype)
    padded[:, padding : padding + h, padding : padding + w] = images
    windows = sliding_window_view(padded, (h, w), axis=(1, 2))  # (n, 2p+1, 2p+1, c, h, w)
    return windows[np.arange(n), offsets[:, 0], offsets[:, 1]].transpose(0, 2, 3, 1)


def horizontal_flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Mirror left-right the images where `flips` (N,) bool is set (returns a new array)."""
    out = np.array(images, copy=True)
    out[flips] = images[flips, :, ::-1]
    return out


class TrainBatches:
    """Deterministic, shuffled, augmented training batches; `batch(step)` is pure in (seed, step).

    Epoch e = step // steps_per_epoch uses the permutation of the split drawn from
    `np.random.default_rng([seed, e])`; the step's global rows are consecutive in it (the
    remainder of each epoch is dropped). Augmentation (random crop with zero padding,
    horizontal flip) is drawn from (seed, step) for the whole global batch, then each
    process keeps its contiguous slice, so the data never depends on `process_count`.
    """

    def __init__(
        self,
        source: Any,
        spec: DatasetSpec,
        *,
        global_batch_size: int,
        seed: int,
        crop_padding: int = 0,
        flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        cache: bool = True,
    ):
        self.local_batch_size = _check_processes(global_batch_size, process_index, process_count)
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.num_examples = len(source)
        if global_batch_size > self.num_examples:
            raise ValueError(
                f"global_batch_size={global_batch_size} exceeds the split's {self.num_examples} examples"
            )
        self.source = source
        self.spec = _resolve_spec(spec)
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.process_index = process_index
        self.process_count = process_count
        self.cache = cache
        self.steps_per_epoch = self.num_examples // global_batch_size
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._permutation: tuple[int, np.ndarray] | None = None
        self.extras: dict[str, np.ndarray] = {}

    def with_extras(self, extras: dict[str, np.ndarray]) -> "TrainBatches":
        """These batches, each also carrying `extras[name][i]` of its examples i (arrays over
        the split's examples, e.g. precomputed teacher logits); the data cache is shared."""
        for name, values in extras.items():
            if len(values) != self.num_examples:
                raise ValueError(f"extra {name!r} has {len(values)} rows for the split's "
                                 f"{self.num_examples} examples")
        if self.cache and self._arrays is None:  # load once, before the copy shares it
            self._arrays = read_arrays(self.source, np.arange(self.num_examples))
        out = copy.copy(self)
        out.extras = {**self.extras, **extras}
        return out

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._permutation = (epoch, perm)
        return self._permutation[1]

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the whole global batch at `step` (all processes, in order)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(int(step), self.steps_per_epoch)
        start = within * self.global_batch_size
        return self._epoch_permutation(epoch)[start : start + self.global_batch_size]

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.cache:
            return read_arrays(self.source, indices)
        if self._arrays is None:
            self._arrays = read_arrays(self.source, np.arange(self.num_examples))
        images, labels = self._arrays
        return images[indices], labels[indices]

    def batch(self, step: int) -> dict:
        """{"image": float32 normalized (B/process_count,H,W,C), "label": int32 (B/process_count,)}."""
        indices = self.global_indices(step)
        lo = self.process_index * self.local_batch_size
        hi = lo + self.local_batch_size
        images, labels = self._read(indices[lo:hi])
        if self.crop_padding or self.flip:
            rng = np.random.default_rng([self.seed, int(step), _AUGMENT_STREAM])
            n = self.global_batch_size
            if self.crop_padding:
                offsets = rng.integers(0, 2 * self.crop_padding + 1, size=(n, 2))
                images = random_crop(images, self.crop_padding, offsets[lo:hi])
            if self.flip:
                flips = rng.random(n) < 0.5
                images = horizontal_flip(images, flips[lo:hi])
        out = {"image": normalize(images, self.spec), "label": labels}
        for name, values in self.extras.items():
            out[name] = values[indices[lo:hi]]
        return out

    def __iter__(self) -> Iterator[dict]:
        """Batches from step 0 on, forever (use `batch(step)` to resume at a step)."""
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def eval_batches(
    source: Any,
    spec: DatasetSpec,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Every example exactly once, in order, as {"image", "label", "mask"} batches.

    `batch_size` is global: each process yields its contiguous slice of every global batch.
    The last global batch is padded to `batch_size` (zero images, label 0) with
    `mask` False on padding rows, so every batch has the same shape (no recompiles).
    """
    local = _check_processes(batch_size, process_index, process_count)
    spec = _resolve_spec(spec)
    n = len(source)
    for start in range(0, n, batch_size):
        lo = start + process_index * local
        valid = np.arange(lo, min(lo + local, n))
        labels = np.zeros(local, np.int32)
        mask = np.zeros(local, bool)
        if len(valid):
            images_valid, labels[: len(valid)] = read_arrays(source, valid)
            images = np.zeros((local,) + images_valid.shape[1:], np.uint8)
            images[: len(valid)] = images_valid
            mask[: len(valid)] = True
        else:
            images = np.zeros((local,) + tuple(spec.image_shape), np.uint8)
        yield {"image": normalize(images, spec), "label": labels, "mask": mask}
