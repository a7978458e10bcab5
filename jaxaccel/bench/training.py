"""`jaxaccel bench train`: training-step throughput of the project's own train step.

The timed function is `jaxaccel.loop.Runner(...).run_step`, the call `loop.train_loop` makes
every step, fed a host batch as `TrainBatches` yields it. Reported alongside: time to the
first step (compilation), XLA's `cost_analysis()` FLOPs per step, model FLOPs utilisation
against a float32 matmul measured in the same run, the selected `conv_impl` against "xla",
and optionally the same cnn3 step in PyTorch eager.

Owns `bench_train`, `StepBench` / `make_step_bench` (the step the other benchmarks time too)
and `step_flops`. Imports loop (`Runner`), state (`make_train_step`), parallel and bench's
timing, workload and torch_cnn3; never the pipeline, sweeps or the CLI.
"""
from __future__ import annotations

from typing import Any, Sequence

from jaxaccel.bench import timing, torch_cnn3, workload


class StepBench:
    """One model + optimizer on one mesh and strategy, stepping a fixed batch (`teacher`: the
    frozen variables of a teacher that the setup's step computes, placed as the pipeline
    places them).

    `first_step()` (compiles) must be called once before `step()`; `step()` runs one train
    step and blocks on its outputs (on XLA:CPU two multi-device steps in flight can deadlock
    in a collective rendezvous, and a blocked step is one finished unit of work anyway).
    """

    def __init__(self, setup: Any, mesh: Any, strategy: str, batch: dict, *, seed: int = 0,
                 teacher: Any = None):
        from jaxaccel.loop import Runner

        self.setup, self.strategy, self.batch = setup, strategy, batch
        self.num_devices = int(mesh.devices.size)
        self.runner = Runner(setup, mesh, strategy, teacher=teacher)
        self.state = self.runner.to_device(_initial_state(setup, seed))
        self.metrics: Any = None

    def step(self) -> None:
        import jax

        self.state, self.metrics = self.runner.run_step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))

    def first_step(self) -> float:
        """Seconds of the first step: tracing, lowering, compiling and one step."""
        return timing.time_once(self.step)

    def loss(self) -> float:
        import numpy as np

        return float(np.mean(self.metrics["loss"]))


def _initial_state(setup: Any, seed: int) -> Any:
    """`setup.init_state(PRNGKey(seed))` on one device, compiled without XLA optimisations on CPU.

    Initialisation is not what is timed, and compiling its many random samplers at the
    default optimisation level takes seconds (the same reason `models.init_variables` does
    this); `Runner.to_device` then places the state as the strategy wants it.
    """
    import jax

    rng = jax.random.PRNGKey(seed)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(setup.init_state).lower(rng).compile(options)(rng)


def step_flops(setup: Any, batch_size: int, conv_impl: str | None = None) -> float | None:
    """XLA's `cost_analysis()` FLOPs of one (single-device) train step, or None if unknown.

    Lowers the step `make_train_step` builds for `setup` on abstract inputs; lowering is
    cheap (no compilation) and the count is for the whole global batch. `conv_impl` (e.g.
    "xla": the model's own FLOPs, what MFU counts) replaces the model's; Winograd convs
    execute fewer FLOPs than the model has.
    """
    import jax
    import jax.numpy as jnp

    from jaxaccel.state import make_train_step

    kwargs: dict[str, Any] = {"num_classes": setup.spec.num_classes,
                              "label_smoothing": setup.config.label_smoothing}
    for extra in ("mask_update", "qat_config", "ste"):  # fields newer Setups carry
        if getattr(setup, extra, None) is not None:
            kwargs[extra] = getattr(setup, extra)
    model = setup.model
    if conv_impl is not None and hasattr(model, "conv_impl"):
        model = model.clone(conv_impl=conv_impl)
    step_fn = make_train_step(model, setup.tx, setup.schedule, **kwargs)
    state = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *setup.input_shape[1:]), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    analysis = jax.jit(step_fn).lower(state, batch).cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def has_convs(setup: Any) -> bool:
    """Whether the model has any conv kernel (a 4-D `kernel` leaf), i.e. `conv_impl` matters."""
    import jax

    state = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    return any(getattr(path[-1], "key", None) == "kernel" and len(leaf.shape) == 4 for path, leaf in leaves)


