"""Experiment configs: loading `get_config()` files, command-line overrides, validation.

An experiment is a Python file exposing `get_config()` that returns an ml_collections
`ConfigDict`, usually built from `default_config()` with a few fields changed. This module
is the one place that knows the schema: every choice the framework accepts is listed in
`CHOICES`, and `validate` turns any bad value into a `ConfigError` naming it and the valid
choices.

Owns `default_config`, `KEY_HELP`, `CHOICES`, `load_experiment`, `apply_overrides`,
`validate`, `ConfigError` and a config's JSON form (`to_json` / `from_json`). Imports io, and
stages, models and data inside functions (so `import jaxaccel.config` stays light); never
state, checkpoints, the loop, the pipeline, sweeps or the CLI.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import traceback
from typing import Any, Callable

import ml_collections

from jaxaccel import io
from jaxaccel import stages as stages_lib
from jaxaccel.workdir import CHECKPOINTS_DIR, CONFIG_FILE, ENSEMBLE_FILE, RESULTS_FILE

# Keys that only change how a run is executed, not what it computes. A resumed run may
# change them without being refused as a different experiment.
RUNTIME_KEYS = ("parallel", "distributed", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints", "progress", "num_steps")

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer.name": ("sgd", "adam", "adamw"),
    "optimizer.schedule": ("constant", "cosine", "warmup_cosine", "piecewise"),
    "parallel.strategy": ("data", "fsdp", "pmap"),
    "model.dtype": ("float32", "bfloat16"),
    "nonfinite": ("stop", "skip"),
    "ensemble.combine": ("average", "stack", "logistic"),
}


class ConfigError(ValueError):
    """A bad experiment config or override; the message is one line meant for users."""


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with its default (what each means: `KEY_HELP`, or
    `jaxaccel config`). Experiments override a few."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(dict(
        name="mnist5k", path="", data_dir="", train_split="train", test_split="test",
        crop_padding=0, flip=False, validation_split=0.0, validation_seed=0, image_size=(0, 0)))
    c.model = ml_collections.ConfigDict(dict(
        name="cnn3", width=1.0, dtype="float32", conv_impl="auto",
        kwargs=ml_collections.ConfigDict()))
    c.batch_size = 128
    c.eval_batch_size = 512
    c.num_steps = 1000
    c.label_smoothing = 0.0
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-3, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
        weight_decay=0.0, grad_clip_norm=0.0, schedule="constant", warmup_steps=0,
        boundaries=(0,), decay_factor=0.1))
    c.parallel = ml_collections.ConfigDict(dict(strategy="data", cpu_devices=0, num_devices=0))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1))
    c.log_every = 50
    c.eval_every = 0
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.progress = True
    c.init_from = ""
    c.nonfinite = "stop"
    c.stages = ()
    c.imp = stages_lib.imp_defaults()
    c.rewind_step = 0
    c.distill = stages_lib.distill_defaults()
    c.ensemble = ml_collections.ConfigDict(dict(members=1, combine="average", overrides=()))
    return c


# One line per key of `default_config()` (tests/test_config.py checks none is missing).
KEY_HELP: dict[str, str] = {
    "seed": "seeds initialisation, data order and augmentation (not the validation split)",
    "dataset.name": "a built-in, catalog or image_folder dataset (`jaxaccel datasets`)",
    "dataset.path": "image_folder: ROOT with train/<class>/* and test/<class>/* images",
    "dataset.data_dir": "where prepared datasets live; '' = $JAXACCEL_DATA_DIR or "
                        "~/.cache/jaxaccel/tfds",
    "dataset.train_split": "the split trained on (TFDS slicing allowed, e.g. train[:50%])",
    "dataset.test_split": "the split reported as test (never used to select anything)",
    "dataset.crop_padding": "random crop after zero padding by this many pixels (0 = off)",
    "dataset.flip": "random horizontal flips",
    "dataset.validation_split": "fraction of the train split held out for validation, "
                                "stratified (0 = none); selection reads it",
    "dataset.validation_seed": "which examples are held out (fixed across runs and seeds)",
    "dataset.image_size": "image_folder: resize every image to (H, W); (0, 0) = keep the size "
                          "(all images must then have one size)",
    "model.name": "a registered model",
    "model.width": "multiplies the model's default layer widths",
    "model.dtype": "compute dtype (params stay float32)",
    "model.conv_impl": "how convs and pools are lowered (never which params exist)",
    "model.kwargs": "other model fields, e.g. padding='SAME' for lenet5 (checked against "
                    "the model)",
    "batch_size": "global batch, over all devices and processes",
    "eval_batch_size": "global batch of evaluation passes",
    "num_steps": "training steps (of the single train stage when `stages` is empty)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "optimizer.name": "the optax optimizer",
    "optimizer.lr": "peak learning rate",
    "optimizer.momentum": "sgd momentum (0 = plain sgd)",
    "optimizer.nesterov": "sgd: Nesterov momentum",
    "optimizer.b1": "adam/adamw beta1",
    "optimizer.b2": "adam/adamw beta2",
    "optimizer.weight_decay": "adamw: decoupled decay; sgd/adam: L2 added to the gradient",
    "optimizer.grad_clip_norm": "clip gradients to this global norm (0 = off)",
    "optimizer.schedule": "learning-rate schedule (cosine ones decay over the stage's steps)",
    "optimizer.warmup_steps": "warmup_cosine: linear warmup steps",
    "optimizer.boundaries": "piecewise: steps where lr is multiplied by decay_factor",
    "optimizer.decay_factor": "piecewise: the factor at each boundary",
    "parallel.strategy": "data (jit, batch sharded), fsdp (params sharded too), pmap",
    "parallel.cpu_devices": "> 0: simulate this many CPU devices (before JAX starts)",
    "parallel.num_devices": "> 0: use only the first N devices (single process); 0 = all",
    "distributed.coordinator_address": "multi-process: host:port of process 0; '' = "
                                       "environment or single process",
    "distributed.num_processes": "multi-process: number of processes (0 = from environment)",
    "distributed.process_id": "multi-process: this process's index (-1 = from environment)",
    "log_every": "steps between train metrics rows",
    "eval_every": "steps between validation/test evaluations (0 = only at stage ends)",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept",
    "progress": "progress lines (a bar on a terminal)",
    "init_from": "a workdir to start from (transfer learning; mismatched shapes re-initialised)",
    "nonfinite": "on a non-finite loss or gradient: stop, or skip the update",
    "stages": "a multi-stage pipeline: a tuple of jaxaccel.stages.stage(...); () = one train "
              "stage of num_steps",
    "imp.rounds": "iterative magnitude pruning rounds (train -> prune -> rewind), 0 = off",
    "imp.rate": "IMP: fraction of the remaining weights pruned per round",
    "imp.per_layer_rates": "IMP: per-layer rates, e.g. {'fc3/kernel': 0.1}",
    "imp.rewind": "IMP: rewind to the snapshot at rewind_step, or to random weights (control)",
    "imp.steps": "IMP: training steps per round (0 = num_steps)",
    "rewind_step": "rewind stages go back to the weights after this many steps",
    "distill.teacher": "a finished run's workdir to distil from ('' = off; a config without "
                       "stages, else set distill on the train stages)",
    "distill.temperature": "distillation temperature T (> 0) of the soft targets",
    "distill.alpha": "weight of the soft (distillation) term, in [0, 1]; 1 - alpha: labels",
    "distill.precompute": "teacher logits computed once per training example (needs no "
                          "augmentation) instead of a teacher forward pass in every step",
    "ensemble.members": "K > 1 trains K members (seeds seed..seed+K-1 unless ensemble.overrides "
                        "sets them) as one program",
    "ensemble.combine": "how members combine: average (probabilities), stack (weights fit "
                        "on the validation split) or logistic (a logistic regression over "
                        "all members' logits, fit on the validation split)",
    "ensemble.overrides": "() or one dict per member of shape-keeping overrides (seed, "
                          "optimizer.lr/weight_decay/b1/b2/momentum, label_smoothing), "
                          "e.g. ({'optimizer.lr': 0.1}, {'optimizer.lr': 0.03})",
}


def describe(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """One row per leaf key of `config` (stage sections written out as `stages.<i>.<key>`):
    `key`, `value`, `default` (the schema's), `type`, `choices` (tuple or None), `help`."""
    from jaxaccel import data, models
    choices = {**CHOICES, "model.name": tuple(sorted(models.MODELS)),
               "dataset.name": (*data.DATASETS, data.FOLDER_DATASET),
               "model.conv_impl": models.CONV_IMPLS, "imp.rewind": stages_lib.REWIND_TO,
               **{f"stages.*.{k}": v for k, v in stages_lib.choices().items()}}
    schema, stage_schema = default_config(), stages_lib.stage("name", "train")
    rows = []
    for key, text in flat_items(from_json(to_json(config))):
        generic = re.sub(r"^stages\.\d+\.", "stages.*.", key)
        value = json.loads(text)
        if generic.startswith("stages.*."):
            field = generic[len("stages.*."):]
            default = _get_or_none(stage_schema, field)
            help_ = stages_lib.KEY_HELP.get(field) or stages_lib.KEY_HELP.get(
                field.split(".")[0], "")
        else:
            default = _get_or_none(schema, key)
            help_ = KEY_HELP.get(key) or KEY_HELP.get(key.rsplit(".", 1)[0], "")
        rows.append({"key": key, "value": value, "default": default,
                     "type": type(default if default is not None else value).__name__,
                     "choices": choices.get(generic), "help": help_})
    return rows


def _get_or_none(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return None
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def load_experiment(path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Import an experiment file, call its `get_config()`, check everything it set against the
    schema (`check_schema`) and apply `key=value` overrides.

    A mistake inside the file (an unknown key at any depth, a value of the wrong type, an
    exception in `get_config()`) is a one-line `ConfigError` naming the file and the key or line.
    """
    module = import_experiment(path)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{path!r} has no get_config() function")
    config = call_experiment(path, module.get_config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an "
                          f"ml_collections.ConfigDict (start from jaxaccel.config.default_config())")
    try:
        check_schema(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    apply_overrides(config, overrides or [])
    return config


_EXPERIMENTS: dict[str, Any] = {}


def import_experiment(path: str):
    """The experiment file as a module, imported once per version of the file (its
    `get_config()` and `get_sweep()` are read from the same import; an edited file is
    imported again)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}:{stat.st_mtime_ns}:{stat.st_size}"
    if key not in _EXPERIMENTS:
        spec = importlib.util.spec_from_file_location(
            "jaxaccel_experiment_" + os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(spec)
        call_experiment(path, lambda: spec.loader.exec_module(module))
        _EXPERIMENTS[key] = module
    return _EXPERIMENTS[key]


def call_experiment(path: str, fn: Callable[[], Any]) -> Any:
    """`fn()` (code of the experiment file); any exception becomes one ConfigError line naming
    the file, the line of the file where it happened, and the error."""
    try:
        return fn()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a user's file may raise anything
        line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
        target = os.path.abspath(path)
        for frame in traceback.extract_tb(e.__traceback__):
            if os.path.abspath(frame.filename) == target:
                line = frame.lineno
        where = f"{path}, line {line}" if line else path
        message = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where}: {type(e).__name__}: {message}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply `a.b=value` strings (values parsed as Python literals, else kept as strings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        set_value(config, key.strip(), parse_value(raw))


def parse_value(raw: str) -> Any:
    """`'0.1'` -> 0.1, `'true'` -> True, `'(1,2)'` -> (1, 2); anything else stays a string."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set a dotted key, refusing unknown keys and values of the wrong type."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, (tuple, list)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # a section in a list, e.g. stages.1.prune.sparsity
            continue
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(_unknown_key(config, ".".join(parts[: i + 1])))
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
        raise ConfigError(_unknown_key(config, key))
    if key.startswith("model.kwargs."):
        if leaf in node:  # free-form: a later override may change the value's type
            del node[leaf]
        node[leaf] = value  # free-form model fields, validated by the model itself
        return
    if leaf not in node:
        raise ConfigError(_unknown_key(config, key))
    old = node[leaf]
    if isinstance(old, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"override {key!r} names a section, not a value; "
                          f"valid keys: {', '.join(sorted(old.keys()))}")
    value = _coerce(key, old, value)
    node[leaf] = value


def _coerce(key: str, old: Any, value: Any) -> Any:
    if isinstance(old, bool) or isinstance(value, bool):
        if isinstance(old, bool) and isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected {type(old).__name__}")
    if isinstance(old, float) and isinstance(value, int):
        return float(value)
    if isinstance(old, tuple) and isinstance(value, (int, float)):
        value = (value,)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if old is not None and not isinstance(value, type(old)):
        raise ConfigError(f"{key}={value!r}: expected {type(old).__name__}, "
                          f"got {type(value).__name__}")
    return value


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> str:
    keys = flat_keys(config)
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def flat_keys(config: ml_collections.ConfigDict) -> list[str]:
    """All dotted leaf keys of a config (stage sections as `stages.<i>.<key>`)."""
    return [key for key, _ in flat_items(config)]


# Sections whose keys are free (per-layer maps, model fields); their values are checked by
# whatever reads them (`validate` for model fields). `*` stands for a stage index.
FREE_SECTIONS = ("model.kwargs", "imp.per_layer_rates", "stages.*.prune.per_layer",
                 "stages.*.prune.per_layer_rates", "stages.*.cluster.per_layer")


def check_schema(config: ml_collections.ConfigDict) -> None:
    """Every key `config` sets exists in the schema with a value of the schema's type.

    The schema is `default_config()`, and for each entry of `stages` a full `stages.stage(...)`
    (its `optimizer` section may override any optimizer field). ml_collections accepts new
    keys silently (`c.num_step = 100` adds a key nobody reads); this refuses them, at any
    depth, with "did you mean" from the schema's keys.
    """
    _check_section(config, default_config(), "")


def _check_section(node: Any, schema: ml_collections.ConfigDict, prefix: str) -> None:
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"{prefix[:-1]}={node!r} must be a section with keys "
                          f"{', '.join(sorted(schema.keys()))}")
    generic = re.sub(r"\.\d+\.", ".*.", prefix)
    for key, value in node.items():
        path = prefix + key
        if key not in schema:
            known = [prefix + k for k in _leaf_keys(schema)]
            close = difflib.get_close_matches(path, known, n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else (
                f"; valid keys here: {', '.join(sorted(schema.keys()))}")
            raise ConfigError(f"unknown config key {path!r}{hint}")
        expected = schema[key]
        if generic + key in FREE_SECTIONS:
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{path}={value!r} must be a mapping")
        elif path == "stages":
            _check_stages(value)
        elif isinstance(expected, ml_collections.ConfigDict):
            _check_section(value, expected, path + ".")
        else:
            _coerce(path, expected, value)


def _leaf_keys(schema: ml_collections.ConfigDict) -> list[str]:
    return [k for k in schema.keys()] + [f"{k}.{sub}" for k, v in schema.items()
                                         if isinstance(v, ml_collections.ConfigDict)
                                         for sub in _leaf_keys(v)]


def _check_stages(value: Any) -> None:
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"stages={value!r} must be a tuple of stage sections made with "
                          f"jaxaccel.stages.stage(...)")
    schema = stages_lib.stage("name", "train")
    schema.optimizer = default_config().optimizer
    for i, s in enumerate(value):
        _check_section(s, schema, f"stages.{i}.")


def _check_model_kwargs(config: ml_collections.ConfigDict) -> None:
    """`model.kwargs` may set only fields the model has (other than those set by other keys)."""
    from jaxaccel import models
    cls = models.MODELS[config.model.name]
    fields = sorted(set(cls.__dataclass_fields__) - {"parent", "name", "num_classes", "dtype",
                                                     "conv_impl"})
    for key in config.model.kwargs.keys():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=2)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"model.kwargs.{key}: model {config.model.name!r} has no field "
                              f"{key!r}; {hint}its fields: {', '.join(fields)}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every key, type, choice and range the trainer relies on; raise ConfigError if bad."""
    from jaxaccel import data, models  # local: keeps `import jaxaccel.config` light

    check_schema(config)
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    if config.model.name not in models.MODELS:
        raise ConfigError(f"model.name={config.model.name!r} is not valid; "
                          f"choose one of: {', '.join(sorted(models.MODELS))}")
    _check_model_kwargs(config)
    datasets = sorted(data.DATASETS) + [data.FOLDER_DATASET]
    if config.dataset.name not in datasets:
        raise ConfigError(f"dataset.name={config.dataset.name!r} is not valid; "
                          f"choose one of: {', '.join(datasets)}")
    if config.dataset.name == "image_folder" and not os.path.isdir(config.dataset.path or ""):
        raise ConfigError(f"dataset.path={config.dataset.path!r}: image folder not found")
    for key in ("batch_size", "eval_batch_size"):
        if _get(config, key) <= 0:
            raise ConfigError(f"{key}={_get(config, key)} must be positive")
    if config.num_steps < 0:
        raise ConfigError(f"num_steps={config.num_steps} must be >= 0")
    if config.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={config.optimizer.lr} must be positive")
    if config.model.width <= 0:
        raise ConfigError(f"model.width={config.model.width} must be positive")
    size = tuple(config.dataset.image_size)
    if (len(size) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                  for d in size) or (0 in size and any(size))):
        raise ConfigError(f"dataset.image_size={size!r} must be (height, width), both > 0, "
                          f"or (0, 0) to keep the images' size")
    if any(size) and config.dataset.name != data.FOLDER_DATASET:
        raise ConfigError(f"dataset.image_size={size!r} resizes {data.FOLDER_DATASET!r} images "
                          f"only; dataset {config.dataset.name!r} has a fixed shape")
    if not 0.0 <= config.dataset.validation_split < 1.0:
        raise ConfigError(f"dataset.validation_split={config.dataset.validation_split} must be "
                          f"in [0, 1): the fraction of the train split held out (0 = none)")
    if config.dataset.validation_seed < 0:
        raise ConfigError(f"dataset.validation_seed={config.dataset.validation_seed} must be >= 0")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing={config.label_smoothing} must be in [0, 1)")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if _get(config, key) <= 0:
            raise ConfigError(f"{key}={_get(config, key)} must be positive")
    for key, text in flat_items(config):
        if text in ("NaN", "Infinity", "-Infinity"):
            raise ConfigError(f"{key}={text.lower().replace('infinity', 'inf')} must be a "
                              f"finite number")
    if config.init_from and not os.path.isfile(os.path.join(config.init_from, CONFIG_FILE)):
        raise ConfigError(f"init_from={config.init_from!r} is not a jaxaccel workdir "
                          f"(no config.json there)")
    bounds = config.optimizer.boundaries
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in bounds):
        raise ConfigError(f"optimizer.boundaries={tuple(bounds)!r} must be step numbers >= 0")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed={config.seed} must be in [0, 2**32)")
    try:
        expanded = stages_lib.expand(config)
    except (AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"stages={tuple(config.stages)!r}: not a tuple of stage sections "
                          f"made with jaxaccel.stages.stage(...) ({e})") from None
    _check_ensemble(config, expanded)
    for s in expanded:
        _check_teacher(s.distill, where="distill" if not tuple(config.stages)
                       else f"stages {s.name!r} distill",
                       augmenting=bool(config.dataset.crop_padding or config.dataset.flip))
        opt = stages_lib.stage_optimizer(config, s)
        if s.kind == "train" and opt.schedule == "warmup_cosine" and s.steps and \
                not 0 <= opt.warmup_steps < s.steps:
            raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps} must be below the "
                              f"{s.steps} steps of train stage {s.name!r} (warmup_cosine decays "
                              f"over the steps after the warmup)")


