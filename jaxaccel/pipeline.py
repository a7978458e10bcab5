"""`train(config, workdir)`: a run of an experiment's stages, in its workdir, resumable.

What `jaxaccel train` runs. Sections follow big_vision's train loop: set-up, workdir, load
checkpoint (resume) or initialise, stages, results. What each stage kind does is one entry of
`STAGE_KINDS` (kind -> function of (context, index, stage, carry) returning an `Outcome`), so a
new kind is one function and one line; the schema of stage sections is `jaxaccel.stages`, the
training steps `jaxaccel.loop`.

Between stages the *carry* passes on: params, batch_stats, masks, rng, and `quant` (the quant
section of a quantize stage whose model the pipeline now deploys; None once weights change).

Imports loop, state, loading (for `init_from`), checkpoint, config, stages, compress, data,
parallel, metrics, preemption and io; never sweeps, benchmarks or the CLI.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import shutil
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaccel import checkpoint as ckpt_lib
from jaxaccel import config as config_lib
from jaxaccel import autotune, data, io, loading, metrics, parallel, stacked
from jaxaccel import stages as stages_lib
from jaxaccel.compress import distill as distill_lib
from jaxaccel.compress import saliency
from jaxaccel.compress import prune, quant, sections, sharing
from jaxaccel.loop import Evaluator, Runner, results_record, stage_row, train_loop
from jaxaccel.preemption import PreemptionGuard
from jaxaccel.models.ensemble import Ensemble, average_logits, logistic_logits
from jaxaccel.state import (Distillation, Setup, TrainState, build, checkpoint_target,
                            make_eval_step, make_schedule, make_train_step)
from jaxaccel.state import HYPERPARAMETERS, cross_entropy, make_optimizer
from jaxaccel import workdir as workdir_files
from jaxaccel.workdir import (CALIBRATION_FILE, CONFIG_FILE, CONV_IMPL_FILE, DATASET_FILE,
                              ENSEMBLE_FILE, MEMBERS_DIR, RESULTS_FILE)

log = logging.getLogger("jaxaccel")



# ----------------------------------------------------------------------------------------
# Stage kinds
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What a stage hands back: the carry for the next stage, the weights its row describes
    (they differ only for an evaluate stage with a one-shot prune section), their evaluation
    (`{split: {"loss", "accuracy", "count"}}`) and extra row fields."""
    carry: dict
    evaluated: dict
    result: dict[str, dict]
    row: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """Everything the stages of one run share (built once by `train`)."""
    config: ml_collections.ConfigDict
    stages: list[ml_collections.ConfigDict]
    offsets: list[int]                 # global step at which each stage starts
    workdir: str
    is_main: bool
    setups: dict[int, Setup]           # per train stage
    first: Setup
    mesh: jax.sharding.Mesh
    batches: data.TrainBatches
    evaluator: Evaluator
    writer: metrics.MetricWriter
    guard: PreemptionGuard
    checkpointer: ckpt_lib.Checkpointer
    rows: list[dict]
    uses_snapshot: bool
    snapshot: Any = None               # params to rewind to (host copy)
    restored: Any = None               # the state a resumed train stage continues
    stats: dict = dataclasses.field(default_factory=dict)
    restored_meta: dict = dataclasses.field(default_factory=dict)
    _runners: dict[int, Runner] = dataclasses.field(default_factory=dict)
    _teaching: tuple[int, Any] | None = None
    on_evaluation: Callable[[int, dict], bool] | None = None  # see train(on_evaluation=)

    def runner_for(self, i: int) -> Runner:
        """Train stage i's compiled steps (one stage's at a time), with its teacher when the
        stage distils."""
        if i not in self._runners:
            self._runners.clear()
            setup = self.setups[i] if i in self.setups else self.first
            batches, teacher = self.batches, None
            if i in self.setups and self.stages[i].distill.teacher:
                teaching = self.teacher_for(i)
                setup = dataclasses.replace(setup, distill=teaching.distillation)
                teacher = teaching.variables if teaching.in_step else None
                if teaching.logits is not None:
                    batches = batches.with_extras({"teacher_logits": teaching.logits})
            self._runners[i] = Runner(setup, self.mesh, self.config.parallel.strategy,
                                      batches, teacher=teacher)
        return self._runners[i]

    def teacher_for(self, i: int) -> "Teaching":
        """Train stage i's teacher (loaded once per stage)."""
        if self._teaching is None or self._teaching[0] != i:
            self._teaching = (i, load_teacher(self.stages[i].distill, self.setups[i],
                                              self.batches))
        return self._teaching[1]

    def eval_runner(self, i: int) -> Runner:
        """The steps of the most recent train stage before stage i (the same model)."""
        previous = [j for j in self.setups if j <= i]
        return self.runner_for(max(previous) if previous else min(self.setups, default=-1))

    def add_stats(self, stats: dict) -> None:
        """Fold a train stage's loop stats into the run's (latest measurements win; non-finite
        steps add up)."""
        nonfinite = self.stats.get("nonfinite_steps", 0) + sum(stats["nonfinite_steps"])
        self.stats.update({k: v for k, v in stats.items() if v is not None})
        self.stats["nonfinite_steps"] = nonfinite


STAGE_KINDS: dict[str, Callable[[Context, int, ml_collections.ConfigDict, dict], Outcome]] = {}


def stage_kind(name: str) -> Callable:
    """Register the function that runs stages of kind `name` (its schema: `jaxaccel.stages`)."""
    def register(fn: Callable) -> Callable:
        STAGE_KINDS[name] = fn
        return fn
    return register


