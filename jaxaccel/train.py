"""Training: the train state, jitted train/eval steps, and the one readable train loop.

`train(config, workdir)` is what `jaxaccel train` runs. Sections of the loop follow
big_vision's: set-up, model & optimizer, shard & transfer, load checkpoint, update steps,
evaluation, results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import statistics
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxaccel import checkpoint as ckpt_lib
from jaxaccel import config as config_lib
from jaxaccel import data, metrics, models, parallel
from jaxaccel.preemption import Preempted, PreemptionGuard

log = logging.getLogger("jaxaccel")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree (checkpointed as is)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


# ----------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------
def make_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The learning-rate schedule named by `optimizer.schedule`."""
    lr, steps = opt.lr, max(num_steps, 1)
    if opt.schedule == "constant":
        return optax.constant_schedule(lr)
    if opt.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if opt.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, steps)
    if opt.schedule == "piecewise":
        return optax.piecewise_constant_schedule(
            lr, {int(b): opt.decay_factor for b in opt.boundaries if b > 0})
    raise config_lib.ConfigError(f"optimizer.schedule={opt.schedule!r} is not valid; choose one "
                                 f"of: {', '.join(config_lib.CHOICES['optimizer.schedule'])}")


def make_optimizer(opt: ml_collections.ConfigDict,
                   num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax chain: [clip] -> [L2 weight decay] -> sgd | adam | adamw(decoupled decay)."""
    schedule = make_schedule(opt, num_steps)
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == "adamw":
        parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
    else:
        if opt.weight_decay > 0:
            parts.append(optax.add_decayed_weights(opt.weight_decay))
        if opt.name == "sgd":
            parts.append(optax.sgd(schedule, momentum=opt.momentum or None,
                                   nesterov=opt.nesterov))
        elif opt.name == "adam":
            parts.append(optax.adam(schedule, b1=opt.b1, b2=opt.b2))
        else:
            raise config_lib.ConfigError(
                f"optimizer.name={opt.name!r} is not valid; choose one of: "
                f"{', '.join(config_lib.CHOICES['optimizer.name'])}")
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------
def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    num_classes: int, label_smoothing: float = 0.0, axis_name: str | None = None,
                    skip_nonfinite: bool = False) -> Callable:
    """`(state, batch) -> (state, metrics)`; with `axis_name`, averages over that pmap axis."""

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, mutated = model.apply(variables, batch["image"], train=True,
                                          mutable=["batch_stats"], rngs={"dropout": rng})
            loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
            return loss, (logits, mutated.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:
            grads, loss, accuracy, batch_stats = jax.lax.pmean(
                (grads, loss, accuracy, batch_stats), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:  # keep the old state (but advance the step) on a bad update
            kept = state.replace(step=state.step + 1)
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     new_state, kept)
        metrics_ = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
                    "lr": schedule(state.step), "nonfinite": 1 - finite.astype(jnp.int32)}
        return new_state, metrics_

    return step_fn


def make_eval_step(model, *, num_classes: int, axis_name: str | None = None) -> Callable:
    """`(params, batch_stats, batch) -> sums of loss, correct, count` over the unmasked rows."""

    def eval_fn(params, batch_stats, batch):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                             train=False)
        mask = batch["mask"].astype(jnp.float32)
        loss = cross_entropy(logits, batch["label"], num_classes)
        out = {"loss": jnp.sum(loss * mask),
               "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
               "count": jnp.sum(mask)}
        if axis_name is not None:
            out = jax.lax.psum(out, axis_name)
        return out

    return eval_fn


# ----------------------------------------------------------------------------------------
# Set-up shared by training, loading and benchmarks
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """The pure pieces a run is made of, derived from its config alone."""
    config: ml_collections.ConfigDict
    spec: Any
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    input_shape: tuple[int, ...]
    init_state: Callable[[jax.Array], TrainState]
    predict_fn: Callable


def build(config: ml_collections.ConfigDict) -> Setup:
    """Model, optimizer and state initialiser for a config (touches no files but dataset metadata)."""
    spec = data.dataset_spec(config.dataset.name, path=config.dataset.path or None,
                             data_dir=config.dataset.data_dir or None)
    model = models.get_model(config.model.name, spec.num_classes, width=config.model.width,
                             dtype=config.model.dtype, conv_impl=config.model.conv_impl,
                             **dict(config.model.kwargs))
    tx, schedule = make_optimizer(config.optimizer, config.num_steps)
    input_shape = (1,) + tuple(spec.image_shape)

    def init_state(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params), rng=state_rng)

    @jax.jit
    def predict_fn(variables, images):
        x = data.normalize(jnp.asarray(images), spec)
        return model.apply(variables, x, train=False)

    return Setup(config, spec, model, tx, schedule, input_shape, init_state, predict_fn)


def transfer(state: TrainState, source_workdir: str) -> tuple[TrainState, list[str]]:
    """Take every param/batch_stat from another run whose path and shape match."""
    loaded = ckpt_lib.load(source_workdir) if os.path.isfile(
        os.path.join(source_workdir, "config.json")) else None
    if loaded is None:
        raise ValueError(f"init_from={source_workdir!r} is not a jaxaccel workdir")
    reinit = []

    def merge(target: dict, source: dict, prefix: str) -> dict:
        flat_t = flax.traverse_util.flatten_dict(target, sep="/")
        flat_s = flax.traverse_util.flatten_dict(source, sep="/")
        out = {}
        for k, v in flat_t.items():
            s = flat_s.get(k)
            if s is not None and tuple(s.shape) == tuple(v.shape):
                out[k] = jnp.asarray(s, v.dtype)
            else:
                out[k] = v
                reinit.append(f"{prefix}/{k}")
        return flax.traverse_util.unflatten_dict(out, sep="/")

    params = merge(state.params, loaded.variables["params"], "params")
    stats = merge(state.batch_stats, loaded.variables["batch_stats"], "batch_stats")
    return state.replace(params=params, batch_stats=stats), reinit


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class Runner:
    """Compiled train/eval steps for one model and optimizer on one mesh and strategy.

    Hides the difference between `jit` (data, fsdp) and `pmap`: `run_step`, `run_eval`,
    `to_device`/`to_host` (host = an unreplicated state, what checkpoints hold).
    """

    def __init__(self, setup: Setup, mesh, strategy: str):
        config, spec = setup.config, setup.spec
        self.setup, self.mesh, self.strategy = setup, mesh, strategy
        pmap = strategy == "pmap"
        axis = parallel.AXIS if pmap else None
        step_fn = make_train_step(setup.model, setup.tx, setup.schedule,
                                  num_classes=spec.num_classes,
                                  label_smoothing=config.label_smoothing, axis_name=axis,
                                  skip_nonfinite=config.nonfinite == "skip")
        eval_fn = make_eval_step(setup.model, num_classes=spec.num_classes, axis_name=axis)
        self.abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
        if pmap:
            devices = list(mesh.devices.flat)
            split = lambda b: parallel.split_for_pmap(b, len(devices))  # noqa: E731
            p_step = jax.pmap(step_fn, axis_name=parallel.AXIS, donate_argnums=(0,),
                              devices=devices)
            p_eval = jax.pmap(eval_fn, axis_name=parallel.AXIS, devices=devices)
            self.shardings = None
            self._init = jax.jit(setup.init_state)
            self.run_step = lambda s, b: p_step(s, split(b))
            self.run_eval = lambda s, b: parallel.unreplicate(
                p_eval(s.params, s.batch_stats, split(b)))
            self.to_device = lambda s: parallel.replicate(s, devices)
            self.to_host = parallel.unreplicate
        else:
            sh = parallel.state_shardings(self.abstract, mesh, strategy)
            batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
            j_step = jax.jit(step_fn, in_shardings=(sh, batch_sh), out_shardings=(sh, rep),
                             donate_argnums=(0,))
            j_eval = jax.jit(eval_fn, in_shardings=(sh.params, sh.batch_stats, batch_sh),
                             out_shardings=rep)
            self.shardings = sh
            self._init = jax.jit(setup.init_state, out_shardings=sh)
            self.run_step = lambda s, b: j_step(s, parallel.shard_batch(b, mesh))
            self.run_eval = lambda s, b: j_eval(s.params, s.batch_stats,
                                                parallel.shard_batch(b, mesh))
            self.to_device = lambda s: jax.device_put(s, sh)
            self.to_host = lambda s: s

    def init(self, rng: jax.Array) -> TrainState:
        """A fresh state, placed for this strategy."""
        state = self._init(rng)
        return self.to_device(state) if self.strategy == "pmap" else state

    def restore_target(self) -> Any:
        """Abstract state with this strategy's shardings, for orbax restores."""
        return ckpt_lib.abstract_like(self.abstract, self.shardings)

    def host_step(self, state: TrainState) -> int:
        return int(self.to_host(state).step)


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict:
    """Train (or resume) the experiment `config` in `workdir`; returns the results dict."""
    # -- Set-up ------------------------------------------------------------------------
    config = ml_collections.ConfigDict(config.to_dict())  # private copy
    config_lib.validate(config)
    parallel.set_cpu_devices(config.parallel.cpu_devices)
    parallel.initialize_distributed(config.distributed.coordinator_address,
                                    config.distributed.num_processes,
                                    config.distributed.process_id)
    num_devices = config.parallel.num_devices or jax.device_count()
    if config.parallel.num_devices and jax.process_count() > 1:
        raise config_lib.ConfigError("parallel.num_devices must be 0 in a multi-process run")
    config_lib.validate_devices(config, num_devices)
    pid, pcount = jax.process_index(), jax.process_count()
    is_main = pid == 0
    _prepare_workdir(config, workdir, overwrite=overwrite, is_main=is_main)

    setup = build(config)
    data_dir, path = config.dataset.data_dir or None, config.dataset.path or None
    train_source = data.get_source(config.dataset.name, config.dataset.train_split,
                                   data_dir=data_dir, path=path)
    test_source = data.get_source(config.dataset.name, config.dataset.test_split,
                                  data_dir=data_dir, path=path)
    batches = data.TrainBatches(train_source, setup.spec, global_batch_size=config.batch_size,
                                seed=config.seed, crop_padding=config.dataset.crop_padding,
                                flip=config.dataset.flip, process_index=pid,
                                process_count=pcount)
    evaluate = functools.partial(evaluate_source, source=test_source, spec=setup.spec,
                                 batch_size=config.eval_batch_size, process_index=pid,
                                 process_count=pcount)

    # -- Model, optimizer & shardings ----------------------------------------------------
    runner = Runner(setup, parallel.make_mesh(num_devices), config.parallel.strategy)

    # -- Load checkpoint (resume) or initialise -----------------------------------------
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, _ = checkpointer.restore(latest, runner.restore_target())
        state = runner.to_device(state) if runner.strategy == "pmap" else state
        log.info("resumed from step %d (%s)", latest, checkpointer.directory)
    else:
        state = runner.init(jax.random.PRNGKey(config.seed))
        if config.init_from:
            state, reinit = transfer(runner.to_host(state), config.init_from)
            state = runner.to_device(state)
            log.info("initialised from %s; re-initialised (shape mismatch): %s",
                     config.init_from, ", ".join(reinit) or "none")

    # -- Update steps -------------------------------------------------------------------
    with contextlib.ExitStack() as stack:  # closes writers, restores signal handlers
        writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_main))
        guard = stack.enter_context(PreemptionGuard())
        state, stats = train_loop(runner, state, batches, evaluate, checkpointer, writer, guard,
                                  num_steps=config.num_steps, show_progress=is_main and config.progress)
        # -- Evaluation & results ---------------------------------------------------------
        final = evaluate(runner.run_eval, state)
        writer.write(config.num_steps, final, prefix="test")
        checkpointer.close()
    results = {
        "test_accuracy": final["accuracy"], "test_loss": final["loss"],
        "steps": config.num_steps, "num_devices": num_devices, "num_processes": pcount,
        "strategy": runner.strategy, "model": config.model.name,
        "dataset": config.dataset.name, **stats,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(runner.to_host(state).params))),
    }
    if is_main:
        _write_json(os.path.join(workdir, "results.json"), results)
    return results