def _check_ensemble(config: ml_collections.ConfigDict, stages: list) -> None:
    members = config.ensemble.members
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"ensemble.members={members!r} must be an integer >= 1")
    if members == 1:
        if config.ensemble.overrides:
            raise ConfigError("ensemble.overrides sets each member's hyperparameters; it needs "
                              "ensemble.members > 1")
        return
    if len(stages) != 1 or stages[0].kind != "train":
        raise ConfigError(f"ensemble.members={members} trains single-stage configs (one train "
                          f"stage); this config has stages {[s.name for s in stages]}")
    if config.parallel.strategy != "data" and not sequential_members(config):
        raise ConfigError(f"ensemble.members={members} runs with parallel.strategy='data' (the "
                          f"members are stacked), not {config.parallel.strategy!r}")
    if config.ensemble.combine in ("stack", "logistic") and not config.dataset.validation_split:
        raise ConfigError(f"ensemble.combine={config.ensemble.combine!r} fits the combination "
                          f"on the validation split; set dataset.validation_split > 0 (it never "
                          f"reads test)")
    if config.init_from:
        raise ConfigError("ensemble.members > 1 does not support init_from")
    _check_member_overrides(config)


# Keys `ensemble.overrides` may set per member: they keep every shape and the program (the
# members' hyperparameters are traced inputs of the one stacked step, as in a vectorized
# sweep). Any other key (model.*, batch_size, optimizer.name, ...) makes the members
# different programs: they train one after another, each a run of its own
# (`sequential_members`), except the keys below, which every member must share.
MEMBER_OVERRIDES = ("seed", "optimizer.lr", "optimizer.weight_decay", "optimizer.b1",
                    "optimizer.b2", "optimizer.momentum", "label_smoothing")
