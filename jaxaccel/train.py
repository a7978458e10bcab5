"""Training: the train state, jitted train/eval steps, and the one readable train loop.

`train(config, workdir)` is what `jaxaccel train` runs. Sections of the loop follow
big_vision's: set-up, model & optimizer, shard & transfer, load checkpoint, update steps,
evaluation, results.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
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
from jaxaccel import data, io, metrics, models, parallel
from jaxaccel import stages as stages_lib
from jaxaccel.compress import prune, quant
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
    qat: Any = flax.struct.field(default_factory=dict)  # QAT activation ranges ({} if unused)


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
    if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
        targets = optax.smooth_labels(targets, label_smoothing)  # may be traced (vsweep)
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    num_classes: int, label_smoothing: float = 0.0, axis_name: str | None = None,
                    skip_nonfinite: bool = False, mask_update: Callable | None = None,
                    qat_config: Any = None) -> Callable:
    """`(state, batch) -> (state, metrics)`; with `axis_name`, averages over that pmap axis.

    `mask_update(params, masks, step) -> masks` re-prunes inside the step (gradual pruning;
    `tx` must be `prune.masked(...)`); `qat_config` runs the forward pass with fake-quant
    (straight-through gradients) and tracks activation ranges in `state.qat`.
    """

    def forward(params, state, images, rng):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if qat_config is None:
            out = model.apply(variables, images, train=True, mutable=["batch_stats"],
                              rngs={"dropout": rng})
            return out, state.qat
        return quant.qat_apply(model, variables, state.qat, images, train=True,
                               step=state.step, config=qat_config, mutable=["batch_stats"])

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            (logits, mutated), qat_state = forward(params, state, batch["image"], rng)
            loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
            return loss, (logits, mutated.get("batch_stats", {}), qat_state)

        (loss, (logits, batch_stats, qat_state)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:
            grads, loss, accuracy, batch_stats, qat_state = jax.lax.pmean(
                (grads, loss, accuracy, batch_stats, qat_state), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if mask_update is not None:
            masks = mask_update(params, prune.get_masks(opt_state), state.step)
            params = prune.apply_masks(params, masks)
            opt_state = prune.set_masks(opt_state, masks)
        grad_norm = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, qat=qat_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:  # keep the old state (but advance the step) on a bad update
            kept = state.replace(step=state.step + 1)
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     new_state, kept)
        metrics_ = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
                    "lr": schedule(state.step), "nonfinite": 1 - finite.astype(jnp.int32)}
        return new_state, metrics_

    return step_fn


def make_eval_step(model, *, num_classes: int, axis_name: str | None = None,
                   qat_config: Any = None) -> Callable:
    """`(state, batch) -> sums of loss, correct, count` over the unmasked rows."""

    def eval_fn(state: TrainState, batch: dict) -> dict:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if qat_config is None:
            logits = model.apply(variables, batch["image"], train=False)
        else:
            logits, _ = quant.qat_apply(model, variables, state.qat, batch["image"],
                                        train=False, step=state.step, config=qat_config)
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
    """The pure pieces of one training stage, derived from the config alone."""
    config: ml_collections.ConfigDict
    stage: ml_collections.ConfigDict
    spec: Any
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    input_shape: tuple[int, ...]
    init_state: Callable[[jax.Array], TrainState]
    predict_fn: Callable
    mask_update: Callable | None = None
    qat_config: Any = None


def build(config: ml_collections.ConfigDict,
          stage: ml_collections.ConfigDict | None = None) -> Setup:
    """Model, optimizer and state initialiser for a config's stage (default: its first).

    The optimizer is always wrapped in `prune.masked`, so every state carries masks (all
    True until something prunes) and every stage keeps pruned weights at exactly zero.
    """
    stage = stage if stage is not None else stages_lib.expand(config)[0]
    spec = data.spec_for(config.dataset)
    model = models.get_model(config.model.name, spec.num_classes, width=config.model.width,
                             dtype=config.model.dtype, conv_impl=config.model.conv_impl,
                             **dict(config.model.kwargs))
    inner, schedule = make_optimizer(stages_lib.stage_optimizer(config, stage),
                                     max(stage.steps, 1))
    tx = prune.masked(inner)
    input_shape = (1,) + tuple(spec.image_shape)
    qat_config = stages_lib.qat_config(stage.quant) if stage.quant.mode == "qat" else None
    mask_update = (stages_lib.gradual_mask_update(stage.prune, stage.steps)
                   if stage.prune.method == "gradual" else None)

    def init_state(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        images = jnp.zeros(input_shape, jnp.float32)
        variables = model.init(init_rng, images, train=False)
        params = variables["params"]
        qat = quant.qat_init(model, variables, images, qat_config) if qat_config else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params), rng=state_rng, qat=qat)

    @jax.jit
    def predict_fn(variables, images):
        x = data.normalize(jnp.asarray(images), spec)
        return model.apply(variables, x, train=False)

    return Setup(config, stage, spec, model, tx, schedule, input_shape, init_state, predict_fn,
                 mask_update, qat_config)


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
    """Compiled train/eval steps for one stage's model and optimizer on one mesh and strategy.

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
                                  skip_nonfinite=config.nonfinite == "skip",
                                  mask_update=setup.mask_update, qat_config=setup.qat_config)
        eval_fn = make_eval_step(setup.model, num_classes=spec.num_classes, axis_name=axis,
                                 qat_config=setup.qat_config)
        self.abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
        if pmap:
            devices = list(mesh.devices.flat)
            split = lambda b: parallel.split_for_pmap(b, len(devices))  # noqa: E731
            p_step = jax.pmap(step_fn, axis_name=parallel.AXIS, donate_argnums=(0,),
                              devices=devices)
            p_eval = jax.pmap(eval_fn, axis_name=parallel.AXIS, devices=devices)
            self.shardings = None
            self.run_step = lambda s, b: p_step(s, split(b))
            self.run_eval = lambda s, b: parallel.unreplicate(p_eval(s, split(b)))
            self.to_device = lambda s: parallel.replicate(s, devices)
            self.to_host = parallel.unreplicate
        else:
            sh = parallel.state_shardings(self.abstract, mesh, strategy)
            batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
            j_step = jax.jit(step_fn, in_shardings=(sh, batch_sh), out_shardings=(sh, rep),
                             donate_argnums=(0,))
            j_eval = jax.jit(eval_fn, in_shardings=(sh, batch_sh), out_shardings=rep)
            self.shardings = sh
            self.run_step = lambda s, b: j_step(s, parallel.shard_batch(b, mesh))
            self.run_eval = lambda s, b: j_eval(s, parallel.shard_batch(b, mesh))
            self.to_device = lambda s: jax.device_put(s, sh)
            self.to_host = lambda s: s

    def init(self, rng: jax.Array) -> TrainState:
        """A fresh state, placed for this strategy."""
        return self.to_device(jax.jit(self.setup.init_state)(rng))

    def start(self, carry: dict) -> TrainState:
        """A state for this stage from the previous stage's weights, masks and rng.

        The optimizer state is fresh (a stage may change the optimizer); masks carry over.
        """
        template = jax.eval_shape(self.setup.init_state, jax.random.PRNGKey(0))
        qat = (quant.qat_init(self.setup.model, {"params": carry["params"],
                                                 "batch_stats": carry["batch_stats"]},
                              jnp.zeros(self.setup.input_shape, jnp.float32),
                              self.setup.qat_config)
               if self.setup.qat_config else {})
        opt_state = prune.set_masks(self.setup.tx.init(carry["params"]), carry["masks"])
        state = TrainState(step=jnp.zeros((), jnp.int32), params=carry["params"],
                           batch_stats=carry["batch_stats"], opt_state=opt_state,
                           rng=carry["rng"], qat=qat)
        chex_structure_matches(template, state)
        return self.to_device(state)

    def restore_target(self) -> Any:
        """Abstract state with this strategy's shardings, for orbax restores."""
        return ckpt_lib.abstract_like(self.abstract, self.shardings)

    def host_step(self, state: TrainState) -> int:
        return int(self.to_host(state).step)


