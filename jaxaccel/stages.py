"""The stage schema: what a multi-stage pipeline (train → prune → finetune → quantize →
evaluate) declares in a config. Schema only — which kinds exist, which fields each stage
section has, their defaults and valid values; what each kind *does* is the pipeline's
`STAGE_KINDS` registry (`jaxaccel.pipeline`), what a prune / quant section means for the
weights is `jaxaccel.compress.sections`.

A config's `stages` is an ordered tuple of stage ConfigDicts made with `stage(...)`. Kinds:
  * `train`    — `steps` optimizer steps (its own `optimizer` overrides); optional gradual
                 pruning (`prune.method="gradual"`), dynamic sparse training at a fixed
                 sparsity (`"set"`, `"rigl"`: masks drop and regrow weights every
                 `prune.update_every` steps, `compress.dynamic`) or QAT (`quant.mode="qat"`)
                 inside the step;
  * `prune`    — one-shot magnitude pruning of the current weights (`prune.*`), or an IMP
                 round (`prune.method="imp"`: prune `rate` of the weights still kept); the
                 new masks are a subset of the carried ones, and a one-shot sparsity counts
                 the weights already pruned, so prune → train → prune (higher) → train … is
                 iterative pruning (Han et al. 2015); or pruning by another score, also at
                 initialization: `snip` (|grad · w| summed over `prune.batches` training
                 batches, one global top-k; Lee et al. 2019) or `random` (the control);
  * `rewind`   — weights back to the snapshot taken at `config.rewind_step` (0 = init), or to
                 fresh random weights (`rewind="random"`, the lottery-ticket control), masked;
  * `quantize` — post-training quantization: fold BN, calibrate activations, evaluate W/A
                 fake-quant and real int8 (`quant.*`);
  * `cluster`  — weight sharing (Deep Compression): each kernel's kept weights clustered
                 into 2^`cluster.bits` shared values by 1-D k-means; the following `train`
                 stages fine-tune the shared values (centroids) with assignments and masks
                 fixed (`compress.sharing`);
  * `evaluate` — evaluate the current state; with a one-shot `prune` section
                 (`prune.method="one_shot"`, any of its fields; or snip / random) it
                 evaluates the current weights with those masks applied (on top of the
                 current masks) and leaves the state unchanged: "pruned, without retraining" as its own
                 row (its sparsity / packed_bytes describe the pruned evaluation) while the
                 next stage starts from the weights and masks this one was given.
Masks carry from stage to stage (a pruned weight stays exactly zero afterwards). A config
without stages is one `train` stage of `num_steps`. `config.imp.rounds > 0` expands into
IMP rounds (train → prune → rewind) without writing them out.

Owns `stage`, `KINDS`, `choices`, `KEY_HELP`, the section defaults and `expand`. Imports
nothing of jaxaccel but compress's choice constants (`compress.prune`, `compress.quant`,
`compress.cluster`, inside a function); never config, state or anything above.
"""
from __future__ import annotations

import difflib
from typing import Any

import ml_collections

KINDS = ("train", "prune", "rewind", "quantize", "evaluate", "cluster")
PRUNE_METHODS = ("none", "one_shot", "gradual", "imp", "snip", "random", "set", "rigl")
TRAIN_PRUNE_METHODS = ("none", "gradual", "set", "rigl")  # masks updated inside the step
QUANT_MODES = ("none", "ptq", "qat")
REWIND_TO = ("snapshot", "random")
EVALUATE_PRUNE_METHODS = ("none", "one_shot", "snip", "random")  # masks applied, state unchanged


def choices() -> dict[str, tuple]:
    """The valid values of a stage's choice fields (`stages.<i>.<key>`)."""
    from jaxaccel.compress import cluster, prune, quant
    return {"kind": KINDS, "prune.method": PRUNE_METHODS, "prune.scope": prune.SCOPES,
            "prune.granularity": prune.GRANULARITIES, "prune.distribution": prune.DISTRIBUTIONS,
            "quant.mode": QUANT_MODES, "quant.observer": quant.OBSERVERS, "rewind": REWIND_TO,
            "cluster.init": cluster.INITS}