SHARED_BY_MEMBERS = ("dataset", "ensemble", "parallel", "distributed", "stages", "progress")


def sequential_members(config: ml_collections.ConfigDict) -> bool:
    """True when an ensemble's members differ in shapes or program (an override outside
    `MEMBER_OVERRIDES`): they train one after another in WORKDIR/members/member<k>."""
    return config.ensemble.members > 1 and any(
        key not in MEMBER_OVERRIDES for member in tuple(config.ensemble.overrides or ())
        if isinstance(member, (dict, ml_collections.ConfigDict)) for key in member)


def _check_member_overrides(config: ml_collections.ConfigDict) -> None:
    overrides, members = config.ensemble.overrides, config.ensemble.members
    if not overrides:
        return
    if not isinstance(overrides, (tuple, list)) or len(overrides) != members:
        raise ConfigError(f"ensemble.overrides must be () or a tuple of ensemble.members="
                          f"{members} dicts (one per member), got {overrides!r}")
    for k, member in enumerate(overrides):
        if not isinstance(member, (dict, ml_collections.ConfigDict)):
            raise ConfigError(f"ensemble.overrides[{k}]={member!r} must be a dict of config "
                              f"overrides")
        for key, value in member.items():
            if key.split(".")[0] in SHARED_BY_MEMBERS:
                raise ConfigError(
                    f"ensemble.overrides[{k}]: {key!r} cannot differ between members (they are "
                    f"trained on one dataset and combined on its splits); members may not "
                    f"override {', '.join(k_ + '.*' for k_ in SHARED_BY_MEMBERS)}")
            if key not in MEMBER_OVERRIDES:
                continue  # a program-changing key: checked with the member's whole config
            ok = (isinstance(value, int) and value >= 0 if key == "seed"
                  else isinstance(value, (int, float)) and value >= 0)
            if isinstance(value, bool) or not ok:
                raise ConfigError(f"ensemble.overrides[{k}]: {key}={value!r} must be a number "
                                  f">= 0" + (" (an integer)" if key == "seed" else ""))
    if sequential_members(config):  # each member is a run of its own: validate it as one
        for k in range(members):
            try:
                validate(member_config(config, k))
            except ConfigError as e:
                raise ConfigError(f"ensemble.overrides[{k}]: {e}") from None
        return
    # The optimizer's structure (a decay term, SGD momentum) is the config's: one program.
    opts = [member_optimizer(member_config(config, k)) for k in range(members)]
    base = member_optimizer(config)
    if base.name != "adamw" and base.weight_decay <= 0 and any(o.weight_decay > 0 for o in opts):
        raise ConfigError("ensemble.overrides: a member's optimizer.weight_decay > 0 needs "
                          "optimizer.weight_decay > 0 in the config (the decay term is part of "
                          "the one program; members may override it with 0)")
    if base.name == "sgd" and any((o.momentum > 0) != (base.momentum > 0) for o in opts):
        raise ConfigError(f"ensemble.overrides: optimizer.momentum must be > 0 in every member "
                          f"or in none, as in the config ({base.momentum}) (SGD with and without "
                          f"momentum keep different state)")