def checkpoint_target(config: ml_collections.ConfigDict, stage_index: int,
                      shardings: Any = None) -> tuple[Setup, dict]:
    """(setup, abstract payload) for restoring a checkpoint written by stage `stage_index`."""
    stages = stages_lib.expand(config)
    if not 0 <= stage_index < len(stages) or stages[stage_index].kind != "train":
        raise ValueError(f"a checkpoint names stage {stage_index}, which is not a train stage "
                         f"of this config")
    setup = build(config, stages[stage_index])
    abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    target = {"state": ckpt_lib.abstract_like(abstract, shardings)}
    if any(s.kind == "rewind" and s.rewind == "snapshot" for s in stages):
        target["snapshot"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          abstract.params)
    return setup, target


def chex_structure_matches(expected: Any, got: Any) -> None:
    """Fail early (not deep inside jit) if a carried state does not fit the stage."""
    if jax.tree.structure(expected) != jax.tree.structure(got):
        raise ValueError("state structure does not match the stage's optimizer/model")


def carry_of(runner: Runner, state: TrainState) -> dict:
    """What passes from one stage to the next: weights, BN stats, masks, rng."""
    host = runner.to_host(state)
    return {"params": host.params, "batch_stats": host.batch_stats,
            "masks": prune.get_masks(host.opt_state), "rng": host.rng}


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict:
    """Train (or resume) the experiment `config` in `workdir`; returns the results dict.

    Runs the config's stages in order (one `train` stage if it declares none). Checkpoints
    carry the stage and step, so a run killed in any stage resumes there.
    """
    # -- Set-up ------------------------------------------------------------------------
    config = copy.deepcopy(config)  # private copy (stages hold nested sections)
    config_lib.validate(config)
    stages = stages_lib.expand(config)
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

    setups = {i: build(config, s) for i, s in enumerate(stages) if s.kind == "train"}
    first = setups[min(setups)] if setups else build(config, stages[0])
    spec = first.spec
    splits = data.splits_for(config.dataset)
    batches = data.TrainBatches(splits.train, spec, global_batch_size=config.batch_size,
                                seed=config.seed, crop_padding=config.dataset.crop_padding,
                                flip=config.dataset.flip, process_index=pid,
                                process_count=pcount,
                                cache=pcount == 1)  # several processes: each reads its rows only
    evaluate = Evaluator(splits, spec, batch_size=config.eval_batch_size, process_index=pid,
                         process_count=pcount)
    mesh = parallel.make_mesh(num_devices)
    uses_snapshot = any(s.kind == "rewind" and s.rewind == "snapshot" for s in stages)
    offsets = np.cumsum([0] + [s.steps for s in stages]).tolist()  # global step per stage
    for setup in setups.values():
        _check_model(config, setup)
    # Only now, with the config, data and model known to work, is the workdir touched.
    _prepare_workdir(config, workdir, overwrite=overwrite, is_main=is_main)
    if is_main:
        io.write_json(os.path.join(workdir, DATASET_FILE), dataset_record(spec, splits))

    # -- Load checkpoint (resume) or initialise -----------------------------------------
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    resume_stage, restored, snapshot, done_rows = 0, None, None, []
    runners: dict[int, Runner] = {}

    def runner_for(i: int) -> Runner:
        if i not in runners:
            runners.clear()  # one stage's compiled steps at a time
            runners[i] = Runner(setups[i], mesh, config.parallel.strategy)
        return runners[i]

    def restore_target(meta: dict) -> dict:
        _, target = checkpoint_target(config, int(meta.get("stage", 0)))
        target["state"] = runner_for(int(meta.get("stage", 0))).restore_target()
        return target

    # The newest checkpoint that restores and passes its checksums (corrupt ones skipped).
    found = checkpointer.restore_latest(restore_target)
    if found is not None:
        latest, payload, meta = found
        resume_stage = int(meta.get("stage", 0))
        done_rows = list(meta.get("rows", []))  # results of the stages before it
        runner = runner_for(resume_stage)
        restored = payload["state"]
        if runner.strategy == "pmap":
            restored = runner.to_device(restored)
        snapshot = payload.get("snapshot")
        log.info("resumed from step %d (stage %s) in %s", latest,
                 stages[resume_stage].name, checkpointer.directory)
        carry = None
    else:
        state0 = jax.jit(first.init_state)(jax.random.PRNGKey(config.seed))
        if config.init_from:
            state0, reinit = transfer(state0, config.init_from)
            log.info("initialised from %s; re-initialised (shape mismatch): %s",
                     config.init_from, ", ".join(reinit) or "none")
        carry = {"params": state0.params, "batch_stats": state0.batch_stats,
                 "masks": prune.get_masks(state0.opt_state), "rng": state0.rng}
        if uses_snapshot and config.rewind_step == 0:
            snapshot = jax.device_get(carry["params"])  # a host copy: steps donate the state

    # -- Stages ---------------------------------------------------------------------------
    rows, stats, final = done_rows, {}, None
    with contextlib.ExitStack() as stack:  # closes writers, restores signal handlers
        writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_main))
        writer.mark_start(found[0] if found is not None else 0)  # supersedes rows past it
        guard = stack.enter_context(PreemptionGuard())
        stack.enter_context(checkpointer)  # pending saves finish even if the run fails
        for i, st in enumerate(stages):
            if i < resume_stage:
                continue
            row = {"name": st.name, "kind": st.kind, "steps": st.steps}
            if is_main and config.progress:
                log.info("stage %d/%d %r: %s%s", i + 1, len(stages), st.name, st.kind,
                         f", {st.steps} steps" if st.kind == "train" else "")
            if st.kind == "train":
                runner = runner_for(i)
                if i == resume_stage and restored is not None:
                    state, restored = restored, None
                else:
                    state = runner.start(carry)
                extras = {"snapshot": snapshot} if uses_snapshot else {}
                snapshot_at = (config.rewind_step if uses_snapshot and snapshot is None
                               else None)
                state, stats_i, extras = train_loop(
                    runner, state, batches, evaluate,
                    checkpointer, writer, guard, num_steps=st.steps, step_offset=offsets[i],
                    meta={"stage": i, "stage_name": st.name, "rows": rows}, extras=extras,
                    snapshot_at=snapshot_at, show_progress=is_main and config.progress)
                snapshot = extras.get("snapshot", snapshot)
                stats = {**stats_i, **{k: v for k, v in stats.items() if stats_i.get(k) is None}}
                carry = carry_of(runner, state)
                result = evaluate(runner.run_eval, state)
            else:
                calibration = (os.path.join(workdir, CALIBRATION_FILE)
                               if is_main and st.kind == "quantize" else None)
                carry, evaluated, result, extra_row = _transform(
                    st, i, carry, snapshot, config, setups, first, batches, evaluate, mesh,
                    runner_for, calibration, offsets[i])
                row.update(extra_row)
            if st.kind == "train":
                evaluated = carry
                quantized = st.quant if st.quant.mode == "qat" else None
            else:
                quantized = evaluated.get("quant")
            # The row describes the weights it evaluated (for an evaluate stage with a
            # one-shot prune section: the pruned ones, not the unchanged carry).
            row.update(**evaluate.row(result), **stages_lib.weight_stats(
                evaluated["params"], evaluated["masks"],
                quantized.weight_bits if quantized is not None else 32,
                batch_stats=evaluated["batch_stats"],
                per_channel=quantized.per_channel if quantized is not None else True))
            evaluate.write(writer, offsets[i + 1], result, st.name)
            if is_main and config.progress:
                log.info("[%s] %s", st.name, _row_summary(row))
            rows.append(row)
            final = row
        checkpointer.close()

    # -- Results --------------------------------------------------------------------------
    # The final row's numbers describe the model the pipeline ends with (after a quantize
    # stage: the deployed int8 / fake-quant model, with the float one beside it).
    reported = {k: v for k, v in final.items()
                if k == "deployed" or k.endswith(("_accuracy", "_loss"))}
    results = {
        **reported,
        "steps": int(offsets[-1]), "num_devices": num_devices, "num_processes": pcount,
        "strategy": config.parallel.strategy, "model": config.model.name,
        "dataset": config.dataset.name, **splits.sizes(),
        "train_images_per_sec": stats.get("train_images_per_sec"),
        "compile_seconds": stats.get("compile_seconds"),
        "nonfinite_steps": stats.get("nonfinite_steps", 0),
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(carry["params"]))),
        "sparsity": final["sparsity"], "packed_bytes": final["packed_bytes"],
        "stages": rows,
    }
    results = io.to_jsonable(results)  # what results.json holds: non-finite values are None
    if is_main:
        io.write_json(os.path.join(workdir, "results.json"), results)
    return results