# One line per field of a stage (`jaxaccel config` shows them).
KEY_HELP: dict[str, str] = {
    "name": "the stage's name (rows, metrics and logs carry it)",
    "kind": "train | prune | rewind | quantize | evaluate | cluster",
    "steps": "train stages: optimizer steps",
    "optimizer": "train stages: overrides of the config's optimizer fields",
    "prune.method": "one_shot / imp / snip / random (prune stages), gradual / set / rigl "
                    "(train stages), one_shot / snip / random (evaluate)",
    "prune.sparsity": "one_shot / gradual / snip / random / set / rigl: target fraction of "
                      "kernel weights pruned",
    "prune.batches": "snip: training batches whose |grad * weight| are summed (>= 1)",
    "prune.initial": "gradual: sparsity at begin_step",
    "prune.begin_step": "gradual: first pruning step of the stage",
    "prune.end_step": "gradual: last pruning step; set / rigl: masks fixed from this step on "
                      "(0 = 3/4 of the stage)",
    "prune.update_every": "set / rigl: steps between mask updates (drop and regrow), > 0",
    "prune.drop_fraction": "set / rigl: fraction of each layer's kept weights dropped (and "
                           "regrown) at step 0, cosine-decayed to 0 at end_step; in [0, 1)",
    "prune.frequency": "gradual: steps between mask updates",
    "prune.scope": "rank weights per layer or across all layers (snip: always global)",
    "prune.granularity": "unstructured weights, whole output channels, or n:m blocks",
    "prune.n": "n:m: weights kept per block",
    "prune.m": "n:m: block size",
    "prune.norm": "channel: the norm ranking channels (1 or 2)",
    "prune.distribution": "per-layer sparsity: uniform, or erk (Evci et al.)",
    "prune.skip_first": "leave the first layer dense",
    "prune.skip_last": "leave the last layer dense",
    "prune.rate": "imp: fraction of the remaining weights pruned this round",
    "prune.round": "imp: the round (set by expansion)",
    "prune.per_layer_rates": "imp: per-layer rates, e.g. {'fc3/kernel': 0.1}",
    "prune.per_layer": "one_shot / gradual: per-layer sparsities, e.g. {'fc1/kernel': 0.9}",
    "prune.ste": "gradual: straight-through masks: the forward pass uses the masked weights, "
                 "the dense weights keep training and pruned ones can come back",
    "quant.mode": "ptq (quantize stages) or qat (train stages)",
    "quant.weight_bits": "weight bits, 2..8",
    "quant.act_bits": "activation bits, 2..8",
    "quant.per_channel": "weights: one scale per output channel (else per tensor)",
    "quant.symmetric": "weights symmetric (activations are asymmetric, per tensor)",
    "quant.observer": "activation range observer",
    "quant.calibration_batches": "ptq: training batches used to calibrate activations",
    "quant.delay": "qat: steps before fake-quant switches on",
    "quant.int8": "ptq: also run real int8 inference (8-bit symmetric only)",
    "rewind": "rewind stages: to the snapshot at rewind_step, or to random weights",
    "cluster.bits": "cluster stages: index bits per kernel (2^bits shared values), 1..8",
    "cluster.per_layer": "cluster stages: per-layer bits, e.g. {'fc1/kernel': 6}",
    "cluster.init": "cluster stages: k-means initialisation (linear: Han et al.'s best)",
    "cluster.iters": "cluster stages: k-means (Lloyd) iterations at most",
    "distill.teacher": "train stages: a finished run's workdir to distil from ('' = off)",
    "distill.temperature": "distillation temperature T (> 0) of the soft targets",
    "distill.alpha": "weight of the soft (distillation) term, in [0, 1]; 1 - alpha: labels",
    "distill.precompute": "teacher logits computed once per training example (needs no "
                          "augmentation) instead of a teacher forward pass in every step",
}


