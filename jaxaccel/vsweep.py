"""Vectorized sweeps: K points of one experiment trained as one compiled program.

When the points differ only in keys that do not change any shape (`VECTORIZABLE`: seed,
learning rate, weight decay, Adam betas, SGD momentum, label smoothing), their train
states are stacked on a leading configuration axis of size K and one compiled program
trains all of them: the step is `train.make_train_step`'s with the optimizer built from
hyperparameters that enter as (K,) arrays. One compile, one input pipeline, one pass over
the test set per evaluation, and one dispatch per block of S steps (S divides the log,
eval and checkpoint intervals). Each point still gets its own sub-workdir with the
`config.json`, `metrics.jsonl`, `results.json` and final checkpoint a sequential run
writes, so `jaxaccel report` and `jaxaccel.load` cannot tell the difference.

Two ways to run the K points inside the program (`mode`):
  * "vmap": `jax.vmap` over the configuration axis at every step, scanned over S steps
    — what fills a GPU/TPU with small models; with several devices and K a multiple of
    them, each device holds K/N whole points ("points" layout, no collectives).
  * "loop": `lax.map` over the points of a `lax.scan` over the S steps — each point's
    state stays in cache for S steps.
"auto" follows measurements on XLA:CPU (2 cores): for LeNet-300-100 (8 points) vmapped
steps cost 1.0–1.3x eight single steps (36 MB of state overflow the cache) while scanned
"loop" blocks cost ~0.7x — "loop" is the CPU choice for dense models, and it computes
bit for bit what the sequential run computes; for LeNet-5 a step inside any XLA:CPU while
loop ran ~2.3x slower, but one vmapped step of 4 points cost ~0.3x four single steps —
so convolutional models get "vmap", one step per dispatch, on CPU. GPU/TPU: "vmap".

What "the same run" means: point k's `seed` seeds both its initialisation and its data
order, exactly as in `jaxaccel train`; its batches are `TrainBatches(seed_k)`'s, gathered
from one in-memory copy of the split; hyperparameters shared by all points stay Python
constants as in a sequential step. In "loop" mode a point then computes the sequential
run bit for bit (checked on 1 device); "vmap" uses batched kernels and matches to float
tolerance (rounding differences that Adam amplifies over long runs, as between runs on 1
and 8 devices).

Resume: the stacked state is checkpointed in `<workdir>/_vectorized/<group>/` every
`checkpoint_every` steps; re-running the same pending points resumes there. Points' own
checkpoints from sequential attempts are not used (a stacked state needs one step).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxaccel import checkpoint as ckpt_lib
from jaxaccel import config as config_lib
from jaxaccel import data, io, metrics, parallel, sweep
from jaxaccel import stages as stages_lib
from jaxaccel import train as train_lib
from jaxaccel.compress import prune
from jaxaccel.preemption import Preempted, PreemptionGuard

log = logging.getLogger("jaxaccel")

# Config keys that may differ between vectorized points -> name inside the step.
HYPER = {"optimizer.lr": "lr", "optimizer.weight_decay": "weight_decay",
         "optimizer.b1": "b1", "optimizer.b2": "b2", "optimizer.momentum": "momentum",
         "label_smoothing": "label_smoothing"}
VECTORIZABLE = ("seed", *HYPER)
GROUP_DIR = "_vectorized"


# ----------------------------------------------------------------------------------------
# Which sweeps can be vectorized
# ----------------------------------------------------------------------------------------
def _flat(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Dotted key -> JSON text of every leaf (run-time keys included: one loop runs all)."""
    out = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = json.dumps(node, sort_keys=True)

    walk(json.loads(config_lib.to_json(config)), "")
    return out


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_vectorizable(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """ValueError naming the first key (other than VECTORIZABLE) on which points differ."""
    if not configs:
        raise ValueError("no points to vectorize")
    first = _flat(configs[0])
    for c in configs[1:]:
        other = _flat(c)
        for k in sorted(set(first) | set(other)):
            if k not in VECTORIZABLE and first.get(k) != other.get(k):
                raise ValueError(
                    f"--vectorize: points differ in {k} ({first.get(k)} vs {other.get(k)}); "
                    f"only {', '.join(VECTORIZABLE)} may vary")
    c = configs[0]
    if tuple(c.stages) or c.imp.rounds:
        raise ValueError("--vectorize trains single-stage configs; config.stages/imp.rounds "
                         "are not supported yet")
    if c.init_from:
        raise ValueError("--vectorize does not support init_from yet")
    if jax.process_count() > 1:
        raise ValueError("--vectorize runs in a single process")
    if len({cfg.label_smoothing for cfg in configs}) > 1 and not smoothing_can_vary():
        raise ValueError("--vectorize: label_smoothing cannot vary between points until "
                         "train.cross_entropy accepts a traced label_smoothing")
    momenta = {cfg.optimizer.momentum > 0 for cfg in configs}
    if c.optimizer.name == "sgd" and len(momenta) > 1:
        raise ValueError("--vectorize: optimizer.momentum must be > 0 in all points or in "
                         "none (SGD with and without momentum keep different state)")


# ----------------------------------------------------------------------------------------
# The step with hyperparameters as inputs
# ----------------------------------------------------------------------------------------
class Structure:
    """What is static across the points: optimizer kind and which terms are present."""

    def __init__(self, configs: Sequence[ml_collections.ConfigDict]):
        opt = configs[0].optimizer
        self.name, self.schedule, self.nesterov = opt.name, opt.schedule, opt.nesterov
        self.clip = opt.grad_clip_norm
        self.num_steps = configs[0].num_steps
        # A term whose coefficient is 0 in some points is kept for all: adding 0 is exact.
        self.decay = any(c.optimizer.weight_decay > 0 for c in configs)
        self.momentum = all(c.optimizer.momentum > 0 for c in configs)
        # Values shared by all points stay Python constants, exactly as in a sequential
        # step; only the ones that differ enter the step as (K,) arrays.
        values = {name: [float(_get(c, key)) for c in configs] for key, name in HYPER.items()}
        self.varying = tuple(n for n, v in values.items() if len(set(v)) > 1)
        self.constants = {n: v[0] for n, v in values.items() if n not in self.varying}
        self.schedule_fields = tuple(sorted(
            (k, tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in opt.to_dict().items() if k in ("schedule", "warmup_steps",
                                                       "boundaries", "decay_factor")))


def hyper_values(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """(K,) float32 arrays of the HYPER values that differ between the points."""
    varying = Structure(configs).varying
    return {name: np.asarray([_get(c, key) for c in configs], np.float32)
            for key, name in HYPER.items() if name in varying}


def hyper_optimizer(structure: Structure, hp: dict) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
    """`train.make_optimizer` with lr/decay/betas/momentum taken from `hp` (maybe traced;
    missing names are the constants shared by all points)."""
    hp = {**structure.constants, **hp}
    sched_cfg = SimpleNamespace(lr=hp["lr"], **dict(structure.schedule_fields))
    schedule = train_lib.make_schedule(sched_cfg, structure.num_steps)
    parts = []
    if structure.clip > 0:
        parts.append(optax.clip_by_global_norm(structure.clip))
    if structure.name == "adamw":
        parts.append(optax.adamw(schedule, b1=hp["b1"], b2=hp["b2"],
                                 weight_decay=hp["weight_decay"]))
    else:
        if structure.decay:
            parts.append(optax.add_decayed_weights(hp["weight_decay"]))
        if structure.name == "sgd":
            parts.append(optax.sgd(schedule, momentum=hp["momentum"] if structure.momentum
                                   else None, nesterov=structure.nesterov))
        elif structure.name == "adam":
            parts.append(optax.adam(schedule, b1=hp["b1"], b2=hp["b2"]))
        else:
            raise ValueError(f"--vectorize: optimizer.name={structure.name!r} is not supported; "
                             f"choose one of: sgd, adam, adamw")
    return optax.chain(*parts), schedule


def smoothing_can_vary() -> bool:
    """Whether `train.cross_entropy` accepts a traced label_smoothing (needed to vary it)."""
    logits, labels = jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32)
    try:
        jax.eval_shape(lambda a: train_lib.cross_entropy(logits, labels, 2, a), 0.1)
    except jax.errors.ConcretizationTypeError:
        return False
    return True


def make_point_step(setup: train_lib.Setup, structure: Structure, *,
                    skip_nonfinite: bool) -> Callable:
    """`(state, batch, hp) -> (state, metrics)` for ONE point: `train.make_train_step` with
    an optimizer built from the hyperparameters `hp` (vmap it over points)."""

    def step_fn(state: train_lib.TrainState, batch: dict, hp: dict):
        inner, schedule = hyper_optimizer(structure, hp)
        smoothing = {**structure.constants, **hp}["label_smoothing"]
        step = train_lib.make_train_step(
            setup.model, prune.masked(inner), schedule, num_classes=setup.spec.num_classes,
            label_smoothing=smoothing, skip_nonfinite=skip_nonfinite,
            mask_update=setup.mask_update, qat_config=setup.qat_config)
        return step(state, batch)

    return step_fn


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
class ArraySource:
    """A split held in memory as arrays, with the random-access protocol TrainBatches reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[int(i)], "label": int(self.labels[int(i)])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]


class StackedBatches:
    """Point k's `TrainBatches(seed_k).batch(step)` for every point and a block of steps.

    The split is read once. Without augmentation the split goes to the device once, as
    uint8, with a 256-entry table of `data.normalize`'s float32 values per channel; a
    block is then just the K points' index sets (`TrainBatches.global_indices`) and the
    program gathers and looks up its batches (`materialize`): bit for bit
    `TrainBatches.batch`, without shipping float images (measured: copying a 38 MB float
    block to the CPU "device" cost ~1.5 ms per step, more than the gather it saves).
    With augmentation (crop/flip, drawn by numpy) each distinct seed has its own cached
    `TrainBatches` (one copy of the split per seed) and blocks carry the float images.
    """

    def __init__(self, source, spec, configs: Sequence[ml_collections.ConfigDict]):
        images, labels = data.read_arrays(source, np.arange(len(source)))
        c = configs[0]
        self.spec = spec
        self.seeds = [int(cfg.seed) for cfg in configs]
        self.on_device = not (c.dataset.crop_padding or c.dataset.flip)
        memory = ArraySource(images, labels)
        self.pipelines = {
            s: data.TrainBatches(memory, spec, global_batch_size=c.batch_size, seed=s,
                                 crop_padding=c.dataset.crop_padding, flip=c.dataset.flip,
                                 cache=not self.on_device)
            for s in dict.fromkeys(self.seeds)}
        self.images, self.labels = images, labels
        self.steps_per_epoch = next(iter(self.pipelines.values())).steps_per_epoch

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


# ----------------------------------------------------------------------------------------
# Training K points
# ----------------------------------------------------------------------------------------
MODES = ("auto", "vmap", "loop")
BLOCK_BYTES = 64 << 20  # input data of one block (all points, S steps) stays below this
MAX_BLOCK_STEPS = 100


def choose_plan(num_points: int, num_devices: int, mode: str = "auto",
                backend: str | None = None, convolutional: bool = False) -> tuple[str, str, bool]:
    """(mode, layout, scan): how the program runs the K points.

    mode "auto": "vmap" on GPU/TPU; on CPU "loop" for models without convolutions and
    "vmap" for models with them. `scan`: several steps per dispatch (`lax.scan`), except
    for convolutions on CPU. Measured on XLA:CPU (2 cores): inside a while loop (scan or
    map) a LeNet-5 step ran ~2.3x slower than dispatched alone, while one vmapped step of
    4 LeNet-5s cost ~0.3x four single steps; for LeNet-300-100 scanned blocks ran ~0.7x
    the time of dispatched steps. Layout "points" (each device holds K/N whole points)
    for vmap over several devices when N divides K, else "batch" (each point's batch
    split over the devices, states replicated)."""
    if mode not in MODES:
        raise ValueError(f"vectorize mode={mode!r} is not valid; choose one of: "
                         f"{', '.join(MODES)}")
    cpu = (backend or jax.default_backend()) == "cpu"
    if mode == "auto":
        mode = "vmap" if convolutional or not cpu else "loop"
    scan = mode == "loop" or not (cpu and convolutional)
    points = mode == "vmap" and num_devices > 1 and num_points % num_devices == 0
    return mode, "points" if points else "batch", scan


def block_steps(config: ml_collections.ConfigDict, num_points: int, example_bytes: int,
                start: int = 0) -> int:
    """Steps per dispatch: the largest divisor of every interval the loop must stop at
    (log, eval, checkpoint, end, resume step) within MAX_BLOCK_STEPS and BLOCK_BYTES of
    block input (`example_bytes` per example and point)."""
    g = math.gcd(config.log_every, config.checkpoint_every, config.eval_every,
                 config.num_steps, start) or 1
    fit = BLOCK_BYTES // max(num_points * config.batch_size * example_bytes, 1)
    limit = max(1, min(MAX_BLOCK_STEPS, fit))
    return max(d for d in range(1, min(g, limit) + 1) if g % d == 0)


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


def group_id(names: Sequence[str]) -> str:
    """Stable id of a set of points (the stacked checkpoint's directory)."""
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def _prepare_point_dir(run: sweep.PointRun) -> None:
    """Like `jaxaccel train`: refuse a workdir holding a different experiment."""
    path = os.path.join(run.workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = config_lib.from_json(f.read())
        diff = config_lib.differences(saved, run.config)
        if diff:
            raise config_lib.ConfigError(
                f"workdir {run.workdir!r} holds a different experiment "
                f"({'; '.join(diff[:3])}{' …' if len(diff) > 3 else ''}); use another "
                f"--workdir or --overwrite")
    os.makedirs(run.workdir, exist_ok=True)
    io.write_text(path, config_lib.to_json(run.config))


def run_points(runs: Sequence[sweep.PointRun], *, mode: str = "auto",
               on_change: Callable[[], None] = lambda: None,
               save_checkpoints: bool = True) -> None:
    """Train `runs` (sweep points of one experiment) together; statuses and files updated.

    Raises ValueError before training if they cannot be vectorized. A point that fails at
    run time (its workdir holds another experiment, non-finite loss with nonfinite="stop")
    gets error.txt; the others go on.
    """
    runs = [r for r in runs if sweep.status_of(r.workdir, r.config) != sweep.DONE]
    if not runs:
        return
    configs = [r.config for r in runs]
    check_vectorizable(configs)
    choose_plan(len(runs), 1, mode)  # a bad mode fails before anything is written
    for r in runs:
        sweep.mark_started(r)
    active = []
    for r in runs:
        try:
            _prepare_point_dir(r)
            active.append(r)
        except config_lib.ConfigError as e:
            sweep.mark_failed(r, f"{type(e).__name__}: {e}")
    on_change()
    if not active:
        return
    t0 = time.perf_counter()
    try:
        _train(active, mode=mode, on_change=on_change, save_checkpoints=save_checkpoints)
    except Preempted:
        raise
    except Exception as e:  # noqa: BLE001 - the group failed as a whole
        details = traceback.format_exc()
        for r in active:
            if r.status != sweep.FAILED:
                sweep.mark_failed(r, f"{type(e).__name__}: {e}", details)
        log.error("vectorized sweep failed: %s", e)
    seconds = time.perf_counter() - t0
    for r in active:
        r.seconds = seconds
    on_change()


def _train(runs: list[sweep.PointRun], *, mode: str, on_change: Callable[[], None],
           save_checkpoints: bool) -> None:
    # -- Set-up ------------------------------------------------------------------------
    configs = [r.config for r in runs]
    config, k_points = configs[0], len(runs)
    parallel.set_cpu_devices(config.parallel.cpu_devices)
    num_devices = config.parallel.num_devices or jax.device_count()
    abstract_params = jax.eval_shape(train_lib.build(config).init_state,
                                     jax.random.PRNGKey(0)).params
    convolutional = any(len(x.shape) >= 4 for x in jax.tree.leaves(abstract_params))
    mode, layout, scan = choose_plan(k_points, num_devices, mode, convolutional=convolutional)
    if layout == "batch":  # each point's batches are split over the devices
        config_lib.validate_devices(config, num_devices)
    mesh = parallel.make_mesh(num_devices)
    setup = train_lib.build(config)
    spec = setup.spec
    splits = data.splits_for(config.dataset)
    batches = StackedBatches(splits.train, spec, configs)

    # -- Model, optimizer & shardings ----------------------------------------------------
    structure = Structure(configs)
    hp_host = hyper_values(configs)
    inner0, _ = hyper_optimizer(structure, {k: float(v[0]) for k, v in hp_host.items()})
    tx0 = prune.masked(inner0)  # like train.build: every state carries (all-True) masks

    def init_one(rng):
        state = setup.init_state(rng)
        return state.replace(opt_state=tx0.init(state.params))

    P, rep = jax.sharding.PartitionSpec, parallel.replicated(mesh)
    per_point = jax.sharding.NamedSharding(mesh, P(parallel.AXIS))
    abstract = jax.eval_shape(jax.vmap(init_one), jax.ShapeDtypeStruct((k_points, 2), jnp.uint32))
    points_first = mode == "loop"
    if layout == "points":  # vmap only: K over the devices, whole points per device
        state_sh = jax.tree.map(lambda _: per_point, abstract)
        block_sh = jax.sharding.NamedSharding(mesh, P(None, parallel.AXIS))  # (S, K, ...)
        hp_sh, eval_batch_sh = per_point, rep
        metrics_sh = jax.sharding.NamedSharding(mesh, P(None, parallel.AXIS))
    else:  # states replicated; each point's batch split over the devices
        state_sh = jax.tree.map(lambda _: rep, abstract)
        block_sh = jax.sharding.NamedSharding(mesh, P(None, None, parallel.AXIS))
        hp_sh, eval_batch_sh, metrics_sh = rep, parallel.batch_sharding(mesh), rep
    step_fn = make_point_step(setup, structure, skip_nonfinite=config.nonfinite == "skip")
    eval_fn = train_lib.make_eval_step(setup.model, num_classes=spec.num_classes,
                                       qat_config=setup.qat_config)
    if mode == "loop":
        eval_all = lambda states, b: jax.lax.map(lambda st: eval_fn(st, b), states)  # noqa: E731
    else:
        eval_all = jax.vmap(eval_fn, in_axes=(0, None))
    v_eval = jax.jit(eval_all, in_shardings=(state_sh, eval_batch_sh), out_shardings=hp_sh)
    hp = jax.device_put({k: jnp.asarray(v) for k, v in hp_host.items()}, hp_sh)

    evaluator = train_lib.Evaluator(splits, spec, batch_size=config.eval_batch_size)

    def evaluate(states) -> list[dict[str, dict]]:
        """Point i's `{split: {"loss", "accuracy", "count"}}`, as `train.Evaluator` gives."""
        per_split = {}
        for split in evaluator.splits:
            totals = {k: np.zeros(k_points) for k in ("loss", "correct", "count")}
            for b in evaluator.batches(split):
                out = jax.device_get(v_eval(states, jax.device_put(b, eval_batch_sh)))
                for k in totals:
                    totals[k] += np.asarray(out[k], np.float64)
            n = np.maximum(totals["count"], 1.0)
            per_split[split] = [{"loss": float(totals["loss"][i] / n[i]),
                                 "accuracy": float(totals["correct"][i] / n[i]),
                                 "count": int(totals["count"][i])} for i in range(k_points)]
        return [{split: per_split[split][i] for split in per_split} for i in range(k_points)]

    # -- Load the stacked checkpoint (resume) or initialise ---------------------------------
    names = [r.name for r in runs]
    group_dir = os.path.join(os.path.dirname(os.path.abspath(runs[0].workdir)), GROUP_DIR,
                             group_id(names))
    checkpointer = ckpt_lib.Checkpointer(group_dir, keep=2)
    failed: dict[str, str] = {}
    found = checkpointer.restore_latest(
        lambda meta: {"states": ckpt_lib.abstract_like(abstract, state_sh)})
    if found is not None:
        latest, payload, meta = found
        states, failed = payload["states"], dict(meta.get("failed", {}))
        log.info("vectorized: resumed %d points from step %d (%s)", k_points, latest, group_dir)
    else:
        # Each point starts exactly as `jaxaccel train` starts it: the same jitted
        # init_state (one compile for all seeds, shared with sequential runs through the
        # compilation cache), then stacked, with the vectorized optimizer's state.
        init = jax.jit(setup.init_state)
        singles = jax.device_get([init(jax.random.PRNGKey(c.seed)) for c in configs])
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *singles)
        opt_state = jax.jit(jax.vmap(tx0.init))(stacked.params)
        states = jax.device_put(stacked.replace(opt_state=opt_state), state_sh)
    for r in runs:
        if r.name in failed:
            sweep.mark_failed(r, failed[r.name])
    io.write_json(os.path.join(group_dir, "points.json"), names)

    # -- Compile the block of S steps once ------------------------------------------------
    num_steps = config.num_steps
    start = int(jax.device_get(states.step[0]))
    example_bytes = 4 * (1 if batches.on_device else int(np.prod(spec.image_shape)) + 1)
    block = block_steps(config, k_points, example_bytes, start) if scan else 1
    arrays = jax.device_put(batches.arrays(), rep)  # the split, once (empty if augmenting)
    sample = batches.block(start, block, points_first=points_first)
    abstract_of = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)
    compile_seconds = None
    if start < num_steps:
        t0 = time.perf_counter()
        run_block = jax.jit(
            make_block_fn(step_fn, mode, scan), in_shardings=(state_sh, block_sh, hp_sh, rep),
            out_shardings=(state_sh, metrics_sh), donate_argnums=(0,),
        ).lower(ckpt_lib.abstract_like(abstract, state_sh), abstract_of(sample, block_sh),
                abstract_of(hp, hp_sh), abstract_of(arrays, rep)).compile()
        compile_seconds = time.perf_counter() - t0
    log.info("vectorized: %d points, mode=%s layout=%s, %d steps per dispatch", k_points,
             mode, layout, block)

    # -- Update steps -------------------------------------------------------------------
    # XLA:CPU can deadlock in a collective's rendezvous with two multi-device programs in
    # flight; wait for each block there.
    sync_each_block = jax.default_backend() == "cpu" and mesh.devices.size > 1
    window, rates, timed_steps = [], [], 0
    nonfinite = np.zeros(k_points, int)

    def save(step: int) -> None:
        checkpointer.save(step, {"states": states},
                          {"step": step, "names": names, "failed": failed,
                           "epoch": step // batches.steps_per_epoch})

    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(metrics.MetricWriter(r.workdir)) for r in runs]
        for w in writers:
            w.mark_start(start)  # like train: rows a crashed attempt wrote past it are void
        guard = stack.enter_context(PreemptionGuard())
        progress = metrics.Progress(num_steps, start, enabled=config.progress)
        t0 = time.perf_counter()
        for first in range(start, num_steps, block):
            host_block = batches.block(first, block, points_first=points_first)
            states, m = run_block(states, jax.device_put(host_block, block_sh), hp, arrays)
            if sync_each_block:
                jax.block_until_ready(m)
            window.append(m)
            timed_steps += block
            done = first + block
            side_work = False
            if done % config.log_every == 0 or done == num_steps:
                host = jax.device_get(window)
                elapsed = time.perf_counter() - t0
                stacked = {k: np.concatenate([np.asarray(h[k]) for h in host]) for k in host[0]}
                rate = timed_steps * config.batch_size / elapsed
                rates.append(rate)
                for i, r in enumerate(runs):
                    if r.name in failed:
                        continue
                    bad = np.flatnonzero(stacked["nonfinite"][:, i])
                    nonfinite[i] += len(bad)
                    if len(bad) and config.nonfinite == "stop":
                        failed[r.name] = (f"FloatingPointError: non-finite loss or gradient at "
                                          f"step {done - timed_steps + int(bad[0])}; set "
                                          f"nonfinite='skip' to skip such updates")
                        sweep.mark_failed(r, failed[r.name])
                        on_change()
                        continue
                    row = {k: float(np.mean(stacked[k][:, i]))
                           for k in ("loss", "accuracy", "grad_norm")}
                    row.update(lr=float(stacked["lr"][-1, i]), nonfinite_total=int(nonfinite[i]),
                               images_per_sec=rate, step_ms=1000 * elapsed / timed_steps,
                               stage=setup.stage.name)
                    writers[i].write(done, row, prefix="train")
                progress.update(done, {"loss": float(np.mean(stacked["loss"][-1])),
                                       "images_per_sec": rate * k_points})
                window, timed_steps, side_work = [], 0, True
            if config.eval_every and done % config.eval_every == 0 and done != num_steps:
                for i, ev in enumerate(evaluate(states)):
                    if runs[i].name not in failed:
                        evaluator.write(writers[i], done, ev, setup.stage.name)
                side_work = True
            if done % config.checkpoint_every == 0 or done == num_steps:
                save(done)
                side_work = True
            if side_work:
                t0 = time.perf_counter()
            if guard.should_stop():
                if checkpointer.latest_step() != done:
                    save(done)
                checkpointer.close()
                progress.close()
                raise Preempted(done, guard.signal_name)
        progress.close()
        if start == num_steps and checkpointer.latest_step() != num_steps:
            save(num_steps)

        # -- Evaluation & results (what train.train writes for a one-stage run) -------------
        finals = evaluate(states)
        checkpointer.close()
        host_states = jax.device_get(states)
        stage = setup.stage
        rate = statistics.median(rates) if rates else None
        for i, r in enumerate(runs):
            if r.name in failed:
                continue
            state = point_state(r.config, host_states, i)
            evaluator.write(writers[i], num_steps, finals[i], stage.name)
            if save_checkpoints:
                ckpt = ckpt_lib.Checkpointer(r.workdir, keep=r.config.keep_checkpoints)
                ckpt.save(num_steps, {"state": state},
                          {"stage": 0, "stage_name": stage.name, "rows": [],
                           "stage_step": num_steps, "step": num_steps,
                           "epoch": num_steps // batches.steps_per_epoch, "vectorized": True})
                ckpt.close()
            row = {"name": stage.name, "kind": stage.kind, "steps": stage.steps,
                   **evaluator.row(finals[i]),
                   **stages_lib.weight_stats(state.params, prune.get_masks(state.opt_state),
                                             32, batch_stats=state.batch_stats)}
            results = {
                **evaluator.row(finals[i]),
                "steps": num_steps, "num_devices": num_devices, "num_processes": 1,
                "strategy": config.parallel.strategy, "model": config.model.name,
                "dataset": config.dataset.name, **splits.sizes(), "train_images_per_sec": rate,
                "compile_seconds": compile_seconds, "nonfinite_steps": int(nonfinite[i]),
                "num_params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
                "sparsity": row["sparsity"], "packed_bytes": row["packed_bytes"],
                "stages": [row],
                "vectorized": {"points": k_points, "mode": mode, "layout": layout,
                               "steps_per_dispatch": block,
                               "images_per_sec": rate * k_points if rate else None},
            }
            io.write_json(os.path.join(r.workdir, sweep.RESULTS_FILE), results)
            r.status = sweep.DONE
    on_change()
    if all(r.status == sweep.DONE for r in runs):  # only resumes need the stacked state
        shutil.rmtree(group_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(group_dir))  # if no other group is unfinished


def point_state(config: ml_collections.ConfigDict, host_states: Any,
                i: int) -> train_lib.TrainState:
    """Point i of stacked states, in the structure its own `jaxaccel train` run has.

    The vectorized optimizer may hold extra stateless terms (weight decay 0 for this
    point), so the arrays are matched leaf by leaf against the point's own init state.
    """
    target = jax.eval_shape(train_lib.build(config).init_state, jax.random.PRNGKey(0))
    leaves = [np.asarray(x[i]) for x in jax.tree.leaves(host_states)]
    target_leaves, treedef = jax.tree.flatten(target)
    if [(tuple(t.shape), t.dtype) for t in target_leaves] != [(x.shape, x.dtype) for x in leaves]:
        raise ValueError(f"point {i}: the vectorized state does not match the "
                         f"point's own train state")
    return jax.tree.unflatten(treedef, leaves)


def run_vectorized(config: ml_collections.ConfigDict, points: Sequence[sweep.Point],
                   workdir: str, *, mode: str = "auto",
                   save_checkpoints: bool = True) -> list[dict]:
    """Train `points` (override dicts on `config`) as one vectorized program in `workdir`.

    Returns each point's results dict in order (read from its results.json; points that
    were already finished are not retrained); a failed point gives `{"error": message}`.
    """
    runs = sweep.plan(config, points, workdir)
    run_points(runs, mode=mode, save_checkpoints=save_checkpoints)
    out = []
    for r in runs:
        path = os.path.join(r.workdir, sweep.RESULTS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                out.append(json.load(f))
        else:
            out.append({"error": sweep.read_error(r.workdir) or "not finished"})
    return out