def _row_summary(row: dict) -> str:
    """A stage row in one log line: its accuracies, sparsity, bits and deployed model."""
    keys = ("validation_accuracy", "test_accuracy", "sparsity", "bits", "deployed")
    return " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                    for k in keys if row.get(k) is not None)


def _transform(st, i, carry, snapshot, config, setups, first, batches, evaluate, mesh,
               runner_for, calibration: str | None, step: int) -> tuple[dict, dict, dict, dict]:
    """Run a non-training stage on the carried weights.

    Returns (carry for the next stage, the weights evaluated, test result, row). They differ
    only for an evaluate stage with a one-shot prune section, which evaluates pruned weights
    and passes the carry on unchanged.
    """
    # Evaluate with the most recent train stage's compiled steps (same model).
    prev = max([j for j in setups if j <= i], default=None)
    if prev is None:
        prev = min(setups) if setups else None
    runner = runner_for(prev) if prev is not None else Runner(first, mesh, config.parallel.strategy)
    row: dict[str, Any] = {}
    if st.kind == "prune":
        params, masks = stages_lib.prune_once(carry["params"], carry["masks"], st.prune)
        carry = {**carry, "params": params, "masks": masks}
    elif st.kind == "rewind":
        if st.rewind == "snapshot":
            if snapshot is None:
                raise ValueError(f"stage {st.name!r}: no snapshot (rewind_step="
                                 f"{config.rewind_step} was never reached)")
            params = prune.apply_masks(snapshot, carry["masks"])
        else:
            rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + i)
            fresh = jax.jit(runner.setup.init_state)(rng).params
            params = prune.apply_masks(fresh, carry["masks"])
        carry = {**carry, "params": params}
    evaluated = carry
    if st.kind == "evaluate" and st.prune.method != "none":
        params, masks = stages_lib.prune_once(carry["params"], carry["masks"], st.prune)
        evaluated = {**carry, "params": params, "masks": masks}
    if st.kind == "quantize":
        carry = {**carry, "quant": st.quant}
    elif st.kind == "rewind":
        carry = {**carry, "quant": None}  # float weights again
    evaluated = carry if st.kind != "evaluate" else {**evaluated, "quant": carry.get("quant")}
    state = runner.start(evaluated)
    result = evaluate(runner.run_eval, state)
    if evaluated.get("quant") is not None:  # report the model a quantized pipeline deploys
        result, row = _quantized_result(runner.setup, evaluated, batches, evaluate, result,
                                        calibration=calibration,
                                        meta={"stage": st.name, "step": step})
    return carry, evaluated, result, row