def prune_defaults() -> ml_collections.ConfigDict:
    """Fields of a stage's `prune` section (magnitude_masks arguments + schedule)."""
    p = ml_collections.ConfigDict()
    p.method = "none"
    p.sparsity = 0.0            # one_shot/gradual target (final) sparsity
    p.initial = 0.0             # gradual: s_i
    p.begin_step = 0            # gradual: t0 (stage steps)
    p.end_step = 0              # gradual: t0 + nΔt (0 -> 3/4 of the stage)
    p.frequency = 50            # gradual: Δt
    p.scope = "layer"
    p.granularity = "unstructured"
    p.n = 2
    p.m = 4
    p.norm = 1
    p.distribution = "uniform"
    p.skip_first = False
    p.skip_last = False
    p.rate = 0.2                # imp: fraction of the remaining weights pruned per round
    p.round = 0                 # imp: set by expansion
    p.per_layer_rates = ml_collections.ConfigDict()  # imp: e.g. {"fc3/kernel": 0.1}
    p.per_layer = ml_collections.ConfigDict()        # one_shot/gradual per-leaf sparsities
    p.ste = False               # gradual: straight-through masks (jaxpruner's magnitude_ste)
    p.batches = 1               # snip: training batches the sensitivities are summed over
    p.update_every = 100        # set/rigl: steps between mask updates
    p.drop_fraction = 0.3       # set/rigl: initial drop fraction (cosine decay to end_step)
    return p


def quant_defaults() -> ml_collections.ConfigDict:
    """Fields of a stage's `quant` section."""
    q = ml_collections.ConfigDict()
    q.mode = "none"
    q.weight_bits = 8
    q.act_bits = 8
    q.per_channel = True         # weights per output channel (else per tensor)
    q.symmetric = True           # weights symmetric (activations are asymmetric, per tensor)
    q.observer = "minmax"        # activations: minmax | ema | percentile
    q.calibration_batches = 8
    q.delay = 0                  # qat: steps before fake-quant switches on
    q.int8 = True                # ptq: also run real int8 inference (8-bit only)
    return q


def distill_defaults() -> ml_collections.ConfigDict:
    """Fields of a `distill` section (`config.distill`, or a train stage's): knowledge
    distillation from a teacher run (Hinton et al. 2015); an empty teacher is off."""
    d = ml_collections.ConfigDict()
    d.teacher = ""               # a finished run's workdir (a single model or an ensemble)
    d.temperature = 4.0          # T of the soft targets
    d.alpha = 0.9                # weight of the soft (distillation) term; 1 - alpha: hard labels
    d.precompute = False         # teacher logits once per training example (no augmentation)
    return d


def cluster_defaults() -> ml_collections.ConfigDict:
    """Fields of a stage's `cluster` section (weight sharing, `compress.sharing`)."""
    c = ml_collections.ConfigDict()
    c.bits = 5                   # 2^bits shared values per kernel
    c.per_layer = ml_collections.ConfigDict()  # per-kernel bits, e.g. {"fc1/kernel": 6}
    c.init = "linear"            # linear | random | density (compress.cluster.INITS)
    c.iters = 30
    return c


def stage(name: str, kind: str, *, steps: int = 0, optimizer: dict | None = None,
          prune: dict | None = None, quant: dict | None = None,
          distill: dict | None = None, rewind: str = "snapshot",
          cluster: dict | None = None) -> ml_collections.ConfigDict:
    """One stage; `optimizer` holds overrides of the config's optimizer (e.g. a lower lr)."""
    s = ml_collections.ConfigDict()
    s.name = name
    s.kind = kind
    s.steps = steps
    s.optimizer = ml_collections.ConfigDict(optimizer or {})
    s.prune = _filled(prune_defaults(), prune, f"stage {name!r} prune")
    s.quant = _filled(quant_defaults(), quant, f"stage {name!r} quant")
    s.distill = _filled(distill_defaults(), distill, f"stage {name!r} distill")
    s.rewind = rewind
    s.cluster = _filled(cluster_defaults(), cluster, f"stage {name!r} cluster")
    return s