@stage_kind("train")
def run_train(ctx: Context, i: int, st: ml_collections.ConfigDict, carry: dict) -> Outcome:
    """`st.steps` optimizer steps (gradual pruning / QAT inside the step when configured);
    K stacked members trained as one program for an ensemble (`ensemble.members` K > 1)."""
    if ctx.config.ensemble.members > 1:
        return _train_ensemble(ctx, i, st)
    runner = ctx.runner_for(i)
    teacher = ctx.teacher_for(i).record if st.distill.teacher else None
    if ctx.restored is not None:
        saved = ctx.restored_meta.get("teacher")
        if teacher is not None and saved is not None and saved["hash"] != teacher["hash"]:
            raise config_lib.ConfigError(
                f"stage {st.name!r}: the teacher {teacher['path']} changed since this run "
                f"checkpointed (content {saved['hash']} -> {teacher['hash']}); resuming would "
                f"distil from another model: use a new --workdir or --overwrite")
        state, ctx.restored = ctx.restored, None
    else:
        state = runner.start(carry)
    extras = {"snapshot": ctx.snapshot} if ctx.uses_snapshot else {}
    snapshot_at = ctx.config.rewind_step if ctx.uses_snapshot and ctx.snapshot is None else None
    state, stats, extras, _ = train_loop(
        runner, state, ctx.config, num_steps=st.steps, writers=[ctx.writer],
        checkpointer=ctx.checkpointer, guard=ctx.guard, evaluator=ctx.evaluator,
        step_offset=ctx.offsets[i],
        meta=lambda: {"stage": i, "stage_name": st.name, "rows": ctx.rows,
                      **({"teacher": teacher} if teacher is not None else {})},
        extras=extras, snapshot_at=snapshot_at, stage_name=st.name,
        show_progress=ctx.is_main and ctx.config.progress, on_evaluation=ctx.on_evaluation)
    ctx.snapshot = extras.get("snapshot", ctx.snapshot)
    ctx.add_stats(stats)
    carry = carry_of(runner, state)
    result = ctx.evaluator(runner.run_eval, state)
    row = {"teacher": {**teacher, "temperature": st.distill.temperature,
                       "alpha": st.distill.alpha}} if teacher is not None else {}
    return Outcome(carry, {**carry, "quant": st.quant if st.quant.mode == "qat" else None}, result,
                   row)


@stage_kind("prune")
def run_prune(ctx: Context, i: int, st: ml_collections.ConfigDict, carry: dict) -> Outcome:
    """One-shot magnitude masks, an IMP round, SNIP or random masks (subsets of the carried
    masks)."""
    params, masks = _prune_once(ctx, i, st.prune, carry)
    carry = {**carry, "params": params, "masks": masks}
    return Outcome(carry, carry, *_evaluate(ctx, i, st, carry))


RANDOM_MASK_STREAM = 2  # random masks: key fold_in(fold_in(PRNGKey(seed), this), stage index)


def _prune_once(ctx: Context, i: int, p: ml_collections.ConfigDict, carry: dict) -> tuple:
    """`sections.prune_once` of the carried weights and masks, given what `snip` needs (the
    scores, `_snip_scores`) and `random` (a key from the run's seed and the stage index, so a
    resumed or repeated run draws the same mask)."""
    extra: dict[str, Any] = {}
    if p.method == "snip":
        extra["scores"] = _snip_scores(ctx, i, carry, p.batches)
    elif p.method == "random":
        key = jax.random.fold_in(jax.random.PRNGKey(ctx.config.seed), RANDOM_MASK_STREAM)
        extra["key"] = jax.random.fold_in(key, i)
    return sections.prune_once(carry["params"], carry["masks"], p, **extra)


def _snip_scores(ctx: Context, i: int, carry: dict, num_batches: int) -> Any:
    """`saliency.snip_scores` of the carried weights (host values) on the first `num_batches`
    training batches, with the loss the train step minimises: cross-entropy (with the
    config's label smoothing) of a forward pass in training mode (BN on batch statistics;
    the running statistics are not changed). Params are placed on the run's mesh as the
    strategy places them (pmap: replicated) and batches split over it, as in a train step."""
    if jax.process_count() > 1:
        raise config_lib.ConfigError("prune.method='snip' runs in a single process")
    setup = ctx.eval_runner(i).setup
    model, num_classes = setup.model, setup.spec.num_classes
    smoothing, batch_stats = ctx.config.label_smoothing, carry["batch_stats"]

    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                train=True, mutable=["batch_stats"])
        return cross_entropy(logits, batch["label"], num_classes, smoothing).mean()

    strategy = "fsdp" if ctx.config.parallel.strategy == "fsdp" else "data"
    params = jax.device_put(carry["params"],
                            parallel.state_shardings(carry["params"], ctx.mesh, strategy))
    batches = (parallel.shard_batch(ctx.batches.batch(k), ctx.mesh) for k in range(num_batches))
    return jax.device_get(saliency.snip_scores(loss_fn, params, batches))