CALIBRATION_FILE = "calibration.json"


def _quantized_result(setup: Setup, carry: dict, batches, evaluate: "Evaluator",
                      float_result: dict, *, calibration: str | None = None,
                      meta: dict | None = None) -> tuple[dict, dict]:
    """Evaluate the carried weights as the quantize stage `carry["quant"]` deploys them.

    Folds BN, calibrates activations on the first `calibration_batches` training batches,
    and evaluates fake-quant and (8-bit symmetric weights) real int8 inference; with
    `calibration`, writes the calibrated activation ranges of the BN-folded model there (what
    `jaxaccel compress export --int8` reads; `meta` names the stage and step). Returns the
    deployed model's result (int8 when it ran, else fake-quant) and the row fields that
    name each model's numbers: `deployed`, `float32_*`, `fake_quant_*`, `int8_*` for every
    evaluated split, and `int8_runtime_bytes`.
    """
    q = carry["quant"]
    variables = {"params": carry["params"], "batch_stats": carry["batch_stats"]}
    calib = [batches.batch(k)["image"] for k in range(q.calibration_batches)]
    ptq = stages_lib.ptq_evaluate(setup.model, variables, q, input_shape=setup.input_shape,
                                  calibration_images=calib, eval_batches=evaluate.batches,
                                  splits=evaluate.splits)
    if calibration is not None:
        quant.save_calibration(calibration, ptq["act_qparams"], ptq["weight_config"], meta=meta)
    deployed = "int8" if "int8" in ptq else "fake_quant"
    row = {"deployed": deployed, "int8_runtime_bytes": ptq.get("int8_runtime_bytes")}
    for name, res in (("float32", float_result), ("fake_quant", ptq["fake_quant"]),
                      ("int8", ptq.get("int8"))):
        if res is not None:
            row.update({f"{name}_{k}": v for k, v in Evaluator.row(res).items()})
    return ptq[deployed], row


