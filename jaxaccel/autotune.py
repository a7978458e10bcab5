"""`conv_impl="auto"` (and the int8 conv lowering "auto") measured, not assumed (cuDNN's
benchmark mode, for jaxaccel's convs).

On first use for a key — model (name, width, kwargs), image shape, batch, dtype, train or
infer, backend, the CPU's vector features, the kernels' ISA and a digest of their sources (a
changed kernel is measured again) — every conv implementation that can run here
(`CANDIDATES`) is compiled and timed for a few steps, and the fastest is cached on disk, so
later runs on the same kind of machine reuse the choice without timing. A config that names
a concrete `model.conv_impl` is never tuned (forced); `JAXACCEL_AUTOTUNE=off` disables tuning
("auto" is then the model's built-in default, `resolve_conv_impl`); off the CPU backend
"auto" is "xla" (the only candidate there). The choice and why it was made (`Choice.reason`)
are what `jaxaccel bench` prints and what results.json records (`conv_impl`).

Cache: `$JAXACCEL_AUTOTUNE_CACHE`, else ~/.cache/jaxaccel/autotune.json; strict JSON, one
entry per key: `{"choice", "timings_ms", "measured"}`; written atomically.

Imports state (to build the steps it times), models, data, io and the kernels' CPU feature
probe; the pipeline, loading and benchmarks call it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaccel import io, models
from jaxaccel.kernels.build import ISA_ORDER, host_isa, sources_digest, vector_features
from jaxaccel.models.conv_impls import resolve_conv_impl

log = logging.getLogger("jaxaccel")

CANDIDATES = ("xla", "cpu", "winograd", "cpu_kernel")
MODES = ("train", "infer")
ENV_SWITCH = "JAXACCEL_AUTOTUNE"       # "off" disables tuning
ENV_CACHE = "JAXACCEL_AUTOTUNE_CACHE"  # where the choices are kept
TIMED_STEPS = 3                        # timed calls per candidate, after one compiling call


@dataclasses.dataclass(frozen=True)
class Choice:
    """What "auto" (or a forced implementation) means for one key, and why."""
    impl: str
    reason: str
    key: str = ""
    timings_ms: dict[str, float] | None = None

    def record(self) -> dict[str, Any]:
        """The JSON form results.json and benchmarks keep."""
        return {"impl": self.impl, "reason": self.reason, "key": self.key,
                "timings_ms": self.timings_ms}


def enabled() -> bool:
    """Tuning is on unless $JAXACCEL_AUTOTUNE is "off" (or "0", "false")."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false")


def cache_path() -> str:
    return os.environ.get(ENV_CACHE) or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxaccel", "autotune.json")


def read_cache() -> dict[str, Any]:
    """The cached choices ({} when there is no cache; an unreadable one is ignored, logged)."""
    path = cache_path()
    if not os.path.isfile(path):
        return {}
    try:
        body = io.read_json(path)
    except (ValueError, OSError) as e:
        log.warning("autotune cache %s is unreadable (%s); measuring again", path, e)
        return {}
    return body if isinstance(body, dict) else {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    body = read_cache()
    body[key] = entry
    path = cache_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    io.write_json(path, body)


def tune_key(model: ml_collections.ConfigDict, image_shape: tuple[int, ...], batch: int,
             mode: str) -> str:
    """The key a choice is cached under: everything that decides which implementation wins."""
    return json.dumps({"model": model.name, "width": float(model.width),
                       "kwargs": {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in dict(model.kwargs).items()},
                       "image_shape": list(image_shape), "batch": int(batch),
                       "dtype": model.dtype, "mode": mode, "backend": jax.default_backend(),
                       "cpu": vector_features(), "kernel_isa": _kernel_isa(),
                       "kernels": sources_digest()}, sort_keys=True)


def _kernel_isa() -> str | None:
    """The ISA jaxaccel's CPU kernels are built for here (`JAXACCEL_KERNEL_ISA` may cap it, which
    changes their speed: part of the key); None off the CPU backend."""
    return host_isa(ISA_ORDER) if jax.default_backend() == "cpu" else None


def _has_convs(config: ml_collections.ConfigDict, num_classes: int,
               image_shape: tuple[int, ...]) -> bool:
    net = models.get_model(config.model.name, num_classes, width=config.model.width,
                           dtype=config.model.dtype, conv_impl="xla", **dict(config.model.kwargs))
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, *image_shape)), train=False))
    return any(len(x.shape) == 4 for x in jax.tree.leaves(shapes["params"]))


def builtin(config: ml_collections.ConfigDict, reason: str) -> Choice:
    """What `config.model.conv_impl` means without timing anything: a concrete one as given,
    "auto" as the model's built-in default (`resolve_conv_impl` with its AUTO_CPU_CONV_IMPL)."""
    static = getattr(models.MODELS.get(config.model.name), "AUTO_CPU_CONV_IMPL", "cpu")
    return Choice(resolve_conv_impl(config.model.conv_impl, static), reason)