def train_loop(runner: Runner, state: TrainState, batches, evaluate: Callable, checkpointer,
               writer, guard, *, num_steps: int, show_progress: bool = True,
               meta: dict | None = None) -> tuple[TrainState, dict]:
    """Run steps `state.step .. num_steps`: log, evaluate, checkpoint, honour preemption."""
    config = runner.setup.config
    start = runner.host_step(state)
    progress = metrics.Progress(num_steps, start, enabled=show_progress)
    window, rates, nonfinite, timed_steps = [], [], 0, 0
    compile_seconds = None
    # XLA:CPU can deadlock in a collective's rendezvous when two multi-device steps are in
    # flight at once (seen here with 8 simulated devices); wait for each step there.
    sync_each_step = jax.default_backend() == "cpu" and runner.mesh.devices.size > 1

    def save(step: int) -> None:
        checkpointer.save(step, runner.to_host(state),
                          {**(meta or {}), "step": step,
                           "epoch": step // batches.steps_per_epoch})

    t0 = time.perf_counter()
    for step in range(start, num_steps):
        state, m = runner.run_step(state, batches.batch(step))
        if sync_each_step:
            jax.block_until_ready(m)
        window.append(m)
        done = step + 1
        if compile_seconds is None:  # the first step of a process includes compilation
            jax.block_until_ready(m)
            compile_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        else:
            timed_steps += 1
        side_work = False
        if done % config.log_every == 0 or done == num_steps:
            host = jax.device_get(window)
            elapsed = time.perf_counter() - t0
            bad = [done - len(host) + i for i, h in enumerate(host) if np.sum(h["nonfinite"])]
            nonfinite += len(bad)
            if bad and config.nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss or gradient at step {bad[0]}; "
                                         f"set nonfinite='skip' to skip such updates")
            row = {k: float(np.mean([h[k] for h in host]))
                   for k in ("loss", "accuracy", "grad_norm")}
            row["lr"] = float(np.ravel(host[-1]["lr"])[0])
            row["nonfinite_total"] = nonfinite
            if timed_steps:
                row["images_per_sec"] = timed_steps * config.batch_size / elapsed
                row["step_ms"] = 1000 * elapsed / timed_steps
                rates.append(row["images_per_sec"])
            writer.write(done, row, prefix="train")
            progress.update(done, row)
            window, timed_steps, side_work = [], 0, True
        if config.eval_every and done % config.eval_every == 0 and done != num_steps:
            writer.write(done, evaluate(runner.run_eval, state), prefix="test")
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
    return state, {"train_images_per_sec": statistics.median(rates) if rates else None,
                   "compile_seconds": compile_seconds, "nonfinite_steps": nonfinite}


def evaluate_source(run_eval: Callable, state: TrainState, *, source, spec, batch_size: int,
                    process_index: int = 0, process_count: int = 1) -> dict:
    """Test-set loss and accuracy over every example exactly once."""
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data.eval_batches(source, spec, batch_size=batch_size,
                                   process_index=process_index, process_count=process_count):
        out = jax.device_get(run_eval(state, batch))
        for k in sums:
            sums[k] += float(out[k])
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "count": int(sums["count"])}