def train_loop(runner: Runner, state: TrainState, batches, evaluate: Callable, checkpointer,
               writer, guard, *, num_steps: int, step_offset: int = 0,
               meta: dict | None = None, extras: dict | None = None,
               snapshot_at: int | None = None,
               show_progress: bool = True) -> tuple[TrainState, dict, dict]:
    """Run a stage's steps `state.step .. num_steps`: log, evaluate, checkpoint, honour
    preemption. Global step = `step_offset` + stage step (data order, checkpoint ids, logs).
    `extras` are saved beside the state; with `snapshot_at` the params after that many
    global steps are stored as `extras["snapshot"]` (for rewinding)."""
    config = runner.setup.config
    extras = dict(extras or {})
    stage_name = (meta or {}).get("stage_name", "train")
    start = runner.host_step(state)
    progress = metrics.Progress(step_offset + num_steps, step_offset + start,
                                enabled=show_progress, label=stage_name)
    window, rates, nonfinite, timed_steps = [], [], 0, 0
    compile_seconds = None
    # XLA:CPU can deadlock in a collective's rendezvous when two multi-device steps are in
    # flight at once (seen here with 8 simulated devices); wait for each step there.
    sync_each_step = jax.default_backend() == "cpu" and runner.mesh.devices.size > 1

    def save(done: int) -> None:
        checkpointer.save(step_offset + done, {"state": runner.to_host(state), **extras},
                          {**(meta or {}), "stage_step": done, "step": step_offset + done,
                           "epoch": (step_offset + done) // batches.steps_per_epoch})

    if snapshot_at is not None and snapshot_at == step_offset + start:
        extras["snapshot"] = jax.device_get(runner.to_host(state).params)
    t0 = time.perf_counter()
    for step in range(start, num_steps):
        state, m = runner.run_step(state, batches.batch(step_offset + step))
        if sync_each_step:
            jax.block_until_ready(m)
        window.append(m)
        done = step + 1
        if compile_seconds is None:  # the first step of a process includes compilation
            jax.block_until_ready(m)
            compile_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        else:
            timed_steps += 1
        if snapshot_at is not None and snapshot_at == step_offset + done:
            extras["snapshot"] = jax.device_get(runner.to_host(state).params)
        side_work, stopping = False, guard.should_stop()
        # Rows are also flushed before every checkpoint and on preemption, so the metrics
        # always cover the saved steps (and a non-finite step never gets checkpointed).
        if (done % config.log_every == 0 or done == num_steps or stopping
                or done % config.checkpoint_every == 0):
            host = jax.device_get(window)
            elapsed = time.perf_counter() - t0
            bad = [step_offset + done - len(host) + i for i, h in enumerate(host)
                   if np.sum(h["nonfinite"])]
            nonfinite += len(bad)
            if bad and config.nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss or gradient at step {bad[0]}; "
                                         f"set nonfinite='skip' to skip such updates")
            row = {k: float(np.mean([h[k] for h in host]))
                   for k in ("loss", "accuracy", "grad_norm")}
            row["lr"] = float(np.ravel(host[-1]["lr"])[0])
            row["nonfinite_total"] = nonfinite
            row["nonfinite"] = len(bad)  # per row: sums correctly across resumed runs
            if timed_steps:
                row["images_per_sec"] = timed_steps * config.batch_size / elapsed
                row["step_ms"] = 1000 * elapsed / timed_steps
                rates.append(row["images_per_sec"])
            row["stage"] = stage_name
            writer.write(step_offset + done, row, prefix="train")
            progress.update(step_offset + done, row)
            window, timed_steps, side_work = [], 0, True
        if config.eval_every and done % config.eval_every == 0 and done != num_steps:
            evaluate.write(writer, step_offset + done, evaluate(runner.run_eval, state),
                           stage_name)
            side_work = True
        if done % config.checkpoint_every == 0 or done == num_steps:
            save(done)
            side_work = True
        if side_work:
            t0 = time.perf_counter()
        if stopping:
            if checkpointer.latest_step() != step_offset + done:
                save(done)
            checkpointer.close()
            progress.close()
            raise Preempted(step_offset + done, guard.signal_name)
    progress.close()
    if start == num_steps and checkpointer.latest_step() != step_offset + num_steps:
        save(num_steps)
    return state, {"train_images_per_sec": statistics.median(rates) if rates else None,
                   "compile_seconds": compile_seconds, "nonfinite_steps": nonfinite}, extras


class Evaluator:
    """Loss and accuracy of a state on the validation split (when the run holds one out) and
    on the test split: `evaluator(run_eval, state) -> {split: {"loss", "accuracy", "count"}}`.

    Selection (early stopping, best points, searches) reads "validation"; "test" is reported
    beside it and never selects anything.
    """

    def __init__(self, splits: data.Splits, spec: data.DatasetSpec, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1):
        self.sources = {"validation": splits.validation, "test": splits.test}
        if splits.validation is None:
            del self.sources["validation"]
        self.spec, self.batch_size = spec, batch_size
        self.process_index, self.process_count = process_index, process_count

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.sources)

    def batches(self, split: str):
        """Every example of `split` once, as padded eval batches (this process's rows)."""
        return data.eval_batches(self.sources[split], self.spec, batch_size=self.batch_size,
                                 process_index=self.process_index,
                                 process_count=self.process_count)

    def __call__(self, run_eval: Callable, state: TrainState) -> dict[str, dict]:
        return {split: evaluate_source(run_eval, state, source=source, spec=self.spec,
                                       batch_size=self.batch_size,
                                       process_index=self.process_index,
                                       process_count=self.process_count)
                for split, source in self.sources.items()}

    @staticmethod
    def row(result: dict[str, dict]) -> dict[str, float]:
        """`{split}_accuracy` and `{split}_loss` of every evaluated split (results rows)."""
        return {f"{split}_{k}": r[k] for split, r in result.items() for k in ("accuracy", "loss")}

    @staticmethod
    def write(writer, step: int, result: dict[str, dict], stage_name: str) -> None:
        """One metrics row per split (`split` = "validation" / "test")."""
        for split, r in result.items():
            writer.write(step, {**r, "stage": stage_name}, prefix=split)