def make_step_bench(model: str, batch_size: int, input_shape: Sequence[int], *,
                    conv_impl: str = "auto", strategy: str = "data", num_devices: int = 1,
                    seed: int = 0) -> StepBench:
    """A `StepBench` for `model` on a mesh over the first `num_devices` devices."""
    import jax

    from jaxaccel import parallel

    if num_devices > jax.device_count():
        raise ValueError(f"devices={num_devices} but only {jax.device_count()} devices exist "
                         f"(use --cpu-devices N on a CPU host)")
    if batch_size % num_devices:
        raise ValueError(f"batch size {batch_size} is not divisible by {num_devices} devices")
    config = workload.bench_config(model, batch_size, input_shape, conv_impl=conv_impl,
                                   strategy=strategy)
    setup = workload.bench_setup(config, input_shape)
    batch = workload.synthetic_batch(batch_size, input_shape, seed=seed)
    return StepBench(setup, parallel.make_mesh(num_devices), strategy, batch, seed=seed)


def bench_train(model: str = "cnn3", batch_size: int = 128,
                input_shape: Sequence[int] = workload.DEFAULT_INPUT_SHAPE, *,
                conv_impl: str = "auto", baseline_conv_impl: str = "xla", strategy: str = "data",
                num_devices: int = 1, warmup: int = 3, repeats: int = 20,
                matmul_size: int = 2048, compare_torch: bool = False) -> dict[str, Any]:
    """Train-step time and throughput, compile time, FLOPs, MFU, conv_impl and torch ratios."""
    timing.check_counts(warmup, repeats)
    input_shape = workload.parse_input_shape(input_shape)
    workload.check_model(model)
    workload.check_conv_impl(conv_impl)
    workload.check_conv_impl(baseline_conv_impl)
    from jaxaccel import autotune

    choice = autotune.choose(workload.bench_config(model, batch_size, input_shape,
                                                   conv_impl=conv_impl, strategy=strategy),
                             mode="train", batch=batch_size, image_shape=input_shape)
    impl = choice.impl
    base_impl = workload.resolved_conv_impl(baseline_conv_impl, model)
    notes: list[str] = [f"conv_impl {conv_impl!r} -> {impl!r}: {choice.reason}"]

    main = make_step_bench(model, batch_size, input_shape, conv_impl=impl, strategy=strategy,
                           num_devices=num_devices)
    first_step_s = main.first_step()
    first_loss = main.loss()
    works = {"jax": main.step}
    baseline = None
    if not has_convs(main.setup):
        notes.append(f"{model} has no convolutions: no conv_impl comparison")
    elif base_impl != impl:
        baseline = make_step_bench(model, batch_size, input_shape, conv_impl=baseline_conv_impl,
                                   strategy=strategy, num_devices=num_devices)
        baseline.first_step()
        works["baseline"] = baseline.step
    else:
        notes.append(f"conv_impl {conv_impl!r} resolves to {impl!r} on this backend, the same as "
                     f"the baseline {baseline_conv_impl!r}: no conv_impl comparison")

    torch_step = None
    torch_status = "not requested (--compare-torch)"
    if compare_torch:
        torch_step, torch_status = torch_cnn3.try_make_step(model, batch_size, input_shape)
        if torch_step is not None:
            works["torch"] = torch_step
        else:
            notes.append(f"PyTorch comparison skipped: {torch_status}")

    works["matmul"], _ = timing.matmul_work(matmul_size)  # the peak, at the same moments
    works["matmul"]()  # compiles
    timings = timing.time_interleaved(works, warmup=warmup, repeats=repeats)
    step = timings["jax"]
    step_s = step.median_ms / 1000.0
    flops = step_flops(main.setup, batch_size, conv_impl="xla")  # model FLOPs
    executed_flops = step_flops(main.setup, batch_size)
    peak = timing.matmul_peak(matmul_size, timing=timings["matmul"])
    achieved = flops / step_s / 1e9 if flops else None

    out: dict[str, Any] = {
        "bench": "train", "model": model, "batch_size": batch_size, "input_shape": list(input_shape),
        "strategy": strategy, "devices": num_devices, "conv_impl": conv_impl,
        "conv_impl_resolved": impl, "conv_impl_choice": choice.record(), "warmup": warmup,
        **step.as_dict("step"),
        "train_images_per_sec": batch_size / step_s,
        "first_step_s": first_step_s,
        "compile_s": max(first_step_s - step_s, 0.0),
        "flops_per_step": flops, "executed_flops_per_step": executed_flops,
        "achieved_gflops": achieved, **peak,
        "mfu": timing.ratio(achieved, peak["matmul_peak_gflops"]),
        "first_loss": first_loss, "final_loss": main.loss(),
        "steps_run": main.runner.host_step(main.state),
    }
    if baseline is not None:
        out.update({"baseline_conv_impl": baseline_conv_impl, "baseline_conv_impl_resolved": base_impl,
                    **timings["baseline"].as_dict("baseline_step"),
                    "conv_impl_speedup": timing.ratio(timings["baseline"].median_ms, step.median_ms)})
    out["torch_status"] = torch_status if torch_step is None else "measured"
    if torch_step is not None:
        t = timings["torch"]
        out.update({**t.as_dict("torch_step"), "torch_version": torch_cnn3.torch_version(),
                    "torch_threads": torch_cnn3.torch_threads(),
                    "torch_images_per_sec": batch_size / (t.median_ms / 1000.0),
                    "jax_vs_torch_speed": timing.ratio(t.median_ms, step.median_ms)})
    out["notes"] = notes
    out["table"] = _table(out)
    return out


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def _table(r: dict[str, Any]) -> dict[str, Any]:
    shape = "×".join(str(v) for v in r["input_shape"])
    rows = [
        ["train step (median, IQR)", f"{r['step_ms_median']:.1f} ms (± {r['step_ms_iqr']:.1f})",
         f"{r['model']}, batch {r['batch_size']}, {shape}, {r['strategy']} × {r['devices']}, "
         f"conv_impl {r['conv_impl']}→{r['conv_impl_resolved']}"],
        ["throughput", f"{r['train_images_per_sec']:.0f} img/s", ""],
        ["first step (compile + 1 step)", f"{r['first_step_s']:.2f} s",
         f"compile ≈ {r['compile_s']:.2f} s = {r['compile_s'] / (r['step_ms_median'] / 1000):.0f} steps"],
        ["model FLOPs / step (XLA cost_analysis, plain-Flax step)",
         _fmt(r["flops_per_step"] and r["flops_per_step"] / 1e9, ".2f") + " GFLOP",
         f"achieved {_fmt(r['achieved_gflops'])} GFLOP/s; this step executes "
         f"{_fmt(r['executed_flops_per_step'] and r['executed_flops_per_step'] / 1e9, '.2f')} GFLOP"],
        [f"float32 matmul {r['matmul_size']}³ (peak)", f"{r['matmul_peak_gflops']:.0f} GFLOP/s", "same run, interleaved"],
        ["model FLOPs utilisation", _fmt(r["mfu"] and 100 * r["mfu"]) + " %", "achieved / matmul peak"],
    ]
    if "conv_impl_speedup" in r:
        rows.append([f"conv_impl {r['conv_impl']} vs {r['baseline_conv_impl']}",
                     f"{r['conv_impl_speedup']:.2f}× faster",
                     f"{r['baseline_conv_impl']}: {r['baseline_step_ms_median']:.1f} ms/step (interleaved)"])
    if "jax_vs_torch_speed" in r:
        rows.append([f"vs PyTorch {r['torch_version']} eager (channels-last, {r['torch_threads']} threads)",
                     f"{r['jax_vs_torch_speed']:.2f}× the speed",
                     f"torch: {r['torch_step_ms_median']:.1f} ms/step, {r['torch_images_per_sec']:.0f} img/s "
                     f"(interleaved; >1 = JAX faster)"])
    return {"title": "train", "columns": ["measure", "value", "ratio / context"], "rows": rows}
