"""Vectorized sweeps: K points of one experiment trained as one compiled program.

When the points differ only in keys that do not change any shape (`VECTORIZABLE`: seed,
learning rate, weight decay, Adam betas, SGD momentum, label smoothing), their train states
are stacked and trained by `jaxaccel.stacked.StackedRunner` under the one training loop
(`jaxaccel.loop.train_loop`): the step is `state.make_train_step`'s with the optimizer of
`state.make_optimizer` fed the hyperparameters that differ as (K,) arrays; values shared by
all points stay Python constants, exactly as in a sequential step. Each point still gets its
own sub-workdir with the `config.json`, `dataset.json`, `metrics.jsonl`, `results.json` and
final checkpoint a sequential run writes, so `jaxaccel report` and `jaxaccel.load` cannot
tell the difference.

What "the same run" means: point k's `seed` seeds both its initialisation and its data
order, exactly as in `jaxaccel train`. In "loop" mode a point computes the sequential run
bit for bit (checked on 1 device); "vmap" uses batched kernels and matches to float
tolerance (rounding differences that Adam amplifies over long runs, as between runs on 1
and 8 devices).

Resume: the stacked state is checkpointed in `<sweep workdir>/_vectorized/<group>/` every
`checkpoint_every` steps; re-running the same pending points with the same configs resumes
there (the group is named by the points' names and configs, so a changed config starts
afresh rather than continuing silently differently). Points' own checkpoints from
sequential attempts are not used (a stacked state needs one step).

Owns `run_points` (what `sweep.runners` calls), `run_vectorized`, `VECTORIZABLE` and
`check_vectorizable`. Imports stacked, loop, state, checkpoint, config, `sweep.points`, the
pipeline's workdir rules (`prepare_workdir`, `dataset_record`) and the layers below; never the
CLI or benchmarks.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaccel import checkpoint as ckpt_lib
from jaxaccel import config as config_lib
from jaxaccel import data, io, metrics, parallel, pipeline, stacked
from jaxaccel.compress import prune
from jaxaccel.loop import Evaluator, results_record, stage_row, train_loop
from jaxaccel.preemption import Preempted, PreemptionGuard
from jaxaccel.state import HYPERPARAMETERS, Setup, TrainState, build, make_eval_step, \
    make_optimizer, make_train_step
from jaxaccel.sweep import points as sweep_points

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
def check_vectorizable(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """ValueError naming the first key (other than VECTORIZABLE) on which points differ."""
    if not configs:
        raise ValueError("no points to vectorize")
    first = dict(config_lib.flat_items(config_lib.from_json(config_lib.to_json(configs[0]))))
    for c in configs[1:]:
        other = dict(config_lib.flat_items(config_lib.from_json(config_lib.to_json(c))))
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
    if c.distill.teacher or c.ensemble.members > 1:
        raise ValueError("--vectorize trains plain single-model points; distill.teacher and "
                         "ensemble.members > 1 are not supported with it")
    if jax.process_count() > 1:
        raise ValueError("--vectorize runs in a single process")
    momenta = {cfg.optimizer.momentum > 0 for cfg in configs}
    if c.optimizer.name == "sgd" and len(momenta) > 1:
        raise ValueError("--vectorize: optimizer.momentum must be > 0 in all points or in "
                         "none (SGD with and without momentum keep different state)")


# ----------------------------------------------------------------------------------------
# The step with hyperparameters as inputs
# ----------------------------------------------------------------------------------------
def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def hyper_values(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """(K,) float32 arrays of the HYPER values that differ between the points."""
    out = {}
    for key, name in HYPER.items():
        values = [float(_get(c, key)) for c in configs]
        if len(set(values)) > 1:
            out[name] = np.asarray(values, np.float32)
    return out


def shared_optimizer(configs: Sequence[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """The optimizer section whose structure serves every point: a weight-decay term if any
    point decays (adding a decay of 0 is exact), SGD momentum if all points have it; values
    that do not vary are the points' own constants."""
    opt = ml_collections.ConfigDict(configs[0].optimizer.to_dict())
    opt.weight_decay = max(c.optimizer.weight_decay for c in configs)
    opt.momentum = min(c.optimizer.momentum for c in configs)
    return opt