def evaluate_source(run_eval: Callable, state: TrainState, *, source, spec, batch_size: int,
                    process_index: int = 0, process_count: int = 1) -> dict:
    """Loss and accuracy over every example of `source` exactly once."""
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data.eval_batches(source, spec, batch_size=batch_size,
                                   process_index=process_index, process_count=process_count):
        out = jax.device_get(run_eval(state, batch))
        for k in sums:
            sums[k] += float(out[k])
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "count": int(sums["count"])}


def _check_model(config: ml_collections.ConfigDict, setup: Setup) -> None:
    """Trace the state initialiser (shapes only, no compute): a model that cannot be built
    from the config (e.g. a bad `model.kwargs` value) fails as one ConfigError line."""
    try:
        jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, KeyError,
            IndexError) as e:
        raise config_lib.ConfigError(
            f"model {config.model.name!r} (width={config.model.width}, "
            f"kwargs={dict(config.model.kwargs)}) cannot be built: "
            f"{' '.join(str(e).split())[:300]}") from e


DATASET_FILE = "dataset.json"


def dataset_record(spec: data.DatasetSpec, splits: data.Splits) -> dict[str, Any]:
    """What `dataset.json` holds: what the model takes (raw uint8 images of `image_shape`,
    normalised inside `predict` with `mean`/`std`) and what its logits mean (`class_names`,
    label i = name i), and how many examples each split had."""
    return {"name": spec.name, "kind": spec.kind, "image_shape": list(spec.image_shape),
            "num_classes": spec.num_classes, "class_names": list(spec.names()),
            "mean": list(spec.mean), "std": list(spec.std), **splits.sizes()}