@stage_kind("rewind")
def run_rewind(ctx: Context, i: int, st: ml_collections.ConfigDict, carry: dict) -> Outcome:
    """Weights back to the snapshot (or fresh random ones, the lottery control), masked."""
    if st.rewind == "snapshot":
        if ctx.snapshot is None:
            raise ValueError(f"stage {st.name!r}: no snapshot (rewind_step="
                             f"{ctx.config.rewind_step} was never reached)")
        params = prune.apply_masks(ctx.snapshot, carry["masks"])
    else:
        rng = jax.random.fold_in(jax.random.PRNGKey(ctx.config.seed), 1000 + i)
        fresh = jax.jit(ctx.eval_runner(i).setup.init_state)(rng).params
        params = prune.apply_masks(fresh, carry["masks"])
    carry = {**carry, "params": params, "quant": None}  # float weights again
    return Outcome(carry, carry, *_evaluate(ctx, i, st, carry))


@stage_kind("quantize")
def run_quantize(ctx: Context, i: int, st: ml_collections.ConfigDict, carry: dict) -> Outcome:
    """Post-training quantization: the pipeline deploys the quantized model from here on."""
    carry = {**carry, "quant": st.quant}
    return Outcome(carry, carry, *_evaluate(ctx, i, st, carry))


@stage_kind("cluster")
def run_cluster(ctx: Context, i: int, st: ml_collections.ConfigDict, carry: dict) -> Outcome:
    """Weight sharing: every kernel's kept weights replaced by the nearest of 2^bits k-means
    centroids (`compress.sharing.share_weights`); later train stages fine-tune them."""
    c = st.cluster
    bits = sharing.layer_bits(carry["params"], c.bits, dict(c.per_layer))
    params, assignments, _ = sharing.share_weights(carry["params"], carry["masks"], bits,
                                                   init=c.init, iters=c.iters)
    carry = {**carry, "params": params, "clusters": assignments}
    result, row = _evaluate(ctx, i, st, carry)
    distinct = sharing.distinct_values(params, carry["masks"])
    row = {**row, "cluster_bits": bits, "max_shared_values": max(distinct.values(), default=0)}
    return Outcome(carry, carry, result, row)


@stage_kind("evaluate")
def run_evaluate(ctx: Context, i: int, st: ml_collections.ConfigDict, carry: dict) -> Outcome:
    """The carried model evaluated; with a one-shot (or snip / random) prune section, the
    carried weights under those masks (the carry itself passes on unchanged)."""
    evaluated = carry
    if st.prune.method != "none":
        params, masks = _prune_once(ctx, i, st.prune, carry)
        evaluated = {**carry, "params": params, "masks": masks}
    return Outcome(carry, evaluated, *_evaluate(ctx, i, st, evaluated))


def _evaluate(ctx: Context, i: int, st: ml_collections.ConfigDict,
              weights: dict) -> tuple[dict, dict]:
    """(result, row fields) of `weights` as the pipeline would deploy them: float, or — when
    a quantize stage came before — the quantized model (see `_quantized_result`)."""
    runner = ctx.eval_runner(i)
    result = ctx.evaluator(runner.run_eval, runner.start(weights))
    if weights.get("quant") is None:
        return result, {}
    calibration = (os.path.join(ctx.workdir, CALIBRATION_FILE)
                   if ctx.is_main and st.kind == "quantize" else None)
    return _quantized_result(runner.setup, weights, ctx.batches, ctx.evaluator, result,
                             calibration=calibration,
                             meta={"stage": st.name, "step": ctx.offsets[i]})


