"""What a benchmark runs: the project's own training set-up for a model, batch and input shape.

`bench_setup` goes through `jaxaccel.state.build` (the function `jaxaccel train` uses), so
the model, optimizer and train state are exactly what users train. A dataset whose image
shape matches `input_shape` supplies the spec (32,32,3 -> cifar10, 28,28,1 -> mnist5k,
8,8,1 -> digits; only its static metadata is read, no data); for any other shape the spec
and the state initialiser are re-derived for that shape. Also the benchmarks' flag parsers
(`parse_input_shape`, ...), `bench_config` and `synthetic_batch`.

Imports config, state, models and data (inside functions); never the loop, the pipeline,
sweeps or the CLI.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

NUM_CLASSES = 10
DEFAULT_INPUT_SHAPE = (32, 32, 3)


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, int, int]:
    """'32,32,3' -> (32, 32, 3); ValueError naming the bad value otherwise."""
    if not isinstance(text, str):
        values = tuple(text)
    else:
        try:
            values = tuple(int(v) for v in text.replace(" ", "").split(","))
        except ValueError:
            values = ()
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"bad input shape {text!r}: expected three positive integers H,W,C "
                         f"such as 32,32,3")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def parse_int_list(text: str | Sequence[int], what: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8) (positive integers)."""
    try:
        values = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"bad {what} {text!r}: expected positive integers such as 1,2,4,8")
    return values


def parse_fractions(text: str | Sequence[float], what: str) -> tuple[float, ...]:
    """'0.25,0.5,0.75' -> (0.25, 0.5, 0.75), each in (0, 1)."""
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        values = ()
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise ValueError(f"bad {what} {text!r}: expected fractions in (0, 1) such as 0.25,0.5,0.75")
    return values


def check_model(name: str) -> str:
    """`name` if it is a registered model; ValueError listing the valid names otherwise."""
    from jaxaccel import models

    if name not in models.MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(models.MODELS))}")
    return name


def check_conv_impl(conv_impl: str) -> str:
    """`conv_impl` if the models know it; ValueError listing the valid choices otherwise."""
    from jaxaccel.models import conv_impls

    return conv_impls.check_conv_impl(conv_impl)


def resolved_conv_impl(conv_impl: str, model: str) -> str:
    """The concrete implementation `conv_impl` stands for in registered `model` on this backend."""
    from jaxaccel import models

    cpu_choice = getattr(models.MODELS.get(model), "AUTO_CPU_CONV_IMPL", "cpu")
    return models.resolve_conv_impl(conv_impl, cpu_choice)


def matching_dataset(input_shape: Sequence[int]) -> str | None:
    """A known dataset (10 classes) whose images have `input_shape`, or None."""
    from jaxaccel import data

    for name, spec in data.DATASETS.items():
        if tuple(spec.image_shape) == tuple(input_shape) and spec.num_classes == NUM_CLASSES:
            return name
    return None


def bench_config(model: str = "cnn3", batch_size: int = 128,
                 input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE, *, conv_impl: str = "auto",
                 strategy: str = "data", dtype: str = "float32") -> Any:
    """A `default_config()` for timing `model` (Adam, constant lr, like the experiments)."""
    from jaxaccel import config as config_lib

    check_model(model)
    check_conv_impl(conv_impl)
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be positive")
    c = config_lib.default_config()
    c.model.name = model
    c.model.conv_impl = conv_impl
    c.model.dtype = dtype
    c.dataset.name = matching_dataset(input_shape) or "mnist5k"
    c.batch_size = int(batch_size)
    c.parallel.strategy = strategy
    c.progress = False
    config_lib.validate(c)
    return c


def bench_setup(config: Any, input_shape: Sequence[int]) -> Any:
    """`jaxaccel.state.build(config)`, adapted to `input_shape` if its dataset has another."""
    from jaxaccel.state import build, with_input_shape

    return with_input_shape(build(config), input_shape)


def synthetic_batch(batch_size: int, input_shape: Sequence[int], *, num_classes: int = NUM_CLASSES,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch like `TrainBatches.batch`: normalised float32 images and int32 labels."""
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch_size, *input_shape), dtype=np.float32),
            "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}