def make_point_step(setup: Setup, configs: Sequence[ml_collections.ConfigDict]) -> Callable:
    """`(state, batch, hp) -> (state, metrics)` for ONE point: `state.make_train_step` with
    the optimizer of `shared_optimizer` fed the point's varying hyperparameters `hp`."""
    opt, config = shared_optimizer(configs), configs[0]

    def step_fn(state: TrainState, batch: dict, hp: dict):
        inner, schedule = make_optimizer(opt, max(config.num_steps, 1),
                                         {k: v for k, v in hp.items() if k in HYPERPARAMETERS})
        step = make_train_step(
            setup.model, prune.masked(inner, ste=setup.ste), schedule,
            num_classes=setup.spec.num_classes,
            label_smoothing=hp.get("label_smoothing", config.label_smoothing),
            skip_nonfinite=config.nonfinite == "skip", mask_update=setup.mask_update,
            qat_config=setup.qat_config, ste=setup.ste)
        return step(state, batch)

    return step_fn


def group_id(names: Sequence[str], configs: Sequence[ml_collections.ConfigDict]) -> str:
    """Stable id of a set of points and their configs (the stacked checkpoint's directory)."""
    text = "\n".join(names) + "\n".join(config_lib.to_json(c) for c in configs)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------
# Running the points
# ----------------------------------------------------------------------------------------
def run_points(runs: Sequence[sweep_points.PointRun], *, mode: str = "auto",
               on_change: Callable[[], None] = lambda: None,
               save_checkpoints: bool = True) -> None:
    """Train `runs` (sweep points of one experiment) together; statuses and files updated.

    Raises ValueError before training if they cannot be vectorized. A point that fails at
    run time (its workdir holds another experiment, non-finite loss with nonfinite="stop")
    gets error.txt; the others go on.
    """
    runs = [r for r in runs if sweep_points.status_of(r.workdir, r.config) != sweep_points.DONE]
    if not runs:
        return
    configs = [r.config for r in runs]
    check_vectorizable(configs)
    stacked.choose_plan(len(runs), 1, mode)  # a bad mode fails before anything is written
    for r in runs:
        sweep_points.mark_started(r)
    active = []
    for r in runs:
        try:
            pipeline.prepare_workdir(r.config, r.workdir)
            active.append(r)
        except config_lib.ConfigError as e:
            sweep_points.mark_failed(r, f"{type(e).__name__}: {e}")
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
            if r.status != sweep_points.FAILED:
                sweep_points.mark_failed(r, f"{type(e).__name__}: {e}", details)
        log.error("vectorized sweep failed: %s", e)
    seconds = time.perf_counter() - t0
    for r in active:
        r.seconds = seconds
    on_change()