def _quantized_result(setup: Setup, carry: dict, batches: data.TrainBatches,
                      evaluator: Evaluator, float_result: dict, *,
                      calibration: str | None = None,
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
    ptq = sections.ptq_evaluate(setup.model, variables, q, input_shape=setup.input_shape,
                                calibration_images=calib, eval_batches=evaluator.batches,
                                splits=evaluator.splits)
    if calibration is not None:
        quant.save_calibration(calibration, ptq["act_qparams"], ptq["weight_config"], meta=meta)
    deployed = "int8" if "int8" in ptq else "fake_quant"
    row = {"deployed": deployed, "int8_runtime_bytes": ptq.get("int8_runtime_bytes")}
    for name, res in (("float32", float_result), ("fake_quant", ptq["fake_quant"]),
                      ("int8", ptq.get("int8"))):
        if res is not None:
            row.update({f"{name}_{k}": v for k, v in Evaluator.row(res).items()})
    return ptq[deployed], row


# ----------------------------------------------------------------------------------------
# Ensembles
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class EnsemblePlan:
    """How an ensemble's K members run as one program (`stacked.choose_plan`)."""
    members: int
    seeds: list[int]
    abstract: Any
    mode: str
    layout: str
    scan: bool
    target: Any  # abstract stacked states with their shardings
    configs: list = dataclasses.field(default_factory=list)  # each member's own config


def ensemble_plan(ctx: Context, i: int) -> EnsemblePlan:
    """Stage i's members: seeds seed..seed+K-1, placed and stepped as `choose_plan` says."""
    config, setup = ctx.config, ctx.setups[i]
    members = config.ensemble.members
    abstract = jax.eval_shape(jax.vmap(setup.init_state),
                              jax.ShapeDtypeStruct((members, 2), jnp.uint32))
    convolutional = any(len(x.shape) >= 5 for x in jax.tree.leaves(abstract.params))
    mode, layout, scan = stacked.choose_plan(members, ctx.mesh.devices.size,
                                             convolutional=convolutional)
    shardings = stacked.state_shardings(abstract, ctx.mesh, layout)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    configs = [config_lib.member_config(config, k) for k in range(members)]
    return EnsemblePlan(members, [c.seed for c in configs], abstract, mode, layout, scan, target,
                        configs)


def member_hyperparameters(configs: list[ml_collections.ConfigDict]
                           ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The members' step hyperparameters (`state.HYPERPARAMETERS` and label_smoothing):
    ((K,) float32 arrays of those that differ between members, the shared values of the
    others)."""
    opts = [config_lib.member_optimizer(c) for c in configs]
    table = {name: [float(o[name]) for o in opts] for name in HYPERPARAMETERS}
    table["label_smoothing"] = [float(c.label_smoothing) for c in configs]
    varying = {k: np.asarray(v, np.float32) for k, v in table.items() if len(set(v)) > 1}
    return varying, {k: v[0] for k, v in table.items() if k not in varying}


def _member_step(setup: Setup, st: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 shared: dict[str, float]) -> Callable:
    """One member's train step with its hyperparameters `hp` (traced (K,) entries, per
    member) over the `shared` ones; the optimizer's structure is the config's (one program)."""
    opt = stages_lib.stage_optimizer(config, st)

    def step_fn(state: TrainState, batch: dict, hp: dict):
        values = {**shared, **hp}
        inner, schedule = make_optimizer(opt, max(st.steps, 1),
                                         {k: values[k] for k in HYPERPARAMETERS})
        step = make_train_step(setup.model, prune.masked(inner, ste=setup.ste), schedule,
                               num_classes=setup.spec.num_classes,
                               label_smoothing=values["label_smoothing"],
                               skip_nonfinite=config.nonfinite == "skip",
                               mask_update=setup.mask_update, qat_config=setup.qat_config,
                               ste=setup.ste)
        return step(state, batch)

    return step_fn


def _train_ensemble(ctx: Context, i: int, st: ml_collections.ConfigDict) -> Outcome:
    """Train the K members of an ensemble as one program (`stacked.StackedRunner` under the
    one loop), then combine them on the evaluation splits (`combine_ensemble`)."""
    config, setup = ctx.config, ctx.setups[i]
    plan = ensemble_plan(ctx, i)
    if jax.process_count() > 1:
        raise config_lib.ConfigError("ensemble.members > 1 runs in a single process")
    batches = stacked.StackedBatches(ctx.batches.source, setup.spec, plan.seeds,
                                     batch_size=config.batch_size,
                                     crop_padding=config.dataset.crop_padding,
                                     flip=config.dataset.flip)
    step = make_train_step(setup.model, setup.tx, setup.schedule,
                           num_classes=setup.spec.num_classes,
                           label_smoothing=config.label_smoothing,
                           skip_nonfinite=config.nonfinite == "skip",
                           mask_update=setup.mask_update, qat_config=setup.qat_config,
                           ste=setup.ste)
    eval_fn = make_eval_step(setup.model, num_classes=setup.spec.num_classes,
                             qat_config=setup.qat_config, ste=setup.ste)
    if ctx.restored is not None:
        states, ctx.restored = ctx.restored, None
    else:  # each member starts as its own run with its seed would
        init = jax.jit(setup.init_state)
        members = jax.device_get([init(jax.random.PRNGKey(s)) for s in plan.seeds])
        states = jax.tree.map(lambda *xs: np.stack(xs), *members)
    states = jax.device_put(states, jax.tree.map(lambda t: t.sharding, plan.target))
    start = int(jax.device_get(states.step[0]))
    block = (stacked.block_steps((config.log_every, config.checkpoint_every, config.eval_every,
                                  st.steps), plan.members, config.batch_size,
                                 batches.example_bytes, start) if plan.scan else 1)
    hp: dict[str, np.ndarray] = {}
    member_step = lambda s, b, hp: step(s, b)  # noqa: E731
    if tuple(config.ensemble.overrides):  # per-member hyperparameters, traced in the one step
        hp, shared = member_hyperparameters(plan.configs)
        member_step = _member_step(setup, st, config, shared)
    runner = stacked.StackedRunner(member_step, eval_fn, plan.abstract, batches,
                                   hp, ctx.mesh, mode=plan.mode, layout=plan.layout,
                                   scan=plan.scan, block=block, start=start, num_steps=st.steps)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(metrics.MetricWriter(
            os.path.join(ctx.workdir, MEMBERS_DIR, f"member{k}"), enabled=ctx.is_main))
            for k in range(plan.members)]
        for w in writers:
            w.mark_start(ctx.offsets[i] + start)
        states, stats, _, failed = train_loop(
            runner, states, config, num_steps=st.steps, writers=writers,
            checkpointer=ctx.checkpointer, guard=ctx.guard, evaluator=ctx.evaluator,
            step_offset=ctx.offsets[i],
            meta=lambda: {"stage": i, "stage_name": st.name, "rows": ctx.rows},
            stage_name=st.name, show_progress=ctx.is_main and config.progress)
    if failed:
        k, message = next(iter(failed.items()))
        raise FloatingPointError(f"ensemble member {k} (seed {plan.seeds[k]}): {message}")
    ctx.add_stats({**stats, "nonfinite_steps": stats["nonfinite_steps"]})
    host = jax.device_get(states)
    masks = prune.get_masks(host.opt_state)
    carry = {"params": prune.apply_masks(host.params, masks),  # params ⊙ masks
             "batch_stats": host.batch_stats, "masks": masks, "rng": host.rng}
    record, result, fitted = combine_ensemble(setup, carry, ctx.evaluator, config.ensemble)
    overrides = tuple(config.ensemble.overrides)
    for k, member in enumerate(record["members"]):
        member.update(seed=plan.seeds[k], overrides=dict(overrides[k]) if overrides else {})
    if ctx.is_main:
        io.write_json(os.path.join(ctx.workdir, ENSEMBLE_FILE),
                      combination_record(plan.seeds, config.ensemble.combine, fitted))
    return Outcome(carry, carry, result, {"ensemble": record})


def combination_record(seeds: list[int], combine: str, fitted: Any,
                       workdirs: list[str] | None = None) -> dict:
    """What ensemble.json holds: the members (their seeds; their workdirs, relative to the
    ensemble's, when each is a run of its own) and how they combine (`combine_logits`'s
    fitted weights or logistic stacker), as `loading.load` reads it back."""
    weights = fitted if combine == "stack" else None
    logistic = fitted if combine == "logistic" else None
    return {"members": len(seeds), "seeds": list(seeds), "combine": combine,
            **({"workdirs": list(workdirs)} if workdirs else {}),
            "weights": None if weights is None else [float(w) for w in weights],
            "logistic": None if logistic is None else
            {"kernel": np.asarray(logistic[0], np.float64).tolist(),
             "bias": np.asarray(logistic[1], np.float64).tolist()}}


def combine_ensemble(setup: Setup, members: dict, evaluator: Evaluator,
                     ensemble: ml_collections.ConfigDict) -> tuple[dict, dict, Any]:
    """Evaluate every member and their combinations on every evaluation split.

    `average`: the mean of the members' probabilities; with a validation split, fit on it
    only (never on test), `stacked`: per-member weights (`distill.stack_weights`) and
    `logistic`: a logistic regression over all the members' logits
    (`distill.fit_logistic_stacker`). Each gets accuracy, loss (NLL) and expected calibration
    error per split. Returns (the `ensemble` record of results.json, the chosen
    (`ensemble.combine`) combination's evaluation, its parameters: the weights for "stack",
    (kernel, bias) for "logistic", None for the plain average).
    """
    variables = {"params": members["params"], "batch_stats": members["batch_stats"]}
    logits, labels = ensemble_logits(Ensemble(setup.model), variables, evaluator)
    return combine_logits(logits, labels, ensemble.combine)


def ensemble_logits(model: Ensemble, variables: Any, evaluator: Evaluator
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every member's logits, (K, N, C), and the labels, (N,), of every evaluation split."""
    member_logits = jax.jit(model.member_logits)
    logits, labels = {}, {}
    for split in evaluator.splits:
        rows, ys = [], []
        for b in evaluator.batches(split):
            keep = np.asarray(b["mask"], bool)
            rows.append(np.asarray(member_logits(variables, jnp.asarray(b["image"])))[:, keep])
            ys.append(np.asarray(b["label"])[keep])
        logits[split], labels[split] = np.concatenate(rows, axis=1), np.concatenate(ys)
    return logits, labels


def combine_logits(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], combine: str
                   ) -> tuple[dict, dict, Any]:
    """`combine_ensemble` on the members' logits per split (`ensemble_logits`)."""
    weights = logistic = None
    combos = {"average": lambda z: average_logits(z)}
    if "validation" in logits:
        weights = distill_lib.stack_weights(logits["validation"], labels["validation"])
        logistic = distill_lib.fit_logistic_stacker(logits["validation"], labels["validation"])
        combos["stacked"] = lambda z: average_logits(z, weights)
        combos["logistic"] = lambda z: logistic_logits(z, *logistic)
    record: dict[str, Any] = {"members": [], "weights": None if weights is None
                              else [float(w) for w in weights]}
    for k in range(next(iter(logits.values())).shape[0]):
        record["members"].append({split: _scores(logits[split][k], labels[split])
                                  for split in logits})
    for name, combined in combos.items():
        record[name] = {split: _scores(np.asarray(combined(jnp.asarray(logits[split]))),
                                       labels[split]) for split in logits}
    chosen = {"stack": "stacked", "logistic": "logistic"}.get(combine, "average")
    result = {split: {"loss": s["loss"], "accuracy": s["accuracy"], "count": s["count"]}
              for split, s in record[chosen].items()}
    return record, result, {"stacked": weights, "logistic": logistic}.get(chosen)