def _trained_steps(workdir: str) -> int | None:
    """The newest checkpoint step in `workdir` (None: nothing trained yet)."""
    steps = [int(n) for n in _listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    return max(steps) if steps else None


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def extension_problem(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                      trained: int) -> str | None:
    """Why resuming a run that trained `trained` steps under `saved` with `config`'s different
    `num_steps` would silently change it (None if it would not).

    `num_steps` is the one run-time key that can change what a resumed run computes: a
    schedule that spans the run (cosine, warmup_cosine) would decay over a different length
    (the learning rate of the steps still to come jumps), IMP rounds of `num_steps` would
    change length, and fewer steps than already trained cannot be honoured. A constant or
    piecewise (absolute boundaries) schedule extends exactly: the first `trained` steps are
    those of a run planned with the new length, so such a run continues (and says so).
    """
    old, new = saved.num_steps, config.num_steps
    if tuple(config.stages):
        return None  # explicit stages: each has its own `steps`; num_steps is unused
    if new < trained:
        return (f"num_steps={new} is fewer than the {trained} steps this run already trained")
    if config.imp.rounds and not config.imp.steps:
        return (f"num_steps {old} -> {new} would change the length of every IMP round "
                f"(imp.steps=0 means rounds of num_steps)")
    schedule = config.optimizer.schedule
    if schedule in ("cosine", "warmup_cosine"):
        before = float(make_schedule(saved.optimizer, old)(trained))
        after = float(make_schedule(config.optimizer, new)(trained))
        return (f"num_steps {old} -> {new}: optimizer.schedule={schedule!r} decays over "
                f"num_steps, so the learning rate at step {trained} would jump from "
                f"{before:.2g} to {after:.2g}")
    return None


def _prepare_workdir(config, workdir: str, *, overwrite: bool, is_main: bool) -> None:
    """Refuse to mix experiments in one workdir (or to change a run silently on resume);
    write config.json for a new run."""
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = config_lib.from_json(f.read())
        diff = config_lib.differences(saved, config)
        trained = _trained_steps(workdir)
        if saved.num_steps != config.num_steps and trained is not None:
            problem = extension_problem(saved, config, trained)
            if problem is not None and not overwrite:
                raise config_lib.ConfigError(
                    f"workdir {workdir!r}: {problem}; use a new --workdir, or --overwrite to "
                    f"start again")
            if problem is not None:
                diff.append(problem)
            elif not tuple(config.stages):
                log.info("extending the run in %s: num_steps %d -> %d (schedule %r does not "
                         "depend on num_steps; continuing from step %d)", workdir,
                         saved.num_steps, config.num_steps, config.optimizer.schedule, trained)
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
        io.write_text(path, config_lib.to_json(config))


class _CallableModule(type(os)):
    """Lets `jaxaccel.train(config, workdir)` call `train` while `jaxaccel.train` stays a module."""

    def __call__(self, config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
        return train(config, workdir, **kwargs)


import sys  # noqa: E402

sys.modules[__name__].__class__ = _CallableModule
