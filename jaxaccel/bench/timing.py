"""Timing with warm-up, repeats and medians; interleaved comparisons; the machine's matmul peak.

Machines are noisy (this one is shared), so every comparison that ends in a ratio is timed
*interleaved*: the candidates take turns in short rounds, and each sees the same slow and
fast moments. Every timed call must block until its results are ready (`work()` returns
only when the device is done), so one sample is one finished unit of work.

Owns `Timing`, `time_calls`, `time_once`, `time_interleaved`, `ratio`, `matmul_peak` and
`machine_info`. Imports nothing of jaxaccel.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one unit of work, in milliseconds."""

    samples_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("Timing needs at least one sample")

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range (0 with fewer than 4 samples): the spread we saw."""
        if len(self.samples_ms) < 4:
            return 0.0
        q1, q3 = np.percentile(self.samples_ms, [25, 75])
        return float(q3 - q1)

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        """`{prefix}_ms_median`, `_ms_min`, `_ms_iqr`, `_repeats` for JSON."""
        return {f"{prefix}_ms_median": self.median_ms, f"{prefix}_ms_min": self.min_ms,
                f"{prefix}_ms_iqr": self.iqr_ms, f"{prefix}_repeats": len(self.samples_ms)}


def check_counts(warmup: int, repeats: int) -> None:
    """ValueError unless warmup >= 0 and repeats >= 1."""
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")


def time_calls(work: Callable[[], Any], *, warmup: int, repeats: int) -> Timing:
    """Run `work()` `warmup` times untimed, then `repeats` times timed one by one."""
    return time_interleaved({"work": work}, warmup=warmup, repeats=repeats)["work"]


def time_interleaved(works: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int,
                     round_size: int = 5) -> dict[str, Timing]:
    """Time several units of work taking turns: `round_size` calls of each, until every one
    has `repeats` samples (after `warmup` untimed calls each). Ratios of the medians are then
    fair on a machine whose speed drifts."""
    check_counts(warmup, repeats)
    for work in works.values():
        for _ in range(warmup):
            work()
    samples: dict[str, list[float]] = {name: [] for name in works}
    while any(len(s) < repeats for s in samples.values()):
        for name, work in works.items():
            for _ in range(min(round_size, repeats - len(samples[name]))):
                t0 = time.perf_counter()
                work()
                samples[name].append(1000.0 * (time.perf_counter() - t0))
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def time_once(work: Callable[[], Any]) -> float:
    """Seconds of one call (e.g. a first call that includes compilation)."""
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def matmul_work(size: int = 2048) -> tuple[Callable[[], Any], float]:
    """(work, flops): a float32 `size`³ matmul on the default device that blocks until done.

    Its throughput is the practical FLOP/s peak that model FLOPs utilisation is measured
    against; time it interleaved with the model so both see the same machine.
    """
    import jax
    import jax.numpy as jnp

    if size < 1:
        raise ValueError(f"matmul size={size} must be >= 1")
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (size, size), jnp.float32)
    b = jax.random.normal(k2, (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return (lambda: matmul(a, b).block_until_ready()), 2.0 * size ** 3


def matmul_peak(size: int = 2048, *, warmup: int = 2, repeats: int = 5,
                timing: Timing | None = None) -> dict[str, float]:
    """GFLOP/s of a float32 `size`³ matmul: from `timing` if given (e.g. measured interleaved
    with a model), else measured now."""
    flops = 2.0 * size ** 3
    if timing is None:
        work, flops = matmul_work(size)
        timing = time_calls(work, warmup=warmup, repeats=repeats)
    return {"matmul_size": size, "matmul_ms_median": timing.median_ms,
            "matmul_peak_gflops": flops / (timing.median_ms / 1000.0) / 1e9,
            "matmul_best_gflops": flops / (timing.min_ms / 1000.0) / 1e9}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


from jaxaccel.kernels.build import ISA_ORDER, VECTOR_FLAGS, host_isa, vector_features  # noqa: E402,F401 - defined once


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, memory, backend, versions."""
    import jax
    import jaxlib

    info: dict[str, Any] = {
        "cpu": _cpu_model(), "vector_features": vector_features(), "kernel_isa": host_isa(ISA_ORDER),
        "cores": os.cpu_count(), "load_average": load_average(),
        "python": platform.python_version(), "platform": platform.platform(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
    }
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    return info
