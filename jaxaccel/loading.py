"""Reading a run back from its workdir: `jaxaccel.load(W)` and the weights a run ended with.

`load(workdir)` restores the newest usable checkpoint (or a given step) into the model the
run's own config builds, on this process's first device, and returns a `Loaded` whose
`predict` takes raw images as the dataset gives them. `final_weights(workdir)` is what a
finished pipeline ended with, including the non-training stages after its last checkpoint
(what `jaxaccel compress report|package|export` read).

Imports state (the model and state structure of a config), checkpoint storage, config and
stages (a run's own config), data, io and `compress.sections`; never the loop, the pipeline,
sweeps or the CLI.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaccel import autotune
from jaxaccel import config as config_lib
from jaxaccel import data, io
from jaxaccel import stages as stages_lib
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.compress import prune, sections, sharing
from jaxaccel.models.ensemble import Ensemble
from jaxaccel.state import checkpoint_target
from jaxaccel.workdir import (CHECKPOINTS_DIR, CONFIG_FILE, DATASET_FILE, ENSEMBLE_FILE,
                              MEMBERS_DIR, RESULTS_FILE)

FLOAT_BITS = 32


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was made with (`workdir/config.json`)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{workdir!r} is not a jaxaccel workdir (no config.json)")
    with open(path) as f:
        return config_lib.from_json(f.read())


@dataclasses.dataclass
class Loaded:
    """A trained model read back from its workdir, ready for inference.

    `predict(images)` takes raw images (uint8 or 0..255 floats, NHWC) and normalises them;
    `model.apply(variables, x, train=False)` is the bare network on normalised `x` (for an
    ensemble run, a `models.Ensemble` whose variables stack the members' and whose logits
    are the log of their combined probabilities, or a logistic stacker's logits; members that
    are runs of their own, `member_workdirs`, are loaded each from its workdir and `step` is
    None). `spec` holds the run's dataset shape and normalisation; `class_names[i]` names
    logit i (from the run's dataset.json; the labels' numbers for runs written before it
    existed).
    """
    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    step: int | None
    predict_fn: Callable
    class_names: tuple[str, ...] = ()
    spec: data.DatasetSpec | None = None

    def predict(self, images) -> jax.Array:
        """Logits for raw images (uint8 or 0..255 floats, NHWC); normalisation included."""
        return self.predict_fn(self.variables, images)

    @property
    def members(self) -> int:
        """1, or the number of members of an ensemble run."""
        return self.config.ensemble.members if isinstance(self.model, Ensemble) else 1


def member_workdirs(workdir: str) -> list[str]:
    """The workdirs of an ensemble's members when each is a run of its own (members that
    differ in shapes or program, `config.sequential_members`); [] for any other run."""
    path = os.path.join(workdir, ENSEMBLE_FILE)
    record = io.read_json(path) if os.path.isfile(path) else {}
    return [os.path.join(workdir, rel) for rel in record.get("workdirs") or ()]


def _combined(model: Any, workdir: str) -> Ensemble:
    """`model` (a module, or a tuple of the members' modules) combined as ensemble.json says."""
    combination = os.path.join(workdir, ENSEMBLE_FILE)
    record = io.read_json(combination) if os.path.isfile(combination) else {}
    weights, logistic = record.get("weights"), record.get("logistic")
    return Ensemble(model, tuple(weights) if weights else None,
                    (tuple(map(tuple, logistic["kernel"])), tuple(logistic["bias"]))
                    if logistic else None)


def _class_names(workdir: str, spec: data.DatasetSpec) -> tuple[str, ...]:
    record = os.path.join(workdir, DATASET_FILE)
    return tuple(io.read_json(record)["class_names"]) if os.path.isfile(record) else spec.names()


def load(workdir: str, step: int | None = None, *, tune: bool = True) -> Loaded:
    """Load a run's model and variables (newest usable checkpoint unless `step` is given).

    With `tune`, the model predicts with the conv implementation `autotune` chooses for
    inference (measured on first use; the same parameters). Reads only: a corrupt newest
    checkpoint is reported and skipped, never moved.
    """
    config = read_config(workdir)
    members = member_workdirs(workdir)
    if members:  # an ensemble of runs: each member from its own workdir
        if step is not None:
            raise ValueError(f"{workdir!r} is an ensemble of {len(members)} runs of their own; "
                             f"step={step} names no checkpoint of it (load a member's workdir "
                             f"under {MEMBERS_DIR}/ for that)")
        runs = [load(m, tune=tune) for m in members]
        model = _combined(tuple(r.model for r in runs), workdir)
        variables = {"params": tuple(r.variables["params"] for r in runs),
                     "batch_stats": tuple(r.variables["batch_stats"] for r in runs)}
        spec = data.spec_for(config.dataset)
        return Loaded(model=model, variables=variables, config=config, step=None,
                      predict_fn=predict_function(model, spec),
                      class_names=_class_names(workdir, spec), spec=spec)
    ckpt = Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        ckpt.close()
        raise ValueError(f"{workdir!r} has no checkpoints")
    setups = {}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target_for(meta: dict) -> Any:
        setup, target = checkpoint_target(config, int(meta.get("stage", 0)))
        setups["setup"] = setup
        # On this process's first device, whatever topology (processes, mesh) saved it.
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            target)

    try:
        if step is None:
            step, payload, _ = ckpt.restore_latest(target_for, quarantine=False)
        elif step not in steps:
            raise ValueError(f"step={step} has no checkpoint in {workdir!r}; "
                             f"available: {', '.join(map(str, sorted(steps)))}")
        else:
            payload, _ = ckpt.restore(step, target_for(ckpt.read_meta(step)))
    finally:
        ckpt.close()
    setup = setups["setup"]
    state = payload["state"] if "state" in payload else payload["states"]
    # the model is params ⊙ masks (a no-op except under straight-through masks, prune.ste)
    params = prune.apply_masks(state.params, prune.get_masks(state.opt_state))
    variables = {"params": params, "batch_stats": state.batch_stats}
    model, predict_fn = setup.model, setup.predict_fn
    tuned = autotune.choose(config, mode="infer") if tune else None  # "auto" for inference
    if tuned is not None and getattr(model, "conv_impl", tuned.impl) != tuned.impl \
            and "states" not in payload:
        model = model.clone(conv_impl=tuned.impl)  # the same parameters, another lowering
        predict_fn = predict_function(model, setup.spec)
    if "states" in payload:  # an ensemble run: its members combined as the run combined them
        model = _combined(setup.model, workdir)
        predict_fn = predict_function(model, setup.spec)
    return Loaded(model=model, variables=variables, config=config, step=step,
                  predict_fn=predict_fn, class_names=_class_names(workdir, setup.spec),
                  spec=setup.spec)