def member_optimizer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The optimizer section of a single-stage config's train stage."""
    return stages_lib.stage_optimizer(config, stages_lib.expand(config)[0])


def member_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
    """Member k's own config: its seed (seed + k unless overridden) and its overrides (from
    `ensemble.overrides`), as a single run of it would be configured (ensemble.members 1)."""
    out = from_json(to_json(config))
    out.seed = config.seed + k
    for key, value in (dict(config.ensemble.overrides[k]) if config.ensemble.overrides
                       else {}).items():
        set_value(out, key, value)
    out.ensemble.members, out.ensemble.overrides = 1, ()
    out.ensemble.combine = "average"
    return out


def _check_teacher(d: ml_collections.ConfigDict, *, where: str, augmenting: bool) -> None:
    """A distillation teacher must be a run that finished training here."""
    if not d.teacher:
        return
    if not os.path.isfile(os.path.join(d.teacher, CONFIG_FILE)):
        raise ConfigError(f"{where}.teacher={d.teacher!r} is not a jaxaccel workdir "
                          f"(no {CONFIG_FILE} there)")
    checkpoints = os.path.join(d.teacher, CHECKPOINTS_DIR)
    members_done = all(os.path.isfile(os.path.join(d.teacher, f))  # an ensemble of runs
                       for f in (ENSEMBLE_FILE, RESULTS_FILE))
    if not members_done and (not os.path.isdir(checkpoints)
                             or not any(n.isdigit() for n in os.listdir(checkpoints))):
        raise ConfigError(f"{where}.teacher={d.teacher!r} has no finished checkpoint; train it "
                          f"first")
    if d.precompute and augmenting:
        raise ConfigError(f"{where}.precompute=True needs fixed inputs, but dataset.crop_padding"
                          f"/flip augment them; use a teacher forward in the step (precompute "
                          f"false)")


