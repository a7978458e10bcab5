"""JAX's persistent compilation cache, and `jaxaccel bench compile`: cold vs warm compile time.

The cache itself is switched on by `jaxaccel.compilation_cache.enable_compilation_cache()`.

The benchmark starts `python -m jaxaccel.bench.compilation_cache` twice on one fresh dir:
the first process compiles cold and fills the cache, the second compiles warm from it.
Each measures its time to the first finished train step (trace + lower + compile + step):
`bench_compile` runs the two, `probe` is what each one measures (`main`: its entry point).

Imports `jaxaccel.compilation_cache` and bench's timing, training and workload; never the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Sequence

from jaxaccel.compilation_cache import DEFAULT_DIR, ENV, cache_dir, enable_compilation_cache  # noqa: F401


def _cache_files(directory: str) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def probe(model: str, batch_size: int, input_shape: Sequence[int], conv_impl: str) -> dict[str, Any]:
    """In this (fresh) process: enable the cache from the environment, time the first step."""
    import time

    t0 = time.perf_counter()
    directory = enable_compilation_cache()
    from jaxaccel.bench.training import make_step_bench

    bench = make_step_bench(model, batch_size, input_shape, conv_impl=conv_impl)
    init_s = time.perf_counter() - t0
    first_step_s = bench.first_step()
    steps = []
    for _ in range(3):
        t = time.perf_counter()
        bench.step()
        steps.append(time.perf_counter() - t)
    step_s = sorted(steps)[1]
    return {"cache_dir": directory, "first_step_s": first_step_s, "step_s": step_s,
            "compile_s": max(first_step_s - step_s, 0.0), "setup_s": init_s,
            "cache_files": _cache_files(directory) if directory else 0}


def _run_probe(directory: str, model: str, batch_size: int, input_shape: Sequence[int],
               conv_impl: str, timeout: float) -> dict[str, Any]:
    request = {"model": model, "batch_size": batch_size, "input_shape": list(input_shape),
               "conv_impl": conv_impl}
    cmd = [sys.executable, "-m", "jaxaccel.bench.compilation_cache", json.dumps(request)]
    env = {**os.environ, ENV: directory}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"compile probe failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def bench_compile(model: str = "cnn3", batch_size: int = 128, input_shape: Sequence[int] = (32, 32, 3), *,
                  conv_impl: str = "auto", timeout: float = 300.0) -> dict[str, Any]:
    """Cold (fresh cache dir) vs warm (same dir, second process) time to the first step."""
    from jaxaccel.bench import timing, workload

    input_shape = workload.parse_input_shape(input_shape)
    workload.check_model(model)
    workload.check_conv_impl(conv_impl)
    with tempfile.TemporaryDirectory(prefix="jaxaccel-xla-cache-") as directory:
        cold = _run_probe(directory, model, batch_size, input_shape, conv_impl, timeout)
        warm = _run_probe(directory, model, batch_size, input_shape, conv_impl, timeout)
    out: dict[str, Any] = {
        "bench": "compile", "model": model, "batch_size": batch_size, "input_shape": list(input_shape),
        "conv_impl": conv_impl, "cold_first_step_s": cold["first_step_s"],
        "warm_first_step_s": warm["first_step_s"], "cold_compile_s": cold["compile_s"],
        "warm_compile_s": warm["compile_s"], "cache_files": cold["cache_files"],
        "cold_vs_warm": timing.ratio(cold["compile_s"], warm["compile_s"]),
        "env": ENV, "default_dir": DEFAULT_DIR,
        "notes": [f"each figure is from a fresh process; cache enabled through ${ENV}"],
    }
    out["table"] = {
        "title": f"compile ({model}, batch {batch_size}, persistent cache via ${ENV})",
        "columns": ["cache", "first step s", "≈ compile s", "ratio"],
        "rows": [["cold (fresh dir)", f"{cold['first_step_s']:.2f}", f"{cold['compile_s']:.2f}",
                  f"{cold['cache_files']} cache files written"],
                 ["warm (2nd process, same dir)", f"{warm['first_step_s']:.2f}", f"{warm['compile_s']:.2f}",
                  "–" if out["cold_vs_warm"] is None else f"{out['cold_vs_warm']:.1f}× faster compile"]],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    """The probe's own process (`_run_probe`): one JSON request in argv, one JSON line out."""
    request = json.loads((sys.argv[1:] if argv is None else argv)[0])
    print(json.dumps(probe(request["model"], request["batch_size"],
                           tuple(request["input_shape"]), request["conv_impl"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