def choose(config: ml_collections.ConfigDict, *, mode: str = "train",
           batch: int | None = None, image_shape: tuple[int, ...] | None = None) -> Choice:
    """What `config.model.conv_impl` means for this run: forced, measured (or cached), or
    the built-in default (tuning off, no convs, not the CPU backend). `batch` defaults to the
    config's (train or eval), `image_shape` to its dataset's."""
    from jaxaccel import data
    if mode not in MODES:
        raise ValueError(f"autotune mode {mode!r}: choose one of {', '.join(MODES)}")
    impl = config.model.conv_impl
    if impl != "auto":
        return builtin(config, "forced by model.conv_impl")
    if jax.default_backend() != "cpu":
        return Choice("xla", f"not tuned on {jax.default_backend()} (one candidate)")
    if not enabled():
        return builtin(config, f"the model's default ({ENV_SWITCH}=off)")
    spec = data.spec_for(config.dataset)
    image_shape = tuple(int(d) for d in (image_shape or spec.image_shape))
    if not _has_convs(config, spec.num_classes, image_shape):
        return builtin(config, "no convs to tune")
    batch = int(batch or (config.batch_size if mode == "train" else config.eval_batch_size))
    key = tune_key(config.model, image_shape, batch, mode)
    return cached_or_measured(
        key, CANDIDATES, lambda: measure(config, spec.num_classes, image_shape, batch, mode),
        f"conv_impl for {config.model.name} {mode} batch {batch}")


def cached_or_measured(key: str, valid: tuple[str, ...], measure_fn: Any, what: str) -> Choice:
    """The cached choice for `key`, or `measure_fn()`'s fastest (ms per candidate), cached."""
    cached = read_cache().get(key)
    if isinstance(cached, dict) and cached.get("choice") in valid:
        return Choice(cached["choice"], f"measured on {cached.get('measured', '?')} (cached in "
                      f"{cache_path()})", key, cached.get("timings_ms"))
    timings = measure_fn()
    best = min(timings, key=timings.get)
    _write_cache(key, {"choice": best, "timings_ms": timings,
                       "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    shown = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))
    log.info("autotune: %s: %s (%s)", what, best, shown)
    return Choice(best, f"measured now: {shown}", key, timings)


def choose_int8_lowering(model: Any, int8_model: Any, images: jax.Array, *,
                         model_key: dict[str, Any]) -> Choice:
    """Which int8 conv lowering (`compress.int8.CONV_LOWERINGS`) "auto" means for this int8
    model at `images`' shape: measured on first use and cached like `choose` (every lowering
    computes the same integers; only speed differs). `model_key` names the model (name,
    width, ...) in the cache key."""
    from jaxaccel.compress import int8
    default = int8.resolve_conv_lowering("auto")
    if jax.default_backend() != "cpu":
        return Choice(default, f"not tuned on {jax.default_backend()}")
    if not enabled():
        return Choice(default, f"the built-in default ({ENV_SWITCH}=off)")
    lowerings = tuple(lo for lo in int8.CONV_LOWERINGS if lo != "auto"
                      and (lo != "cpu_kernel" or default == "cpu_kernel"))
    key = json.dumps({**model_key, "int8_images": list(images.shape), "mode": "int8-infer",
                      "backend": jax.default_backend(), "cpu": vector_features(),
                      "kernel_isa": _kernel_isa(), "kernels": sources_digest()}, sort_keys=True)

    def measure_lowerings() -> dict[str, float]:
        timings = {}
        for lowering in lowerings:
            fn = jax.jit(lambda m, x, lo=lowering: int8.int8_apply(model, m, x, conv_lowering=lo))
            jax.block_until_ready(fn(int8_model, images))  # compiles
            times = []
            for _ in range(TIMED_STEPS):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(int8_model, images))
                times.append((time.perf_counter() - t0) * 1000)
            timings[lowering] = round(statistics.median(times), 3)
        return timings

    return cached_or_measured(key, lowerings, measure_lowerings,
                              f"int8 conv lowering for {model_key.get('model', '?')}")


def candidates() -> list[str]:
    """The implementations that can run here (the kernel needs its CPU features/compiler)."""
    from jaxaccel.kernels import winograd
    return [c for c in CANDIDATES if c != "cpu_kernel" or winograd.available()]


def measure(config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple[int, ...],
            batch: int, mode: str) -> dict[str, float]:
    """Median milliseconds of a train step (or an inference call) of `config`'s model at
    `batch` per candidate, after one compiling call each; synthetic data, fixed seed."""
    from jaxaccel.state import build, with_input_shape
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, *image_shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
    timings = {}
    for impl in candidates():
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.conv_impl = impl
        setup = with_input_shape(build(c), image_shape)
        state = jax.jit(setup.init_state)(jax.random.PRNGKey(0))
        if mode == "train":
            from jaxaccel.state import make_train_step
            step = jax.jit(make_train_step(setup.model, setup.tx, setup.schedule,
                                           num_classes=num_classes), donate_argnums=0)
            batch_ = {"image": images, "label": labels}

            def call(state=state, step=step, batch_=batch_):
                new, metrics = step(state, batch_)
                jax.block_until_ready(metrics)
                return new
        else:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            apply = jax.jit(lambda v, x, m=setup.model: m.apply(v, x, train=False))

            def call(state=state, apply=apply, variables=variables):
                jax.block_until_ready(apply(variables, images))
                return state
        state = call()  # compiles
        times = []
        for _ in range(TIMED_STEPS):
            t0 = time.perf_counter()
            state = call(state) if mode == "train" else call()
            times.append((time.perf_counter() - t0) * 1000)
        timings[impl] = round(statistics.median(times), 3)
    return timings