def predict_function(model: Any, spec: data.DatasetSpec) -> Callable:
    """`predict(variables, images)`: `model` on raw images normalised with `spec` (jitted)."""
    @jax.jit
    def predict(variables, images):
        return model.apply(variables, data.normalize(jnp.asarray(images), spec), train=False)
    return predict


# ----------------------------------------------------------------------------------------
# The weights a run ended with
# ----------------------------------------------------------------------------------------
def weight_bits(stages: Sequence[ml_collections.ConfigDict]) -> int:
    """Weight bits after running ``stages``: those of the last stage that quantized (PTQ or
    QAT), unless a later float train stage or a rewind replaced the weights (then 32)."""
    bits = FLOAT_BITS
    for st in stages:
        if st.quant.mode != "none":
            bits = int(st.quant.weight_bits)
        elif st.kind in ("train", "rewind"):
            bits = FLOAT_BITS
    return bits


@dataclasses.dataclass
class FinalWeights:
    """What a run ended with: model, float variables, and how they were obtained."""
    workdir: str
    model: nn.Module
    variables: dict
    config: ml_collections.ConfigDict
    spec: data.DatasetSpec
    step: int | None  # None: an ensemble of runs of their own (each its own checkpoint)
    stage: str
    bits: int
    input_shape: tuple[int, ...]
    checkpoint_dir: str
    notes: list[str]