def _scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, NLL and expected calibration error of logits against labels."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "loss": float(-np.mean(logp[np.arange(len(labels)), labels])),
            "ece": distill_lib.expected_calibration_error(logits, labels),
            "count": int(len(labels))}


def train_members(config: ml_collections.ConfigDict, workdir: str, *,
                  overwrite: bool = False) -> dict:
    """An ensemble whose members differ in shapes or program (`config.sequential_members`:
    e.g. `ensemble.overrides` setting model.*, batch_size or optimizer.name).

    Each member is a run of its own in WORKDIR/members/member<k> (`config.member_config`),
    trained (or resumed) one after another; a member that finished is not trained again.
    Then the members are loaded and combined on the ensemble's evaluation splits exactly as
    stacked members are (`combine_logits`: average, stack or logistic, fit on validation
    only); results.json and ensemble.json (with the members' workdirs) as for any ensemble.
    """
    if jax.process_count() > 1:
        raise config_lib.ConfigError("ensemble.members > 1 runs in a single process")
    members = config.ensemble.members
    configs = [config_lib.member_config(config, k) for k in range(members)]
    parallel.set_cpu_devices(config.parallel.cpu_devices)
    num_devices = config.parallel.num_devices or jax.device_count()
    for k, c in enumerate(configs):  # every member's problems before anything is written
        try:
            config_lib.validate_devices(c, num_devices)
            check_model(c, build(c, stages_lib.expand(c)[0]))
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"ensemble.overrides[{k}]: {e}") from None
    first = build(config, stages_lib.expand(config)[0])
    splits = data.splits_for(config.dataset)
    prepare_workdir(config, workdir, overwrite=overwrite)
    io.write_json(os.path.join(workdir, DATASET_FILE), dataset_record(first.spec, splits))
    relative = [os.path.join(MEMBERS_DIR, f"member{k}") for k in range(members)]
    member_results = []
    for k, (c, rel) in enumerate(zip(configs, relative)):
        where = os.path.join(workdir, rel)
        done = os.path.join(where, RESULTS_FILE)
        if (os.path.isfile(done) and os.path.isfile(os.path.join(where, CONFIG_FILE))
                and not config_lib.differences(loading.read_config(where), c)):
            log.info("ensemble member %d/%d: finished in %s", k + 1, members, where)
            member_results.append(io.read_json(done))
            continue
        log.info("ensemble member %d/%d in %s", k + 1, members, where)
        member_results.append(train(c, where, overwrite=overwrite))

    # -- Combination: the members' logits on the ensemble's splits -----------------------
    loaded = [loading.load(os.path.join(workdir, rel)) for rel in relative]
    model = Ensemble(tuple(m.model for m in loaded))
    variables = {"params": tuple(m.variables["params"] for m in loaded),
                 "batch_stats": tuple(m.variables["batch_stats"] for m in loaded)}
    evaluator = Evaluator(splits, first.spec, batch_size=config.eval_batch_size)
    record, result, fitted = combine_logits(*ensemble_logits(model, variables, evaluator),
                                            config.ensemble.combine)
    overrides = tuple(config.ensemble.overrides)
    for k, member in enumerate(record["members"]):
        member.update(seed=configs[k].seed, overrides=dict(overrides[k]), workdir=relative[k],
                      model=configs[k].model.name, num_params=member_results[k]["num_params"])
    io.write_json(os.path.join(workdir, ENSEMBLE_FILE),
                  combination_record([c.seed for c in configs], config.ensemble.combine, fitted,
                                     relative))
    params = variables["params"]
    st = stages_lib.expand(config)[0]
    row = {**stage_row(st, result, {"params": params, "batch_stats": variables["batch_stats"],
                                    "masks": jax.tree.map(lambda p: p != 0, params)}),
           "steps": sum(int(r["steps"]) for r in member_results), "ensemble": record}
    results = results_record(
        config, [row], steps=row["steps"],
        stats={"nonfinite_steps": sum(int(np.sum(r.get("nonfinite_steps", 0)))
                                      for r in member_results)},
        sizes=splits.sizes(), num_devices=member_results[0]["num_devices"], num_processes=1,
        num_params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
        worker=parallel.worker_record())
    io.write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results


