"""The train state and what acts on it: optimizer, train and eval steps, and `build`, which
turns a config's stage into the model, optimizer and state initialiser every driver uses
(the pipeline, vectorized sweeps, `jaxaccel.load`, benchmarks).

Owns: `TrainState`, `make_schedule`, `make_optimizer`, `cross_entropy`, `make_train_step`,
`make_eval_step`, `Setup`, `build`, `checkpoint_target`. Imports models, compress, data and
the stage schema (`stages`); never the loop, the pipeline, loading, checkpoint storage, sweeps
or the CLI.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxaccel import data, models
from jaxaccel import stages as stages_lib
from jaxaccel.compress import distill as distill_lib
from jaxaccel.compress import dynamic, prune, quant, sections, sharing


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
def make_schedule(opt: Any, num_steps: int, lr: Any = None) -> optax.Schedule:
    """The learning-rate schedule named by `opt.schedule` over `num_steps` (peak `lr`, default
    `opt.lr`; may be a traced value, as in vectorized sweeps)."""
    lr, steps = opt.lr if lr is None else lr, max(num_steps, 1)
    if opt.schedule == "constant":
        return optax.constant_schedule(lr)
    if opt.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if opt.schedule == "warmup_cosine":
        if isinstance(lr, (int, float)):
            return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, steps)
        # optax branches on the peak value in Python: a traced lr scales the unit schedule
        unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, opt.warmup_steps, steps)
        return lambda step: lr * unit(step)
    if opt.schedule == "piecewise":
        return optax.piecewise_constant_schedule(
            lr, {int(b): opt.decay_factor for b in opt.boundaries if b > 0})
    raise ValueError(f"optimizer.schedule={opt.schedule!r} is not valid; choose one of: "
                     f"constant, cosine, warmup_cosine, piecewise")


HYPERPARAMETERS = ("lr", "weight_decay", "b1", "b2", "momentum")


def make_optimizer(opt: Any, num_steps: int, values: Mapping[str, Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax chain: [clip] -> [L2 weight decay] -> sgd | adam | adamw(decoupled decay).

    `opt` (an optimizer config section) decides the chain's structure: a weight-decay term
    where `weight_decay > 0`, SGD momentum where `momentum > 0`. `values` may replace the
    numbers (`HYPERPARAMETERS`) with traced ones, so one compiled step serves many points of
    a sweep; adding a weight decay of 0 is exact, so a point without decay may share the term.
    """
    v = {k: getattr(opt, k) for k in HYPERPARAMETERS}
    v.update(values or {})
    schedule = make_schedule(opt, num_steps, v["lr"])
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == "adamw":
        parts.append(optax.adamw(schedule, b1=v["b1"], b2=v["b2"], weight_decay=v["weight_decay"]))
    else:
        if opt.weight_decay > 0:
            parts.append(optax.add_decayed_weights(v["weight_decay"]))
        if opt.name == "sgd":
            parts.append(optax.sgd(schedule, momentum=v["momentum"] if opt.momentum > 0 else None,
                                   nesterov=opt.nesterov))
        elif opt.name == "adam":
            parts.append(optax.adam(schedule, b1=v["b1"], b2=v["b2"]))
        else:
            raise ValueError(f"optimizer.name={opt.name!r} is not valid; choose one of: "
                             f"sgd, adam, adamw")
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------
def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: Any = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing (may be traced)."""
    targets = jax.nn.one_hot(labels, num_classes)
    if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


@dataclasses.dataclass(frozen=True)
class Distillation:
    """How a train step distils (`compress.distill.kd_loss`): the teacher's logits come from
    `teacher_apply(teacher_variables, images)` inside the step (frozen variables, passed to
    the step as an argument: never in the state, the optimizer or a checkpoint), or — with
    `teacher_apply` None — from the batch's precomputed "teacher_logits"."""
    temperature: float
    alpha: float
    teacher_apply: Callable | None = None


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    num_classes: int, label_smoothing: Any = 0.0, axis_name: str | None = None,
                    skip_nonfinite: bool = False, mask_update: Callable | None = None,
                    qat_config: Any = None, distill: Distillation | None = None,
                    ste: bool = False) -> Callable:
    """`(state, batch) -> (state, metrics)`; with `axis_name`, averages over that pmap axis.

    With `ste` (straight-through masks; `tx` must be `prune.masked(..., ste=True)`) the
    forward pass uses params ⊙ masks while the gradient reaches every dense weight, and mask
    updates leave the dense weights as they are (a pruned weight can come back).

    `mask_update(params, masks, step, grads=, rng=) -> masks` re-prunes inside the step after
    the optimizer update (gradual pruning, set / rigl; `tx` must be `prune.masked(...)`);
    `grads` are the step's dense gradients (before masking, averaged over devices), `rng` the
    step's key; when `mask_update.grows` (set / rigl), weights a new mask grows are exactly 0
    and get zeroed optimizer moments (`dynamic.zero_moments`); gradual masks only shrink. `qat_config` runs the forward pass with fake-quant
    (straight-through gradients) and tracks activation ranges in `state.qat`. With `distill`
    the loss is `kd_loss` against the teacher's logits; a teacher computed in the step makes
    the step `(state, batch, teacher_variables) -> (state, metrics)`.
    """

    def forward(params, state, images, rng):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if qat_config is None:
            out = model.apply(variables, images, train=True, mutable=["batch_stats"],
                              rngs={"dropout": rng})
            return out, state.qat
        return quant.qat_apply(model, variables, state.qat, images, train=True,
                               step=state.step, config=qat_config, mutable=["batch_stats"])

    def step_fn(state: TrainState, batch: dict, teacher: Any = None) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        if distill is not None:
            teacher_logits = (batch["teacher_logits"] if distill.teacher_apply is None
                              else distill.teacher_apply(teacher, batch["image"]))

        masks_now = prune.get_masks(state.opt_state) if ste else None

        def loss_fn(params):
            if ste:  # value params ⊙ masks, gradient 1 for every weight (straight-through)
                params = jax.tree.map(
                    lambda p, m: p + jax.lax.stop_gradient(jnp.where(m, p, 0).astype(p.dtype)
                                                           - p), params, masks_now)
            (logits, mutated), qat_state = forward(params, state, batch["image"], rng)
            if distill is None:
                loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
            else:
                loss = distill_lib.kd_loss(logits, teacher_logits, batch["label"],
                                           temperature=distill.temperature, alpha=distill.alpha)
            return loss, (logits, mutated.get("batch_stats", {}), qat_state)

        (loss, (logits, batch_stats, qat_state)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:
            grads, loss, accuracy, batch_stats, qat_state = jax.lax.pmean(
                (grads, loss, accuracy, batch_stats, qat_state), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if sharing.has_assignments(opt_state):  # shared weights stay exactly shared
            params = sharing.snap(params, sharing.get_assignments(opt_state),
                                  prune.get_masks(opt_state))
        if mask_update is not None:
            old_masks = prune.get_masks(opt_state)
            masks = mask_update(params, old_masks, state.step, grads=grads, rng=rng)
            if not ste:
                params = prune.apply_masks(params, masks)
            opt_state = prune.set_masks(opt_state, masks)
            if getattr(mask_update, "grows", False):  # set / rigl: grown weights start afresh
                opt_state = dynamic.zero_moments(opt_state, dynamic.grown(old_masks, masks))
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
                   qat_config: Any = None, ste: bool = False) -> Callable:
    """`(state, batch) -> sums of loss, correct, count` over the unmasked rows (with `ste`,
    of the model params ⊙ masks)."""

    def eval_fn(state: TrainState, batch: dict) -> dict:
        params = (prune.apply_masks(state.params, prune.get_masks(state.opt_state)) if ste
                  else state.params)
        variables = {"params": params, "batch_stats": state.batch_stats}
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
    spec: data.DatasetSpec
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    input_shape: tuple[int, ...]
    init_state: Callable[[jax.Array], TrainState]
    predict_fn: Callable
    mask_update: Callable | None = None
    qat_config: Any = None
    distill: Distillation | None = None  # set by the pipeline, which loads the teacher
    ste: bool = False                    # straight-through masks (gradual, prune.ste)


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
    if after_cluster(config, stage):  # fine-tune shared values: gradients summed per cluster
        if stage.prune.method in ("gradual", "set", "rigl"):
            raise ValueError(f"stage {stage.name!r}: {stage.prune.method} pruning after a "
                             f"cluster stage would break the shared weights; prune before "
                             f"clustering")
        inner = sharing.tied(inner)
    ste = stage.prune.method == "gradual" and bool(stage.prune.ste)
    tx = prune.masked(inner, ste=ste)
    input_shape = (1,) + tuple(spec.image_shape)
    qat_config = sections.qat_config(stage.quant) if stage.quant.mode == "qat" else None
    mask_update = (sections.gradual_mask_update(stage.prune, stage.steps)
                   if stage.prune.method == "gradual" else
                   sections.dynamic_mask_update(stage.prune, stage.steps)
                   if stage.prune.method in ("set", "rigl") else None)

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
                 mask_update, qat_config, ste=ste)


