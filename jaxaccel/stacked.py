"""K train states stacked on a leading axis, trained as one compiled program.

`StackedRunner` is the runner `loop.train_loop` drives for a vectorized sweep (K points that
differ only in shape-preserving hyperparameters and seeds) and for anything else that trains
K models of one architecture at once. Each point k sees exactly the batches its own
`jaxaccel train` run would (`StackedBatches`: `TrainBatches(seed_k)`), one compile, one input
pipeline, one pass over the evaluation splits, one dispatch per block of S steps.

Two ways to run the K points inside the program (`mode`, chosen by `choose_plan`):
  * "vmap": `jax.vmap` over the points at every step, scanned over S steps — what fills a
    GPU/TPU with small models; with several devices and K a multiple of them, each device
    holds K/N whole points ("points" layout, no collectives).
  * "loop": `lax.map` over the points of a `lax.scan` over the S steps — each point's state
    stays in cache for S steps, and it computes what the sequential run computes bit for bit.
"auto" follows what measured faster on XLA:CPU (BENCHMARKS.md, the sweep tables): scanned
"loop" blocks for dense models (their states overflow the cache when vmapped), one vmapped step
per dispatch for convolutional ones (XLA:CPU runs convs inside while loops slowly). GPU/TPU:
"vmap".

Imports data, parallel and the loop's `Evaluator` (the step functions come from its callers);
never the pipeline, sweeps or the CLI.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import data, parallel
from jaxaccel.loop import Evaluator

MODES = ("auto", "vmap", "loop")
BLOCK_BYTES = 64 << 20  # input data of one block (all points, S steps) stays below this
MAX_BLOCK_STEPS = 100


# ----------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------
def choose_plan(num_points: int, num_devices: int, mode: str = "auto",
                backend: str | None = None, convolutional: bool = False) -> tuple[str, str, bool]:
    """(mode, layout, scan): how the program runs the K points.

    mode "auto": "vmap" on GPU/TPU; on CPU "loop" for models without convolutions and
    "vmap" for models with them. `scan`: several steps per dispatch (`lax.scan`), except
    for convolutions on CPU. Layout "points" (each device holds K/N whole points) for vmap
    over several devices when N divides K, else "batch" (each point's batch split over the
    devices, states replicated)."""
    if mode not in MODES:
        raise ValueError(f"vectorize mode={mode!r} is not valid; choose one of: "
                         f"{', '.join(MODES)}")
    cpu = (backend or jax.default_backend()) == "cpu"
    if mode == "auto":
        mode = "vmap" if convolutional or not cpu else "loop"
    scan = mode == "loop" or not (cpu and convolutional)
    points = mode == "vmap" and num_devices > 1 and num_points % num_devices == 0
    return mode, "points" if points else "batch", scan


def block_steps(intervals: Sequence[int], num_points: int, batch_size: int,
                example_bytes: int, start: int = 0) -> int:
    """Steps per dispatch: the largest divisor of every interval the loop must stop at (log,
    eval, checkpoint, end, resume step) within MAX_BLOCK_STEPS and BLOCK_BYTES of block input
    (`example_bytes` per example and point)."""
    g = math.gcd(*intervals, start) or 1
    fit = BLOCK_BYTES // max(num_points * batch_size * example_bytes, 1)
    limit = max(1, min(MAX_BLOCK_STEPS, fit))
    return max(d for d in range(1, min(g, limit) + 1) if g % d == 0)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
class StackedBatches:
    """Point k's `TrainBatches(seed_k).batch(step)` for every point and a block of steps.

    The split is read once. Without augmentation the split goes to the device once, as
    uint8, with a 256-entry table of `data.normalize`'s float32 values per channel; a
    block is then just the K points' index sets (`TrainBatches.global_indices`) and the
    program gathers and looks up its batches (`materialize`): bit for bit
    `TrainBatches.batch`, without shipping float images (copying float blocks to the CPU
    "device" measured slower than the gather they would save).
    With augmentation (crop/flip, drawn by numpy) each distinct seed has its own cached
    `TrainBatches` (one copy of the split per seed) and blocks carry the float images.
    """

    def __init__(self, source: Any, spec: data.DatasetSpec, seeds: Sequence[int], *,
                 batch_size: int, crop_padding: int = 0, flip: bool = False):
        images, labels = data.read_arrays(source, np.arange(len(source)))
        self.spec = spec
        self.seeds = [int(s) for s in seeds]
        self.on_device = not (crop_padding or flip)
        memory = data.ArraySource(images, labels)
        self.pipelines = {
            s: data.TrainBatches(memory, spec, global_batch_size=batch_size, seed=s,
                                 crop_padding=crop_padding, flip=flip,
                                 cache=not self.on_device)
            for s in dict.fromkeys(self.seeds)}
        self.images, self.labels = images, labels
        self.steps_per_epoch = next(iter(self.pipelines.values())).steps_per_epoch
        self.example_bytes = 4 * (1 if self.on_device else int(np.prod(spec.image_shape)) + 1)

    def arrays(self) -> dict:
        """What `materialize` reads on the device: the split and the normalisation table."""
        if not self.on_device:
            return {}
        channels = self.images.shape[-1]
        values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, channels))
        return {"images": self.images, "labels": self.labels,
                "table": data.normalize(np.ascontiguousarray(values), self.spec)}

    def block(self, start: int, steps: int, *, points_first: bool) -> dict:
        """Steps `start .. start+steps-1` of every point, leading axes (K, S) if
        `points_first` else (S, K): `{"index": (.., B)}` or `{"image", "label"}`."""
        if not self.on_device:
            rows = [[self.pipelines[s].batch(t) for s in self.seeds]
                    for t in range(start, start + steps)]
            out = jax.tree.map(lambda *xs: np.stack(xs), *[jax.tree.map(
                lambda *ys: np.stack(ys), *row) for row in rows])  # (S, K, ...)
            return jax.tree.map(lambda x: np.ascontiguousarray(np.swapaxes(x, 0, 1)),
                                out) if points_first else out
        idx = np.stack([np.stack([self.pipelines[s].global_indices(t) for s in self.seeds])
                        for t in range(start, start + steps)]).astype(np.int32)  # (S, K, B)
        return {"index": np.ascontiguousarray(np.swapaxes(idx, 0, 1)) if points_first else idx}


def materialize(arrays: dict, batch: dict) -> dict:
    """A model-ready batch from a block entry: gather + table look-up, or as given."""
    if "index" not in batch:
        return batch
    pixels = arrays["images"][batch["index"]].astype(jnp.int32)
    channels = jnp.arange(pixels.shape[-1])
    return {"image": arrays["table"][pixels, channels], "label": arrays["labels"][batch["index"]]}


def make_block_fn(step_fn: Callable, mode: str, scan: bool = True) -> Callable:
    """`(states, block, hp, arrays) -> (states, metrics)`: S steps of every point, each
    batch `materialize`d from `arrays`; metrics (S, K).

    "loop": block leaves are (K, S, B, ...); "vmap": (S, K, B, ...); without `scan` (vmap
    only) S is 1 and the program has no loop at all.
    """
    def point_step(state, entry, h, arrays):
        return step_fn(state, materialize(arrays, entry), h)

    if mode == "loop":
        def run(states, block, hp, arrays):
            def point(args):
                state, entries, h = args
                return jax.lax.scan(lambda st, e: point_step(st, e, h, arrays), state, entries)
            states, m = jax.lax.map(point, (states, block, hp))
            return states, jax.tree.map(lambda x: x.T, m)
    elif scan:
        def run(states, block, hp, arrays):
            one = jax.vmap(point_step, in_axes=(0, 0, 0, None))
            return jax.lax.scan(lambda st, e: one(st, e, hp, arrays), states, block)
    else:
        def run(states, block, hp, arrays):
            one = jax.vmap(point_step, in_axes=(0, 0, 0, None))
            states, m = one(states, jax.tree.map(lambda x: x[0], block), hp, arrays)
            return states, jax.tree.map(lambda x: x[None], m)
    return run


# ----------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------
def state_shardings(abstract: Any, mesh: jax.sharding.Mesh, layout: str) -> Any:
    """Where stacked states live: "points", K over the devices (whole points per device);
    "batch", replicated (each point's batch is split over the devices instead)."""
    P = jax.sharding.PartitionSpec
    sharding = (jax.sharding.NamedSharding(mesh, P(parallel.AXIS)) if layout == "points"
                else parallel.replicated(mesh))
    return jax.tree.map(lambda _: sharding, abstract)


class StackedRunner:
    """K stacked states, their step and eval programs, placed on `mesh` (see `choose_plan`).

    `step_fn(state, batch, hp) -> (state, metrics)` is ONE point's train step, with its
    per-point hyperparameters `hp` (a dict of (K,) arrays; {} when none differ);
    `eval_fn(state, batch)` one point's eval sums. The runner vmaps / maps them over the
    points, compiles a block of `block` steps ahead of time (`compile_seconds`) and gives
    `loop.train_loop` what it asks of a runner.
    """

    def __init__(self, step_fn: Callable, eval_fn: Callable, abstract: Any,
                 batches: StackedBatches, hp: dict[str, np.ndarray], mesh: jax.sharding.Mesh, *,
                 mode: str, layout: str, scan: bool, block: int, start: int, num_steps: int):
        self.points = len(batches.seeds)
        self.batches, self.block, self.mode = batches, block, mode
        self.steps_per_epoch = batches.steps_per_epoch
        # XLA:CPU can deadlock in a collective's rendezvous with two multi-device programs
        # in flight; wait for each block there.
        self.sync_each_call = jax.default_backend() == "cpu" and mesh.devices.size > 1
        P, rep = jax.sharding.PartitionSpec, parallel.replicated(mesh)
        per_point = jax.sharding.NamedSharding(mesh, P(parallel.AXIS))
        self.state_sharding = state_shardings(abstract, mesh, layout)
        if layout == "points":  # vmap only: K over the devices, whole points per device
            self.block_sharding = jax.sharding.NamedSharding(mesh, P(None, parallel.AXIS))
            hp_sh, self.eval_batch_sharding = per_point, rep
            metrics_sh = jax.sharding.NamedSharding(mesh, P(None, parallel.AXIS))
        else:  # states replicated; each point's batch split over the devices
            self.block_sharding = jax.sharding.NamedSharding(mesh, P(None, None, parallel.AXIS))
            hp_sh, self.eval_batch_sharding = rep, parallel.batch_sharding(mesh)
            metrics_sh = rep
        self.abstract = abstract
        if mode == "loop":
            eval_all = lambda states, b: jax.lax.map(lambda st: eval_fn(st, b), states)  # noqa: E731
        else:
            eval_all = jax.vmap(eval_fn, in_axes=(0, None))
        self._eval = jax.jit(eval_all, in_shardings=(self.state_sharding, self.eval_batch_sharding),
                             out_shardings=hp_sh)
        self.hp = jax.device_put({k: jnp.asarray(v) for k, v in hp.items()}, hp_sh)
        self.arrays = jax.device_put(batches.arrays(), rep)  # the split, once (if not augmenting)
        self.compile_seconds = None
        self._run = None
        if start < num_steps:
            sample = batches.block(start, block, points_first=mode == "loop")
            t0 = time.perf_counter()
            self._run = jax.jit(
                make_block_fn(step_fn, mode, scan),
                in_shardings=(self.state_sharding, self.block_sharding, hp_sh, rep),
                out_shardings=(self.state_sharding, metrics_sh), donate_argnums=(0,),
            ).lower(self.target(), _abstract_of(sample, self.block_sharding),
                    _abstract_of(self.hp, hp_sh), _abstract_of(self.arrays, rep)).compile()
            self.compile_seconds = time.perf_counter() - t0

    def target(self) -> Any:
        """Abstract stacked states with their shardings (compiling, orbax restores)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract, self.state_sharding)

    def place(self, states: Any) -> Any:
        return jax.device_put(states, self.state_sharding)

    # -- the loop's interface -------------------------------------------------------------
    def run(self, states: Any, step: int, steps: int) -> tuple[Any, dict]:
        block = self.batches.block(step, steps, points_first=self.mode == "loop")
        return self._run(states, jax.device_put(block, self.block_sharding), self.hp, self.arrays)

    def host_metrics(self, fetched: Sequence[dict]) -> dict[str, np.ndarray]:
        """`{name: (steps, K)}` of the fetched blocks."""
        return {k: np.concatenate([np.asarray(m[k]) for m in fetched]) for k in fetched[0]}

    def evaluate(self, states: Any, evaluator: Evaluator) -> list[dict[str, dict]]:
        run_eval = lambda s, b: self._eval(s, jax.device_put(b, self.eval_batch_sharding))  # noqa: E731
        return evaluator.evaluate(run_eval, states, self.points)

    def host_step(self, states: Any) -> int:
        return int(jax.device_get(states.step[0]))

    def payload(self, states: Any) -> dict[str, Any]:
        return {"states": states}

    def snapshot(self, states: Any) -> Any:
        return jax.device_get(states.params)


def _abstract_of(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