# ----------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Teaching:
    """A train stage's teacher: the step's `Distillation`, the teacher's frozen variables
    (when its forward runs in the step) or its logits for every training example
    (precomputed), and the record a checkpoint keeps (`path`, content `hash`)."""
    distillation: Distillation
    variables: Any
    logits: np.ndarray | None
    record: dict
    in_step: bool


def load_teacher(d: ml_collections.ConfigDict, student: Setup,
                 batches: data.TrainBatches) -> Teaching:
    """Load `d.teacher` (a run's workdir: a model or an ensemble, with its own normalisation)
    for a student built as `student`; refuses a teacher of another shape in one line."""
    teacher = loading.load(d.teacher)
    check_teacher(d.teacher, teacher.spec, student.spec)
    model, spec = teacher.model, teacher.spec

    def teacher_apply(variables, images):  # images normalised as the student's data
        return model.apply(variables, distill_lib.renormalize(images, student.spec, spec),
                           train=False)

    variables = jax.device_get(teacher.variables)
    checksums = ckpt_lib.tree_checksums(variables)
    digest = hashlib.sha256(io.dumps(checksums).encode()).hexdigest()[:16]
    record = {"path": os.path.abspath(d.teacher), "hash": digest, "step": teacher.step}
    if d.precompute:  # one forward per training example, in order; the step reads its rows
        apply = jax.jit(teacher_apply)
        images, _ = data.read_arrays(batches.source, np.arange(batches.num_examples))
        logits = np.concatenate([
            np.asarray(apply(variables, data.normalize(images[k:k + 512], student.spec)))
            for k in range(0, len(images), 512)])
        distillation = Distillation(d.temperature, d.alpha)
        return Teaching(distillation, None, logits.astype(np.float32), record, in_step=False)
    return Teaching(Distillation(d.temperature, d.alpha, teacher_apply), variables, None, record,
                    in_step=True)


def check_teacher(path: str, teacher: data.DatasetSpec, student: data.DatasetSpec) -> None:
    """A teacher must see the student's images and predict the student's classes."""
    if teacher.num_classes != student.num_classes:
        raise config_lib.ConfigError(
            f"distill.teacher={path!r} predicts {teacher.num_classes} classes, the student "
            f"{student.num_classes}")
    if tuple(teacher.image_shape) != tuple(student.image_shape):
        raise config_lib.ConfigError(
            f"distill.teacher={path!r} takes images of shape {tuple(teacher.image_shape)}, "
            f"the student {tuple(student.image_shape)}")


