"""`jaxaccel bench scaling`: step time over 1, 2, 4, 8 devices at the same global batch.

Every strategy (`data`, `fsdp`, `pmap`) runs the project's train step on meshes over the
first n devices (`jaxaccel.parallel.make_mesh(n)`) in this one process. On one CPU host the
devices are simulated and share the cores, so the ratio to the 1-device step time measures
sharding overhead (goal: `data` on 8 devices ≤ 1.15× its 1-device time); on a GPU/TPU host
it measures scaling efficiency. The device counts of a strategy are timed interleaved.

Owns `bench_scaling`. Imports parallel and bench's timing, training and workload; never the
CLI.
"""
from __future__ import annotations

from typing import Any, Sequence

from jaxaccel.bench import timing, workload
from jaxaccel.bench.training import make_step_bench

DEFAULT_DEVICE_COUNTS = (1, 2, 4, 8)
GOAL_DATA_8 = 1.15


def bench_scaling(model: str = "cnn3", batch_size: int = 128,
                  input_shape: Sequence[int] = workload.DEFAULT_INPUT_SHAPE, *,
                  device_counts: Sequence[int] = DEFAULT_DEVICE_COUNTS,
                  strategies: Sequence[str] = ("data", "fsdp", "pmap"), conv_impl: str = "auto",
                  warmup: int = 2, repeats: int = 10) -> dict[str, Any]:
    """Per strategy and device count: median step time, images/s, × the 1-device time."""
    import jax

    from jaxaccel import parallel

    timing.check_counts(warmup, repeats)
    input_shape = workload.parse_input_shape(input_shape)
    workload.check_model(model)
    device_counts = workload.parse_int_list(device_counts, "device counts")
    for s in strategies:
        if s not in parallel.STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; valid strategies: {', '.join(parallel.STRATEGIES)}")
    available = jax.device_count()
    counts = sorted({n for n in device_counts if n <= available})
    bad = [n for n in counts if batch_size % n]
    if bad:
        raise ValueError(f"batch size {batch_size} is not divisible by device count(s) {bad}")
    notes = []
    if len(counts) < len(set(device_counts)):
        missing = sorted(set(device_counts) - set(counts))
        notes.append(f"skipped device counts {missing}: only {available} devices "
                     f"(on a CPU host use --cpu-devices 8)")
    if not counts:
        raise ValueError(f"no device count in {list(device_counts)} fits the {available} devices")
    if jax.default_backend() == "cpu":
        notes.append("CPU host: the devices are simulated on the same cores, so this measures "
                     "sharding overhead, not scaling")

    results = []
    for strategy in strategies:
        benches = {n: make_step_bench(model, batch_size, input_shape, conv_impl=conv_impl,
                                      strategy=strategy, num_devices=n) for n in counts}
        compile_s = {n: b.first_step() for n, b in benches.items()}
        timings = timing.time_interleaved({str(n): b.step for n, b in benches.items()},
                                          warmup=warmup, repeats=repeats)
        base = timings[str(counts[0])].median_ms
        for n in counts:
            t = timings[str(n)]
            results.append({"strategy": strategy, "devices": n, **t.as_dict("step"),
                            "images_per_sec": batch_size / (t.median_ms / 1000.0),
                            "first_step_s": compile_s[n],
                            "vs_1_device": timing.ratio(t.median_ms, base) if counts[0] == 1 else None})
        del benches
    out: dict[str, Any] = {"bench": "scaling", "model": model, "batch_size": batch_size,
                           "input_shape": list(input_shape), "conv_impl": conv_impl,
                           "backend": jax.default_backend(), "device_counts": counts,
                           "strategies": list(strategies), "warmup": warmup, "repeats": repeats,
                           "results": results}
    data8 = next((r for r in results if r["strategy"] == "data" and r["devices"] == 8), None)
    if data8 is not None and data8["vs_1_device"] is not None:
        out["data_8_vs_1"] = data8["vs_1_device"]
        out["data_8_goal_met"] = data8["vs_1_device"] <= GOAL_DATA_8
    out["notes"] = notes
    out["table"] = _table(out)
    return out


def _table(r: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for x in r["results"]:
        rel = "–" if x["vs_1_device"] is None else f"{x['vs_1_device']:.2f}×"
        rows.append([x["strategy"], str(x["devices"]), f"{x['step_ms_median']:.1f} (± {x['step_ms_iqr']:.1f})",
                     f"{x['images_per_sec']:.0f}", rel, f"{x['first_step_s']:.1f}"])
    return {"title": f"scaling ({r['model']}, global batch {r['batch_size']}, {r['backend']})",
            "columns": ["strategy", "devices", "step ms (median ± IQR)", "img/s", "× 1-device time",
                        "first step s"],
            "rows": rows}
