"""The `jaxaccel bench` subcommand: run one benchmark (or `all`), print tables, write JSON.

Imports the bench package, parallel and io; never another subcommand's module.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any, Callable

from jaxaccel import io

SUITES = ("train", "scaling", "input", "infer", "sweep", "compile", "distill", "ensemble", "all")
ALL_ORDER = ("train", "distill", "ensemble", "scaling", "input", "infer", "sweep", "compile")

# Defaults that depend on the benchmark: (train, scaling, input, infer).
_BATCH = {"infer": 256}
_REPEATS = {"train": 15, "distill": 15, "scaling": 6, "input": 20, "infer": 15}
_WARMUP = {"train": 2, "distill": 2, "scaling": 1, "input": 2, "infer": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Timed outside the test suite with warm-up, repeats and medians; comparisons are "
                "interleaved and reported as ratios. Example: jaxaccel bench train --model cnn3 "
                "--batch-size 128 --input-shape 32,32,3 --json out.json")
    p.add_argument("suite", choices=SUITES, help="which benchmark (all = the whole suite)")
    p.add_argument("--model", default="cnn3", help="registered model name (default cnn3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (default 128; infer: 256)")
    p.add_argument("--input-shape", default="32,32,3", help="H,W,C of the images (default 32,32,3)")
    p.add_argument("--conv-impl", default="auto", help="models' conv_impl to time (default auto)")
    p.add_argument("--baseline-conv-impl", default="xla",
                   help="train: conv_impl to compare against (default xla)")
    p.add_argument("--strategy", default="data", help="train: data | fsdp | pmap (default data)")
    p.add_argument("--devices", type=int, default=1, help="train: devices in the mesh (default 1)")
    p.add_argument("--device-counts", default="1,2,4,8", help="scaling: device counts (default 1,2,4,8)")
    p.add_argument("--strategies", default="data,fsdp,pmap", help="scaling: strategies")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate N CPU devices (default: scaling simulates max(--device-counts); "
                        "all runs scaling in a child process that does)")
    p.add_argument("--dataset", default="mnist5k", help="input: a prepared dataset (default mnist5k)")
    p.add_argument("--data-dir", default=None, help="input: TFDS data dir")
    p.add_argument("--sparsities", default="0.25,0.5,0.75", help="infer: channel sparsities")
    p.add_argument("--int8-skip", default="none",
                   help="infer: layers kept float in int8/fake-quant: none | first | a,b (default none)")
    p.add_argument("--sweep-points", type=int, default=4, help="sweep: K points (default 4)")
    p.add_argument("--sweep-steps", type=int, default=50, help="sweep: steps per point (default 50)")
    p.add_argument("--sweep-config", default=None,
                   help="sweep: experiment file (default experiments/digits_lenet5.py; with "
                        "--search: experiments/search_lenet300_grid.py, an all-choice "
                        "get_search())")
    p.add_argument("--search", action="store_true",
                   help="sweep: TPE + ASHA (`jaxaccel sweep --search tpe --pruner asha`) with a "
                        "trial budget vs the full grid of the same space: best validation "
                        "accuracy and steps spent, median over --search-seeds study seeds")
    p.add_argument("--search-vectorize", action="store_true",
                   help="sweep --search: instead, a random search of --search-trials (default "
                        "4 here) lr/weight-decay suggestions trained one by one vs as one "
                        "program (--vectorize), --search-steps (default 300) each")
    p.add_argument("--search-trials", type=int, default=None,
                   help="sweep --search: trials per TPE study (default 15)")
    p.add_argument("--search-seeds", type=int, default=3,
                   help="sweep --search: study seeds (default 3)")
    p.add_argument("--search-steps", type=int, default=None,
                   help="sweep --search: steps per trial (default: the experiment's; "
                        "evaluated every steps // 8)")
    p.add_argument("--search-workdir", default=None,
                   help="sweep --search: keep the studies' workdirs here (default: a "
                        "temporary directory, removed after)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (medians are reported)")
    p.add_argument("--matmul-size", type=int, default=2048, help="train: n of the n³ matmul peak")
    p.add_argument("--compare-onnxruntime", action="store_true",
                   help="infer: also time the same model exported to ONNX (float and int8 QDQ) "
                        "in ONNX Runtime sessions (threads = cores), interleaved")
    p.add_argument("--compare-torch", action="store_true",
                   help="train: time the same cnn3 step in PyTorch eager (pip install '.[bench]')")
    p.add_argument("--distill", action="store_true",
                   help="train: also time a distillation step (teacher in the step, precomputed "
                        "logits, no teacher); the `distill` benchmark")
    p.add_argument("--student-width", type=float, default=0.25,
                   help="distill: the student's model.width; the teacher is the full --model "
                        "(default 0.25)")
    p.add_argument("--ensemble", type=int, default=0, metavar="K",
                   help="train: also time one K-member ensemble run vs K separate runs end to "
                        "end; the `ensemble` benchmark (default K: 4)")
    p.add_argument("--ensemble-steps", type=int, default=50,
                   help="ensemble: steps per run (default 50; experiment: --sweep-config)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write the tables as markdown")


def command_line(args: argparse.Namespace) -> str:
    """The `jaxaccel bench ...` command that reproduces `args` (non-default options only)."""
    defaults = vars(_defaults())
    words = ["jaxaccel", "bench", args.suite]
    for key, value in vars(args).items():
        if key in ("suite", "command") or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _defaults() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["all"])


def _configure_devices(args: argparse.Namespace, needed: int) -> None:
    """Simulate enough CPU devices before JAX's backend starts (explicit --cpu-devices wins).

    Without --cpu-devices the count is only raised when nothing (XLA_FLAGS, jax config,
    a started backend) has decided it already; benchmarks skip device counts that don't exist.
    """
    import jax

    from jaxaccel import parallel

    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise ValueError(f"--cpu-devices {args.cpu_devices} must be >= 1")
        parallel.set_cpu_devices(args.cpu_devices)
        return
    if needed <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if jax.config.jax_num_cpu_devices == -1:
        try:
            jax.config.update("jax_num_cpu_devices", needed)
        except RuntimeError:  # the backend already started: use the devices it has
            pass


def _validate(args: argparse.Namespace) -> None:
    """Bad input fails fast with one ValueError line, before any compilation."""
    from jaxaccel.bench import workload

    workload.check_model(args.model)
    workload.parse_input_shape(args.input_shape)
    workload.check_conv_impl(args.conv_impl)
    workload.check_conv_impl(args.baseline_conv_impl)
    workload.parse_int_list(args.device_counts, "--device-counts")
    workload.parse_fractions(args.sparsities, "--sparsities")
    from jaxaccel import parallel

    for s in [args.strategy] + args.strategies.split(","):
        if s not in parallel.STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; valid strategies: {', '.join(parallel.STRATEGIES)}")
    if not args.student_width > 0:
        raise ValueError(f"--student-width {args.student_width} must be > 0")
    if args.ensemble and args.ensemble < 2:
        raise ValueError(f"--ensemble {args.ensemble} must be >= 2 (members to compare)")
    if args.search_vectorize and not args.search:
        raise ValueError("--search-vectorize belongs to `jaxaccel bench sweep --search`")
    if args.search and args.suite != "sweep":
        raise ValueError(f"--search belongs to `jaxaccel bench sweep`, not {args.suite}")
    for name in ("batch_size", "warmup", "repeats", "devices", "matmul_size", "sweep_points",
                 "sweep_steps", "ensemble_steps", "search_trials", "search_seeds",
                 "search_steps"):
        value = getattr(args, name)
        minimum = 0 if name == "warmup" else 1
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= {minimum}")


def _runner(name: str, args: argparse.Namespace) -> Callable[[], dict[str, Any]]:
    """A zero-argument function running benchmark `name` with `args`."""
    from jaxaccel.bench import workload

    shape = workload.parse_input_shape(args.input_shape)
    batch = args.batch_size or _BATCH.get(name, 128)
    warmup = _WARMUP.get(name, 2) if args.warmup is None else args.warmup
    repeats = _REPEATS.get(name, 10) if args.repeats is None else args.repeats
    if name == "train":
        from jaxaccel.bench.training import bench_train
        return lambda: bench_train(args.model, batch, shape, conv_impl=args.conv_impl,
                                   baseline_conv_impl=args.baseline_conv_impl, strategy=args.strategy,
                                   num_devices=args.devices, warmup=warmup, repeats=repeats,
                                   matmul_size=args.matmul_size, compare_torch=args.compare_torch)
    if name == "scaling" and args.suite == "all" and _needs_own_process(args):
        return lambda: _scaling_subprocess(args)
    if name == "scaling":
        from jaxaccel.bench.scaling import bench_scaling
        return lambda: bench_scaling(args.model, batch, shape,
                                     device_counts=workload.parse_int_list(args.device_counts, "--device-counts"),
                                     strategies=tuple(args.strategies.split(",")), conv_impl=args.conv_impl,
                                     warmup=warmup, repeats=repeats)
    if name == "input":
        from jaxaccel.bench.input_pipeline import bench_input
        return lambda: bench_input(args.dataset, batch, model=args.model, data_dir=args.data_dir,
                                   conv_impl=args.conv_impl, warmup=warmup, repeats=repeats)
    if name == "infer":
        from jaxaccel.bench.inference import bench_infer
        return lambda: bench_infer(args.model, batch, shape, sparsities=args.sparsities,
                                   int8_skip=args.int8_skip, conv_impl=args.conv_impl,
                                   warmup=warmup, repeats=repeats,
                                   compare_onnxruntime=args.compare_onnxruntime)
    if name == "sweep" and args.search and args.search_vectorize:
        from jaxaccel.bench.sweep import bench_vectorized_search
        return lambda: bench_vectorized_search(experiment=args.sweep_config,
                                               trials=args.search_trials or 4,
                                               steps=args.search_steps or 300)
    if name == "sweep" and args.search:
        from jaxaccel.bench.sweep import bench_search
        return lambda: bench_search(experiment=args.sweep_config, trials=args.search_trials or 15,
                                    seeds=args.search_seeds, steps=args.search_steps,
                                    workdir=args.search_workdir)
    if name == "sweep":
        from jaxaccel.bench.sweep import bench_sweep
        return lambda: bench_sweep(args.sweep_points, experiment=args.sweep_config,
                                   steps=args.sweep_steps)
    if name == "distill":
        from jaxaccel.bench.teaching import bench_distill
        return lambda: bench_distill(args.model, batch, shape, student_width=args.student_width,
                                     warmup=warmup, repeats=repeats)
    if name == "ensemble":
        from jaxaccel.bench.teaching import bench_ensemble
        return lambda: bench_ensemble(args.ensemble or 4, experiment=args.sweep_config,
                                      steps=args.ensemble_steps)
    if name == "compile":
        from jaxaccel.bench.compilation_cache import bench_compile
        return lambda: bench_compile(args.model, batch, shape, conv_impl=args.conv_impl)
    raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(SUITES)}")


def suite_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The benchmarks one suite runs: itself, and for `train` the distillation step
    (--distill) and the ensemble comparison (--ensemble K) beside it."""
    if args.suite != "train":
        return (args.suite,)
    return ("train",) + (("distill",) if args.distill else ()) + \
        (("ensemble",) if args.ensemble else ())