def _train(runs: list[sweep_points.PointRun], *, mode: str, on_change: Callable[[], None],
           save_checkpoints: bool) -> None:
    # -- Set-up ------------------------------------------------------------------------
    configs = [r.config for r in runs]
    config, k_points = configs[0], len(runs)
    parallel.set_cpu_devices(config.parallel.cpu_devices)
    num_devices = config.parallel.num_devices or jax.device_count()
    setup = build(config)
    abstract_params = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0)).params
    convolutional = any(len(x.shape) >= 4 for x in jax.tree.leaves(abstract_params))
    mode, layout, scan = stacked.choose_plan(k_points, num_devices, mode,
                                             convolutional=convolutional)
    if layout == "batch":  # each point's batches are split over the devices
        config_lib.validate_devices(config, num_devices)
    mesh = parallel.make_mesh(num_devices)
    splits = data.splits_for(config.dataset)
    batches = stacked.StackedBatches(splits.train, setup.spec, [c.seed for c in configs],
                                     batch_size=config.batch_size,
                                     crop_padding=config.dataset.crop_padding,
                                     flip=config.dataset.flip)
    evaluator = Evaluator(splits, setup.spec, batch_size=config.eval_batch_size)
    for r in runs:
        io.write_json(os.path.join(r.workdir, pipeline.DATASET_FILE),
                      pipeline.dataset_record(setup.spec, splits))

    # -- Model, optimizer & the stacked state's layout -----------------------------------
    hp = hyper_values(configs)
    inner0, _ = make_optimizer(shared_optimizer(configs), max(config.num_steps, 1),
                               {k: float(v[0]) for k, v in hp.items() if k in HYPERPARAMETERS})
    tx0 = prune.masked(inner0)  # like state.build: every state carries (all-True) masks

    def init_one(rng):
        state = setup.init_state(rng)
        return state.replace(opt_state=tx0.init(state.params))

    abstract = jax.eval_shape(jax.vmap(init_one), jax.ShapeDtypeStruct((k_points, 2), jnp.uint32))
    shardings = stacked.state_shardings(abstract, mesh, layout)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)

    # -- Load the stacked checkpoint (resume) or initialise -----------------------------------
    names = [r.name for r in runs]
    group_dir = os.path.join(os.path.dirname(os.path.abspath(runs[0].workdir)), GROUP_DIR,
                             group_id(names, configs))
    checkpointer = ckpt_lib.Checkpointer(group_dir, keep=2)
    failed: dict[int, str] = {}
    found = checkpointer.restore_latest(lambda meta: {"states": target})
    if found is not None:
        latest, payload, meta = found
        states = payload["states"]
        failed = {names.index(n): m for n, m in dict(meta.get("failed", {})).items()
                  if n in names}
        log.info("vectorized: resumed %d points from step %d (%s)", k_points, latest, group_dir)
    else:
        # Each point starts exactly as `jaxaccel train` starts it: the same jitted
        # init_state (one compile for all seeds, shared with sequential runs through the
        # compilation cache), then stacked, with the vectorized optimizer's state.
        init = jax.jit(setup.init_state)
        singles = jax.device_get([init(jax.random.PRNGKey(c.seed)) for c in configs])
        host = jax.tree.map(lambda *xs: np.stack(xs), *singles)
        opt_state = jax.jit(jax.vmap(tx0.init))(host.params)
        states = jax.device_put(host.replace(opt_state=opt_state), shardings)
    for i, message in failed.items():
        sweep_points.mark_failed(runs[i], message)
    io.write_json(os.path.join(group_dir, "points.json"), names)

    # -- The one loop ------------------------------------------------------------------------
    start = int(jax.device_get(states.step[0]))
    block = (stacked.block_steps((config.log_every, config.checkpoint_every, config.eval_every,
                                  config.num_steps), k_points, config.batch_size,
                                  batches.example_bytes, start) if scan else 1)
    eval_fn = make_eval_step(setup.model, num_classes=setup.spec.num_classes,
                             qat_config=setup.qat_config, ste=setup.ste)
    runner = stacked.StackedRunner(make_point_step(setup, configs), eval_fn, abstract, batches,
                                   hp, mesh, mode=mode, layout=layout, scan=scan, block=block,
                                   start=start, num_steps=config.num_steps)
    log.info("vectorized: %d points, mode=%s layout=%s, %d steps per dispatch", k_points,
             mode, layout, block)

    def point_failed(i: int, message: str) -> None:
        failed[i] = f"FloatingPointError: {message}"
        sweep_points.mark_failed(runs[i], failed[i])
        on_change()

    stage = setup.stage
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(metrics.MetricWriter(r.workdir)) for r in runs]
        for w in writers:
            w.mark_start(start)  # like train: rows a crashed attempt wrote past it are void
        guard = stack.enter_context(PreemptionGuard())
        states, stats, _, _ = train_loop(
            runner, states, config, num_steps=config.num_steps, writers=writers,
            checkpointer=checkpointer, guard=guard, evaluator=evaluator,
            meta=lambda: {"names": names, "failed": {names[i]: m for i, m in failed.items()}},
            stage_name=stage.name, failed=dict(failed), on_failed=point_failed,
            show_progress=config.progress)

        # -- Evaluation & results (what the pipeline writes for a one-stage run) --------------
        finals = runner.evaluate(states, evaluator)
        checkpointer.close()
        host_states = jax.device_get(states)
        rate = stats["train_images_per_sec"]
        for i, r in enumerate(runs):
            if i in failed:
                continue
            state = point_state(r.config, host_states, i)
            evaluator.write(writers[i], config.num_steps, finals[i], stage.name)
            if save_checkpoints:
                ckpt = ckpt_lib.Checkpointer(r.workdir, keep=r.config.keep_checkpoints)
                ckpt.save(config.num_steps, {"state": state},
                          {"stage": 0, "stage_name": stage.name, "rows": [],
                           "stage_step": config.num_steps, "step": config.num_steps,
                           "epoch": config.num_steps // batches.steps_per_epoch,
                           "vectorized": True})
                ckpt.close()
            masks = prune.get_masks(state.opt_state)
            weights = {"params": prune.apply_masks(state.params, masks),  # params ⊙ masks
                       "batch_stats": state.batch_stats, "masks": masks}
            results = results_record(
                config, [stage_row(stage, finals[i], weights)], steps=config.num_steps,
                stats={**stats, "nonfinite_steps": stats["nonfinite_steps"][i]},
                sizes=splits.sizes(), num_devices=num_devices, num_processes=1,
                num_params=int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
                vectorized={"points": k_points, "mode": mode, "layout": layout,
                            "steps_per_dispatch": block,
                            "images_per_sec": rate * k_points if rate else None})
            io.write_json(os.path.join(r.workdir, sweep_points.RESULTS_FILE), results)
            r.status = sweep_points.DONE
    on_change()
    if all(r.status == sweep_points.DONE for r in runs):  # only resumes need the stacked state
        shutil.rmtree(group_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(group_dir))  # if no other group is unfinished