def _prepare_workdir(config, workdir: str, *, overwrite: bool, is_main: bool) -> None:
    """Refuse to mix experiments in one workdir; write config.json for a new run."""
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = config_lib.from_json(f.read())
        diff = config_lib.differences(saved, config)
        if diff and not overwrite:
            raise config_lib.ConfigError(
                f"workdir {workdir!r} holds a different experiment ({'; '.join(diff[:3])}"
                f"{' …' if len(diff) > 3 else ''}); use another --workdir or --overwrite")
        if diff and overwrite and is_main:
            for name in ("checkpoints", "metrics.jsonl", "results.json", "events"):
                p = os.path.join(workdir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        _write_json_text(path, config_lib.to_json(config))


def _write_json(path: str, obj: dict) -> None:
    _write_json_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                      default=lambda x: None if x is None or (
                                          isinstance(x, float) and math.isnan(x)) else float(x)))


def _write_json_text(path: str, text: str) -> None:
    """Atomic write: a reader never sees a half file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


class _CallableModule(type(os)):
    """Lets `jaxaccel.train(config, workdir)` call `train` while `jaxaccel.train` stays a module."""

    def __call__(self, config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
        return train(config, workdir, **kwargs)


import sys  # noqa: E402

sys.modules[__name__].__class__ = _CallableModule