def carry_of(runner: Runner, state: TrainState) -> dict:
    """What passes from one stage to the next: weights, BN stats, masks, rng (and the cluster
    assignments of shared weights)."""
    host = runner.to_host(state)
    masks = prune.get_masks(host.opt_state)
    carry = {"params": prune.apply_masks(host.params, masks),  # straight-through: dense → model
             "batch_stats": host.batch_stats, "masks": masks, "rng": host.rng}
    if sharing.has_assignments(host.opt_state):
        carry["clusters"] = sharing.get_assignments(host.opt_state)
    return carry


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          on_evaluation: Callable[[int, dict], bool] | None = None) -> dict:
    """Train (or resume) the experiment `config` in `workdir`; returns what results.json holds.

    Runs the config's stages in order (one `train` stage if it declares none). Checkpoints
    carry the stage and step, so a run killed in any stage resumes there.
    `on_evaluation(global step, {split: {"loss", "accuracy", "count"}})` sees the train loop's
    evaluations every `eval_every` steps (single-model runs only); returning True checkpoints
    that step and raises `loop.StoppedEarly` (a search's pruner).
    """
    # -- Set-up ------------------------------------------------------------------------
    config = copy.deepcopy(config)  # private copy (stages hold nested sections)
    config_lib.validate(config)
    if on_evaluation is not None and config.ensemble.members > 1:
        raise ValueError("on_evaluation needs a single-model run, not an ensemble "
                         f"(ensemble.members={config.ensemble.members})")
    if config_lib.sequential_members(config):
        return train_members(config, workdir, overwrite=overwrite)
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

    conv = conv_impl_choice(config, workdir, pcount)  # what conv_impl "auto" means here
    built = config
    if conv.impl != config.model.conv_impl:
        built = copy.deepcopy(config)
        built.model.conv_impl = conv.impl
    setups = {i: build(built, s) for i, s in enumerate(stages) if s.kind == "train"}
    first = setups[min(setups)] if setups else build(built, stages[0])
    splits = data.splits_for(config.dataset)
    batches = data.TrainBatches(splits.train, first.spec, global_batch_size=config.batch_size,
                                seed=config.seed, crop_padding=config.dataset.crop_padding,
                                flip=config.dataset.flip, process_index=pid,
                                process_count=pcount,
                                cache=pcount == 1)  # several processes: each reads its rows only
    evaluator = Evaluator(splits, first.spec, batch_size=config.eval_batch_size,
                          process_index=pid, process_count=pcount)
    check_cluster_layers(stages, first)
    for i, setup in setups.items():
        check_model(config, setup)
        if stages[i].distill.teacher:  # before anything is written
            check_teacher(stages[i].distill.teacher,
                          data.spec_for(loading.read_config(stages[i].distill.teacher).dataset),
                          setup.spec)

    # -- Workdir: only now, with the config, data and model known to work ----------------
    prepare_workdir(config, workdir, overwrite=overwrite, is_main=is_main)
    if is_main:
        io.write_json(os.path.join(workdir, DATASET_FILE), dataset_record(first.spec, splits))
        io.write_json(os.path.join(workdir, CONV_IMPL_FILE), conv.record())

    with contextlib.ExitStack() as stack:  # closes writers, restores signal handlers
        checkpointer = stack.enter_context(  # pending saves finish even if the run fails
            ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints))
        ctx = Context(config=config, stages=stages,
                      offsets=np.cumsum([0] + [s.steps for s in stages]).tolist(),
                      workdir=workdir, is_main=is_main, setups=setups, first=first,
                      mesh=parallel.make_mesh(num_devices), batches=batches,
                      evaluator=evaluator, writer=None, guard=None, checkpointer=checkpointer,
                      rows=[], uses_snapshot=any(s.kind == "rewind" and s.rewind == "snapshot"
                                                 for s in stages),
                      on_evaluation=on_evaluation)

        # -- Load checkpoint (resume) or initialise -------------------------------------
        resume_stage, start_step, carry = _resume_or_init(ctx)
        ctx.writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_main))
        ctx.writer.mark_start(start_step)  # supersedes rows a crashed run wrote past it
        ctx.guard = stack.enter_context(PreemptionGuard())

        # -- Stages -----------------------------------------------------------------------
        for i, st in enumerate(stages):
            if i < resume_stage:
                continue
            if is_main and config.progress:
                log.info("stage %d/%d %r: %s%s", i + 1, len(stages), st.name, st.kind,
                         f", {st.steps} steps" if st.kind == "train" else "")
            outcome = STAGE_KINDS[st.kind](ctx, i, st, carry)
            carry = outcome.carry
            row = {**stage_row(st, outcome.result, outcome.evaluated,
                               quant_section=outcome.evaluated.get("quant")), **outcome.row}
            evaluator.write(ctx.writer, ctx.offsets[i + 1], outcome.result, st.name)
            if is_main and config.progress:
                log.info("[%s] %s", st.name, _row_summary(row))
            ctx.rows.append(row)

    # -- Results --------------------------------------------------------------------------
    results = results_record(config, ctx.rows, steps=int(ctx.offsets[-1]), stats=ctx.stats,
                             sizes=splits.sizes(), num_devices=num_devices,
                             num_processes=pcount,
                             num_params=int(sum(np.size(x)
                                                for x in jax.tree.leaves(carry["params"]))),
                             worker=parallel.worker_record(), conv_impl=conv.record())
    if is_main:
        io.write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results