def point_state(config: ml_collections.ConfigDict, host_states: Any, i: int) -> TrainState:
    """Point i of stacked states, in the structure its own `jaxaccel train` run has.

    The vectorized optimizer may hold extra stateless terms (weight decay 0 for this
    point), so the arrays are matched leaf by leaf against the point's own init state.
    """
    target = jax.eval_shape(build(config).init_state, jax.random.PRNGKey(0))
    leaves = [np.asarray(x[i]) for x in jax.tree.leaves(host_states)]
    target_leaves, treedef = jax.tree.flatten(target)
    if [(tuple(t.shape), t.dtype) for t in target_leaves] != [(x.shape, x.dtype) for x in leaves]:
        raise ValueError(f"point {i}: the vectorized state does not match the "
                         f"point's own train state")
    return jax.tree.unflatten(treedef, leaves)


def run_vectorized(config: ml_collections.ConfigDict, points: Sequence[dict], workdir: str, *,
                   mode: str = "auto", save_checkpoints: bool = True) -> list[dict]:
    """Train `points` (override dicts on `config`) as one vectorized program in `workdir`.

    Returns each point's results dict in order (read from its results.json; points that
    were already finished are not retrained); a failed point gives `{"error": message}`.
    """
    runs = sweep_points.plan(config, points, workdir)
    run_points(runs, mode=mode, save_checkpoints=save_checkpoints)
    out = []
    for r in runs:
        path = os.path.join(r.workdir, sweep_points.RESULTS_FILE)
        if os.path.isfile(path):
            out.append(io.read_json(path))
        else:
            out.append({"error": sweep_points.read_error(r.workdir) or "not finished"})
    return out