def _needs_own_process(args: argparse.Namespace) -> bool:
    """In `all` on a CPU host with too few devices, scaling runs in a child process that
    simulates them, so the other benchmarks keep the default one-device set-up."""
    import jax

    from jaxaccel.bench import workload

    needed = max(workload.parse_int_list(args.device_counts, "--device-counts"))
    return jax.default_backend() == "cpu" and jax.device_count() < needed


def _scaling_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    import json
    import subprocess
    import tempfile

    from jaxaccel.bench import workload

    needed = max(workload.parse_int_list(args.device_counts, "--device-counts"))
    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-scaling-") as tmp:
        path = os.path.join(tmp, "scaling.json")
        argv = [sys.executable, "-m", "jaxaccel", "bench", "scaling", "--model", args.model,
                "--input-shape", args.input_shape, "--device-counts", args.device_counts,
                "--strategies", args.strategies, "--conv-impl", args.conv_impl,
                "--cpu-devices", str(needed), "--json", path]
        for flag, value in (("--batch-size", args.batch_size), ("--warmup", args.warmup),
                            ("--repeats", args.repeats)):
            if value is not None:
                argv += [flag, str(value)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(path):
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"scaling subprocess failed (exit {proc.returncode}): {tail}")
        with open(path) as f:
            result = json.load(f)
    result.pop("machine", None)
    result["subprocess_command"] = result.pop("command", None)
    result.setdefault("notes", []).append(f"run in a child process with {needed} simulated CPU devices")
    return result


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the chosen benchmark(s); print markdown; write --json / --markdown; exit status."""
    if overrides:
        raise ValueError(f"jaxaccel bench takes no --config.* overrides, got {overrides[0]!r}")
    _validate(args)
    from jaxaccel.bench import workload

    needed = max(workload.parse_int_list(args.device_counts, "--device-counts"))
    _configure_devices(args, needed if args.suite == "scaling" else args.devices)

    from jaxaccel.bench import tables, timing

    command = command_line(args)
    machine = timing.machine_info()
    print(tables.markdown_header(machine, command), flush=True)
    names = ALL_ORDER if args.suite == "all" else suite_names(args)
    runners = {name: _runner(name, args) for name in names}
    results: dict[str, dict[str, Any]] = {}
    failed = []
    t0 = time.perf_counter()
    for name, run in runners.items():
        start = time.perf_counter()
        if args.suite == "all":  # one failing benchmark must not lose the others' numbers
            try:
                result = run()
            except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
                failed.append(name)
                message = " ".join(str(e).split()) or type(e).__name__
                result = {"bench": name, "error": f"{type(e).__name__}: {message}", "notes": [],
                          "table": {"title": name, "columns": ["status"], "rows": [[f"failed: {message}"]]}}
        else:
            result = run()
        result["elapsed_s"] = time.perf_counter() - start
        results[name] = result
        print("\n" + tables.markdown_result(result), flush=True)
    elapsed = time.perf_counter() - t0
    machine["load_average_end"] = timing.load_average()
    if args.suite == "all":
        payload: dict[str, Any] = {"bench": "all", "command": command, "machine": machine,
                                   "elapsed_s": elapsed, "failed": failed, "results": results}
    elif len(names) > 1:  # train with --distill / --ensemble: the extra results beside
        payload = {**results[args.suite], "command": command, "machine": machine,
                   "with": {name: results[name] for name in names[1:]}}
    else:
        payload = {**results[args.suite], "command": command, "machine": machine}
    print(f"\n(total {elapsed:.0f} s; load average at the end: {machine['load_average_end']})")
    if args.json:
        io.write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.markdown:
        io.write_text(args.markdown, tables.markdown_report(results.values(), machine, command))
        print(f"wrote {args.markdown}")
    if failed:
        print(f"jaxaccel: bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