def conv_impl_choice(config: ml_collections.ConfigDict, workdir: str,
                     num_processes: int = 1) -> autotune.Choice:
    """What the run's `model.conv_impl` means (`autotune.choose`): a resumed run keeps the
    choice it started with (WORKDIR/conv_impl.json), so it never computes differently from
    an uninterrupted one; a multi-process run is not tuned (every process must agree)."""
    path = os.path.join(workdir, CONV_IMPL_FILE)
    if config.model.conv_impl == "auto" and os.path.isfile(path) and trained_steps(workdir):
        saved = io.read_json(path, lenient=True) or {}
        if saved.get("impl") in autotune.CANDIDATES:
            return autotune.Choice(saved["impl"], "chosen when this run started: "
                                   + str(saved.get("reason", "")), saved.get("key", ""),
                                   saved.get("timings_ms"))
    if num_processes > 1 and config.model.conv_impl == "auto":
        return autotune.builtin(config, "the model's default (a multi-process run is not tuned)")
    return autotune.choose(config, mode="train")


def _resume_or_init(ctx: Context) -> tuple[int, int, dict | None]:
    """(stage to start at, its global step, the carry — None when a checkpoint's state is
    resumed, `ctx.restored`). The newest checkpoint that restores and passes its checksums
    is used (corrupt ones are skipped); without one, the first stage's initial state."""
    config = ctx.config

    def restore_target(meta: dict) -> dict:
        stage = int(meta.get("stage", 0))
        _, target = checkpoint_target(config, stage)
        if "states" in target:  # an ensemble's stacked members
            return {"states": ensemble_plan(ctx, stage).target}
        target["state"] = ctx.runner_for(stage).restore_target()
        return target

    found = ctx.checkpointer.restore_latest(restore_target)
    if found is not None:
        latest, payload, meta = found
        stage = int(meta.get("stage", 0))
        ctx.rows[:] = list(meta.get("rows", []))  # results of the stages before it
        ctx.restored_meta = meta
        if "states" in payload:
            ctx.restored = payload["states"]
        else:
            runner = ctx.runner_for(stage)
            ctx.restored = payload["state"]
            if runner.strategy == "pmap":
                ctx.restored = runner.to_device(ctx.restored)
        ctx.snapshot = payload.get("snapshot")
        log.info("resumed from step %d (stage %s) in %s", latest, ctx.stages[stage].name,
                 ctx.checkpointer.directory)
        return stage, latest, None
    state0 = jax.jit(ctx.first.init_state)(jax.random.PRNGKey(config.seed))
    if config.init_from:
        state0, reinit = transfer(state0, config.init_from)
        log.info("initialised from %s; re-initialised (shape mismatch): %s",
                 config.init_from, ", ".join(reinit) or "none")
    carry = {"params": state0.params, "batch_stats": state0.batch_stats,
             "masks": prune.get_masks(state0.opt_state), "rng": state0.rng}
    if ctx.uses_snapshot and config.rewind_step == 0:
        ctx.snapshot = jax.device_get(carry["params"])  # a host copy: steps donate the state
    return 0, 0, carry


def _row_summary(row: dict) -> str:
    """A stage row in one log line: its accuracies, sparsity, bits and deployed model."""
    keys = ("validation_accuracy", "test_accuracy", "sparsity", "bits", "deployed")
    return " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                    for k in keys if row.get(k) is not None)


def transfer(state: TrainState, source_workdir: str) -> tuple[TrainState, list[str]]:
    """Take every param/batch_stat from another run whose path and shape match."""
    if not os.path.isfile(os.path.join(source_workdir, CONFIG_FILE)):
        raise ValueError(f"init_from={source_workdir!r} is not a jaxaccel workdir")
    loaded = loading.load(source_workdir)
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


def check_model(config: ml_collections.ConfigDict, setup: Setup) -> None:
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


# ----------------------------------------------------------------------------------------
# The workdir
# ----------------------------------------------------------------------------------------
def check_cluster_layers(stages: list[ml_collections.ConfigDict], setup: Setup) -> None:
    """Every cluster stage's per-layer bits name real kernels (shapes only, nothing runs)."""
    clusters = [s for s in stages if s.kind == "cluster"]
    if not clusters:
        return
    params = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0)).params
    for s in clusters:
        try:
            sharing.layer_bits(params, s.cluster.bits, dict(s.cluster.per_layer))
        except ValueError as e:
            raise config_lib.ConfigError(f"stage {s.name!r}: {e}") from None


def dataset_record(spec: data.DatasetSpec, splits: data.Splits) -> dict[str, Any]:
    """What `dataset.json` holds: what the model takes (raw uint8 images of `image_shape`,
    normalised inside `predict` with `mean`/`std`) and what its logits mean (`class_names`,
    label i = name i), and how many examples each split had."""
    return {"name": spec.name, "kind": spec.kind, "image_shape": list(spec.image_shape),
            "num_classes": spec.num_classes, "class_names": list(spec.names()),
            "mean": list(spec.mean), "std": list(spec.std), **splits.sizes()}


def trained_steps(workdir: str) -> int | None:
    """The newest checkpoint step in `workdir` (None: nothing trained yet)."""
    directory = os.path.join(workdir, workdir_files.CHECKPOINTS_DIR)
    steps = [int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
             if n.isdigit()]
    return max(steps) if steps else None


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


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                    is_main: bool = True) -> None:
    """Refuse to mix experiments in one workdir (or to change a run silently on resume);
    write config.json for a new run. With `overwrite`, a different experiment's files go."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(path):
        saved = loading.read_config(workdir)
        diff = config_lib.differences(saved, config)
        trained = trained_steps(workdir)
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
            for name in (workdir_files.CHECKPOINTS_DIR, workdir_files.METRICS_FILE, RESULTS_FILE,
                         workdir_files.EVENTS_DIR, CALIBRATION_FILE):
                p = os.path.join(workdir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        io.write_text(path, config_lib.to_json(config))