def after_cluster(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> bool:
    """Whether a `cluster` stage comes before `stage` in the config's pipeline (its train
    stages then fine-tune shared weights)."""
    stages = stages_lib.expand(config)
    names = [s.name for s in stages]
    if stage.name not in names:
        return False
    return any(s.kind == "cluster" for s in stages[:names.index(stage.name)])


def check_structure(expected: Any, got: Any) -> None:
    """Fail early (not deep inside jit) if a carried state does not fit the stage."""
    if jax.tree.structure(expected) != jax.tree.structure(got):
        raise ValueError("state structure does not match the stage's optimizer/model")


def with_input_shape(setup: Setup, input_shape: Sequence[int]) -> Setup:
    """`setup` for images of `input_shape` (H, W, C) instead of its dataset's (benchmarks and
    autotuning time models on synthetic inputs of any shape); unchanged when they agree."""
    shape = tuple(int(v) for v in input_shape)
    if tuple(setup.spec.image_shape) == shape:
        return setup
    channels = shape[-1]
    spec = data.DatasetSpec(name="synthetic", num_classes=setup.spec.num_classes,
                            image_shape=shape, mean=(0.5,) * channels, std=(0.25,) * channels,
                            kind="builtin")
    full_shape = (1,) + shape

    def init_state(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = setup.model.init(init_rng, jnp.zeros(full_shape, jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=setup.tx.init(params), rng=state_rng)

    return dataclasses.replace(setup, spec=spec, input_shape=full_shape, init_state=init_state)


def checkpoint_target(config: ml_collections.ConfigDict, stage_index: int) -> tuple[Setup, dict]:
    """(setup, abstract payload) for restoring a checkpoint written by stage `stage_index`:
    `{"state": TrainState}` and, when the pipeline rewinds to a snapshot, `"snapshot"`; for an
    ensemble (`ensemble.members` K > 1), `{"states": TrainState}` with K stacked members."""
    stages = stages_lib.expand(config)
    if not 0 <= stage_index < len(stages) or stages[stage_index].kind != "train":
        raise ValueError(f"a checkpoint names stage {stage_index}, which is not a train stage "
                         f"of this config")
    setup = build(config, stages[stage_index])
    members = config.ensemble.members if "ensemble" in config else 1
    if members > 1:  # the members' states, stacked (`stacked.StackedRunner.payload`)
        keys = jax.ShapeDtypeStruct((members, 2), jnp.uint32)
        return setup, {"states": jax.eval_shape(jax.vmap(setup.init_state), keys)}
    abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    target: dict[str, Any] = {"state": abstract}
    if any(s.kind == "rewind" and s.rewind == "snapshot" for s in stages):
        target["snapshot"] = abstract.params
    return setup, target