def final_weights(workdir: str, step: int | None = None) -> FinalWeights:
    """The weights a run ended with (or those of checkpoint ``step``).

    Only train stages write checkpoints, so for a finished run whose last stages do not
    train (e.g. train → prune, or … → prune → quantize → evaluate) the prune stages after
    the newest checkpoint are applied again to its weights (magnitude pruning is
    deterministic). ``bits`` follows `weight_bits` over the stages the weights went through.
    """
    loaded = load(workdir, step, tune=False)  # weights, not speed: reports, packages, exports
    config = loaded.config
    spec = data.spec_for(config.dataset)
    if loaded.step is None:  # an ensemble of runs of their own (`member_workdirs`)
        return FinalWeights(
            workdir=workdir, model=loaded.model, variables=loaded.variables, config=config,
            spec=spec, step=None, stage=stages_lib.expand(config)[0].name, bits=FLOAT_BITS,
            input_shape=tuple(int(d) for d in spec.image_shape),
            checkpoint_dir=os.path.join(workdir, MEMBERS_DIR),
            notes=[f"member {k}: {os.path.relpath(m, workdir)}, its final checkpoint"
                   for k, m in enumerate(member_workdirs(workdir))])
    stages = stages_lib.expand(config)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        meta = ckpt.read_meta(loaded.step)
    finally:
        ckpt.close()
    at = int(meta.get("stage", 0))
    ran = list(stages[:at + 1])
    variables = {"params": loaded.variables["params"],
                 "batch_stats": loaded.variables["batch_stats"]}
    notes = [f"weights of checkpoint step {loaded.step} (stage {stages[at].name!r})"]
    results_path = os.path.join(workdir, RESULTS_FILE)
    results = io.read_json(results_path, lenient=True) if os.path.isfile(results_path) else None
    finished = (step is None and results is not None
                and len(results.get("stages", [])) == len(stages))
    trailing = stages[at + 1:]
    if finished and trailing and not any(s.kind == "train" for s in trailing):
        for st in trailing:
            if st.kind == "prune":
                params = variables["params"]
                prior = jax.tree.map(lambda p: p != 0, params)
                params, _ = jax.jit(lambda p, m, st=st: sections.prune_once(p, m, st.prune))(
                    params, prior)
                variables = {**variables, "params": params}
                notes.append(f"stage {st.name!r} (prune) applied again")
            elif st.kind == "cluster":  # k-means from the same weights: deterministic
                params = variables["params"]
                masks = jax.tree.map(lambda p: np.asarray(p) != 0, jax.device_get(params))
                bits = sharing.layer_bits(params, st.cluster.bits, dict(st.cluster.per_layer))
                params, _, _ = sharing.share_weights(params, masks, bits, init=st.cluster.init,
                                                     iters=st.cluster.iters)
                variables = {**variables, "params": params}
                notes.append(f"stage {st.name!r} (cluster) applied again")
            elif st.kind == "rewind":
                notes.append(f"stage {st.name!r} (rewind) not reproduced")
                continue
            ran.append(st)
    elif trailing:
        notes.append(f"stages after {stages[at].name!r} not included: "
                     f"{', '.join(s.name for s in trailing)}")
    return FinalWeights(workdir=workdir, model=loaded.model, variables=variables, config=config,
                        spec=spec, step=int(loaded.step), stage=ran[-1].name,
                        bits=weight_bits(ran),
                        input_shape=tuple(int(d) for d in spec.image_shape),
                        checkpoint_dir=os.path.join(workdir, CHECKPOINTS_DIR, str(loaded.step)),
                        notes=notes)