def validate_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The global batch must split evenly over the devices."""
    for key in ("batch_size", "eval_batch_size"):
        if _get(config, key) % num_devices:
            raise ConfigError(f"{key}={_get(config, key)} is not divisible by the "
                              f"{num_devices} devices; use a multiple of {num_devices}")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def to_json(config: ml_collections.ConfigDict) -> str:
    """Stable JSON of a config (what `workdir/config.json` holds)."""
    return io.dumps(config.to_dict())


def _plain(x: Any) -> Any:
    if isinstance(x, ml_collections.ConfigDict):
        return x.to_dict()
    return list(x)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuild a config from `to_json` output; lists become tuples as in the original."""
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x
    return ml_collections.ConfigDict(tuples(json.loads(text)))


def differences(saved: ml_collections.ConfigDict, requested: ml_collections.ConfigDict) -> list[str]:
    """Dotted keys whose values differ, ignoring keys that only affect execution.

    A key that a workdir's older config.json lacks (added to the schema since) counts as
    its default: old workdirs resume as long as the new key keeps its default.
    """
    a = dict(flat_items(from_json(to_json(saved))))
    b = dict(flat_items(from_json(to_json(requested))))
    defaults = dict(flat_items(from_json(to_json(default_config()))))
    sections = {k.rsplit(".", i)[0] for k in (*a, *b) for i in range(1, k.count(".") + 1)}
    for k, v in defaults.items():
        if k not in a and k not in sections:  # e.g. `stages` written out as stages.0.name
            a[k] = v
    stage_defaults = dict(flat_items(from_json(to_json(stages_lib.stage("name", "train")))))
    for k in b:  # stage fields added to the schema since: their defaults
        field = re.sub(r"^stages\.\d+\.", "", k)
        if k not in a and field != k and stage_defaults.get(field) == b[k]:
            a[k] = b[k]
    out = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in RUNTIME_KEYS:
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k, 'missing')} -> {b.get(k, 'missing')}")
    return out


def flat_items(node: Any, prefix: str = ""):
    """(dotted key, JSON value) pairs; lists of sections are indexed: `stages.1.prune.sparsity`."""
    if isinstance(node, (dict, ml_collections.ConfigDict)) and (len(node) or not prefix):
        for k, v in node.items():
            yield from flat_items(v, f"{prefix}{k}.")
    elif isinstance(node, (list, tuple)) and any(isinstance(v, (dict, ml_collections.ConfigDict))
                                                for v in node):
        for i, v in enumerate(node):
            yield from flat_items(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], json.dumps(node, sort_keys=True, default=_plain)