def _filled(defaults: ml_collections.ConfigDict, values: dict | None,
            where: str) -> ml_collections.ConfigDict:
    """`defaults` updated with `values`, refusing keys the section does not have (a typo such
    as `sparsty` would otherwise be stored and never read) and values of another type."""
    for key, value in (values or {}).items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults.keys()), n=2)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"{where}: unknown key {key!r}; {hint}valid keys: "
                             f"{', '.join(sorted(defaults.keys()))}")
        try:
            defaults[key] = value
        except TypeError:
            raise ValueError(f"{where}.{key}={value!r}: expected "
                             f"{type(defaults[key]).__name__}") from None
    return defaults


def iterative_pruning(final_sparsity: dict[str, float], *, rounds: int, dense_steps: int,
                      retrain_steps: int, retrain_optimizer: dict | None = None) -> tuple:
    """Han et al. 2015's iterated prune/retrain as stages, from per-leaf final sparsities.

    `dense` training, `no_retrain` (the dense weights evaluated under the final one-shot masks,
    state unchanged), then `rounds` x {`round{r}/prune` to keep final_keep ** (r / rounds) of
    each leaf (the same ratio every round; masks only shrink), retraining with
    `retrain_optimizer` overrides}; `retrain_steps` are split evenly and the last retraining
    stage is named `retrain`.
    """
    if rounds < 1:
        raise ValueError(f"iterative_pruning: rounds must be >= 1, got {rounds!r}")
    steps = [retrain_steps // rounds + (r < retrain_steps % rounds) for r in range(rounds)]
    out = [stage("dense", "train", steps=dense_steps),
           stage("no_retrain", "evaluate", prune={"method": "one_shot", "per_layer": dict(final_sparsity)})]
    for r in range(1, rounds + 1):
        sparsity = (dict(final_sparsity) if r == rounds else
                    {k: 1.0 - (1.0 - v) ** (r / rounds) for k, v in final_sparsity.items()})
        out += [stage(f"round{r}/prune", "prune", prune={"method": "one_shot", "per_layer": sparsity}),
                stage("retrain" if r == rounds else f"round{r}/retrain", "train", steps=steps[r - 1],
                      optimizer=retrain_optimizer)]
    return tuple(out)


def deep_compression(final_sparsity: dict[str, float], bits: dict[str, int] | int, *,
                     dense_steps: int, retrain_steps: int, finetune_steps: int, rounds: int = 3,
                     retrain_optimizer: dict | None = None) -> tuple:
    """Han et al. 2016's pipeline as stages: Han et al. 2015's iterated pruning
    (`iterative_pruning`: `dense`, `no_retrain`, `rounds` prune/retrain rounds to the per-leaf
    `final_sparsity`, the last retraining named `retrain`), then weight sharing (`cluster`:
    `bits` per kernel, an int or a per-leaf map) and `finetune` of the shared values at the
    `retrain_optimizer` overrides. Huffman coding happens when the run is packaged
    (`jaxaccel compress package W --entropy huffman`)."""
    per_layer = bits if isinstance(bits, dict) else {}
    default_bits = bits if isinstance(bits, int) else max(per_layer.values())
    return (*iterative_pruning(final_sparsity, rounds=rounds, dense_steps=dense_steps,
                               retrain_steps=retrain_steps, retrain_optimizer=retrain_optimizer),
            stage("cluster", "cluster", cluster={"bits": default_bits,
                                                 "per_layer": dict(per_layer)}),
            stage("finetune", "train", steps=finetune_steps, optimizer=retrain_optimizer))


def imp_defaults() -> ml_collections.ConfigDict:
    """`config.imp`: iterative magnitude pruning rounds (lottery tickets)."""
    i = ml_collections.ConfigDict()
    i.rounds = 0
    i.rate = 0.2
    i.per_layer_rates = ml_collections.ConfigDict()
    i.rewind = "snapshot"        # snapshot (weights at config.rewind_step) | random (control)
    i.steps = 0                  # training steps per round (0 -> num_steps)
    return i


def expand(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The stages a config runs, with IMP rounds written out and every stage validated.

    Stage sections saved by an older version (without a section added since, e.g.
    `distill`) get that section's defaults. A config without stages is one train stage of
    `num_steps` that distils as `config.distill` says; with explicit stages, each train stage
    has its own `distill` section and `config.distill` must stay off.
    """
    stages = [complete(ml_collections.ConfigDict(s)) for s in config.stages]
    imp = config.imp
    top_distill = config.distill.to_dict() if "distill" in config else None
    if stages and top_distill and top_distill.get("teacher"):
        raise ValueError("distill.teacher applies to a config without stages; set "
                         "distill={...} on the train stages instead")
    if imp.rounds:
        if stages:
            raise ValueError("use either stages or imp.rounds, not both")
        steps = imp.steps or config.num_steps
        stages = [stage("round0/train", "train", steps=steps, distill=top_distill)]
        for r in range(1, imp.rounds + 1):
            stages += [
                stage(f"round{r}/prune", "prune",
                      prune={"method": "imp", "rate": imp.rate, "round": r,
                             "per_layer_rates": imp.per_layer_rates.to_dict()}),
                stage(f"round{r}/rewind", "rewind", rewind=imp.rewind),
                stage(f"round{r}/train", "train", steps=steps, distill=top_distill),
            ]
    if not stages:
        stages = [stage("train", "train", steps=config.num_steps, distill=top_distill)]
    names = set()
    for i, s in enumerate(stages):
        _validate(i, s)
        if s.name in names:
            raise ValueError(f"stages[{i}].name={s.name!r} is used twice")
        names.add(s.name)
    return stages


def complete(s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A stage section with every field the schema has (missing ones at their defaults)."""
    schema = stage(s.get("name", "stage"), s.get("kind", "train"))
    for key, default in schema.items():
        if key not in s:
            s[key] = default
        elif isinstance(default, ml_collections.ConfigDict) and key != "optimizer":
            for sub, value in default.items():
                if sub not in s[key]:
                    s[key][sub] = value
    return s


def _validate(i: int, s: ml_collections.ConfigDict) -> None:
    where = f"stages[{i}] ({s.get('name', '?')})"
    if s.kind not in KINDS:
        raise ValueError(f"{where}.kind={s.kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    if s.prune.method not in PRUNE_METHODS:
        raise ValueError(f"{where}.prune.method={s.prune.method!r} is not valid; choose one of: "
                         f"{', '.join(PRUNE_METHODS)}")
    if s.quant.mode not in QUANT_MODES:
        raise ValueError(f"{where}.quant.mode={s.quant.mode!r} is not valid; choose one of: "
                         f"{', '.join(QUANT_MODES)}")
    if s.kind == "train" and s.steps < 0:
        raise ValueError(f"{where}.steps={s.steps} must be >= 0 for a train stage")
    if s.kind != "train" and s.steps:
        raise ValueError(f"{where}.steps={s.steps}: only train stages take steps")
    if s.kind == "prune" and s.prune.method not in ("one_shot", "imp", "snip", "random"):
        raise ValueError(f"{where}.prune.method={s.prune.method!r}: a prune stage is "
                         f"one_shot or imp (magnitude), snip or random")
    if not isinstance(s.prune.batches, int) or isinstance(s.prune.batches, bool) or \
            s.prune.batches < 1:
        raise ValueError(f"{where}.prune.batches={s.prune.batches!r} must be an int >= 1")
    if s.prune.method == "snip" and (s.prune.granularity != "unstructured" or
                                     s.prune.distribution != "uniform" or s.prune.per_layer):
        raise ValueError(f"{where}.prune.method='snip' ranks single weights globally: "
                         f"granularity must be unstructured, distribution uniform, no per_layer")
    if s.kind == "evaluate" and s.prune.method not in EVALUATE_PRUNE_METHODS:
        raise ValueError(f"{where}.prune.method={s.prune.method!r} is not valid for an evaluate "
                         f"stage; choose one of: {', '.join(EVALUATE_PRUNE_METHODS)}")
    if s.prune.ste and not (s.kind == "train" and s.prune.method == "gradual"):
        raise ValueError(f"{where}.prune.ste=True: straight-through masks are an option of "
                         f"gradual pruning in a train stage, not of {s.prune.method!r} in a "
                         f"{s.kind} stage")
    if s.kind == "train" and s.prune.method not in TRAIN_PRUNE_METHODS:
        raise ValueError(f"{where}.prune.method={s.prune.method!r}: a train stage prunes "
                         f"only gradually, or trains sparse with set or rigl (or none)")
    if s.kind != "train" and s.prune.method in ("set", "rigl"):
        raise ValueError(f"{where}.prune.method={s.prune.method!r}: dynamic sparse training "
                         f"happens in train stages")
    update_every = s.prune.update_every
    if not isinstance(update_every, int) or isinstance(update_every, bool) or update_every < 1:
        raise ValueError(f"{where}.prune.update_every={update_every!r} must be an int > 0")
    if not 0.0 <= s.prune.drop_fraction < 1.0:
        raise ValueError(f"{where}.prune.drop_fraction={s.prune.drop_fraction!r} must be in "
                         f"[0, 1)")
    if s.prune.method in ("set", "rigl") and s.prune.granularity != "unstructured":
        raise ValueError(f"{where}.prune.granularity={s.prune.granularity!r}: "
                         f"{s.prune.method} drops and grows single weights; use unstructured")
    if s.prune.method in ("set", "rigl") and s.prune.end_step < 0:
        raise ValueError(f"{where}.prune.end_step={s.prune.end_step!r} must be >= 0")
    if s.kind == "quantize" and s.quant.mode != "ptq":
        raise ValueError(f"{where}.quant.mode={s.quant.mode!r}: a quantize stage is ptq")
    if s.kind == "train" and s.quant.mode not in ("none", "qat"):
        raise ValueError(f"{where}.quant.mode={s.quant.mode!r}: a train stage quantizes only with qat")
    if s.kind == "rewind" and s.rewind not in REWIND_TO:
        raise ValueError(f"{where}.rewind={s.rewind!r} is not valid; choose one of: {', '.join(REWIND_TO)}")
    for key in ("weight_bits", "act_bits"):
        if not 2 <= s.quant[key] <= 8:
            raise ValueError(f"{where}.quant.{key}={s.quant[key]} must be in 2..8")
    if not 0.0 <= s.prune.sparsity < 1.0:
        raise ValueError(f"{where}.prune.sparsity={s.prune.sparsity} must be in [0, 1)")
    if s.distill.teacher and s.kind != "train":
        raise ValueError(f"{where}.distill.teacher: only train stages distil")
    if not s.distill.temperature > 0:
        raise ValueError(f"{where}.distill.temperature={s.distill.temperature} must be > 0")
    if not 0.0 <= s.distill.alpha <= 1.0:
        raise ValueError(f"{where}.distill.alpha={s.distill.alpha} must be in [0, 1]")
    if s.kind != "cluster" and s.cluster.to_dict() != cluster_defaults().to_dict():
        raise ValueError(f"{where}.cluster: only cluster stages cluster; this stage is "
                         f"{s.kind!r}")
    for key, bits in [("bits", s.cluster.bits),
                      *[(f"per_layer.{k}", v) for k, v in s.cluster.per_layer.items()]]:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"{where}.cluster.{key}={bits!r} must be an int in 1..8")
    if s.cluster.iters < 1:
        raise ValueError(f"{where}.cluster.iters={s.cluster.iters} must be >= 1")
    for key, valid in choices().items():
        section, _, field = key.rpartition(".")
        value = s[section][field] if section else s[field]
        if value not in valid:
            raise ValueError(f"{where}.{key}={value!r} is not valid; choose one of: "
                             f"{', '.join(map(str, valid))}")


def stage_optimizer(config: ml_collections.ConfigDict,
                    s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config's optimizer with the stage's overrides applied."""
    opt = ml_collections.ConfigDict(config.optimizer.to_dict())
    for k, v in s.optimizer.items():
        if k not in opt:
            raise ValueError(f"stage {s.name!r}: optimizer.{k} is not an optimizer field; "
                             f"valid: {', '.join(sorted(opt.keys()))}")
        opt[k] = v
    return opt


def summary(stages: list[ml_collections.ConfigDict]) -> list[dict[str, Any]]:
    """A short, JSON-able description of each stage (for logs and results)."""
    return [{"name": s.name, "kind": s.kind, "steps": s.steps} for s in stages]
