"""`jaxaccel bench train --distill / --ensemble K`: what teaching and ensembles cost.

- `bench_distill`: one train step of a student with no teacher, with the teacher's forward
  pass inside the step (the default), and with the teacher's logits precomputed
  (`distill.precompute`, the batch carries them), timed interleaved on the same batch. The
  steps are the project's own (`StepBench`, i.e. `loop.Runner.run_step`) built from the same
  `state.Distillation` the pipeline uses; the teacher has random weights (its values do not
  change the cost).
- `bench_ensemble`: wall time of `jaxaccel.train` with `ensemble.members = K` (one compiled
  program) against K separate runs of the same experiment with seeds seed..seed+K-1, one
  after another, each in a fresh temporary workdir: compiles, data, evaluation and
  checkpoints included, as a user waits for them.

Owns `bench_distill` and `bench_ensemble`. Imports bench's timing, training and workload,
and the pipeline only at run time; never the CLI.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

from jaxaccel.bench import timing, training, workload


def bench_distill(model: str = "cnn3", batch_size: int = 128,
                  input_shape: Sequence[int] = workload.DEFAULT_INPUT_SHAPE, *,
                  student_width: float = 0.25, teacher_model: str | None = None,
                  temperature: float = 4.0, alpha: float = 0.9, warmup: int = 3,
                  repeats: int = 20) -> dict[str, Any]:
    """Step time of a `student_width` student of `model` alone, taught by a full-width
    `teacher_model` in the step, and taught from precomputed logits (interleaved)."""
    import dataclasses

    import jax
    import numpy as np

    from jaxaccel import parallel
    from jaxaccel.state import Distillation

    timing.check_counts(warmup, repeats)
    input_shape = workload.parse_input_shape(input_shape)
    teacher_model = workload.check_model(teacher_model or model)
    if not student_width > 0:
        raise ValueError(f"student width {student_width} must be > 0")
    student_config = workload.bench_config(model, batch_size, input_shape)
    student_config.model.width = float(student_width)
    student = workload.bench_setup(student_config, input_shape)
    teacher = workload.bench_setup(workload.bench_config(teacher_model, batch_size, input_shape),
                                   input_shape)
    teacher_vars = jax.jit(teacher.init_state)(jax.random.PRNGKey(1))
    teacher_vars = {"params": teacher_vars.params, "batch_stats": teacher_vars.batch_stats}

    def teacher_apply(variables: Any, images: jax.Array) -> jax.Array:
        return teacher.model.apply(variables, images, train=False)

    batch = workload.synthetic_batch(batch_size, input_shape)
    logits = np.asarray(jax.jit(teacher_apply)(teacher_vars, batch["image"]))
    mesh = parallel.make_mesh(1)
    benches = {
        "no teacher": training.StepBench(student, mesh, "data", batch),
        "teacher in the step": training.StepBench(
            dataclasses.replace(student, distill=Distillation(temperature, alpha, teacher_apply)),
            mesh, "data", batch, teacher=teacher_vars),
        "precomputed logits": training.StepBench(
            dataclasses.replace(student, distill=Distillation(temperature, alpha)),
            mesh, "data", {**batch, "teacher_logits": logits}),
    }
    for bench in benches.values():
        bench.first_step()
    times = timing.time_interleaved({k: b.step for k, b in benches.items()},
                                    warmup=warmup, repeats=repeats)
    base = times["no teacher"].median_ms
    out: dict[str, Any] = {
        "bench": "distill", "model": model, "student_width": student_width,
        "teacher_model": teacher_model, "batch_size": batch_size,
        "input_shape": list(input_shape), "temperature": temperature, "alpha": alpha,
        "modes": {k: {**t.as_dict("step"), "vs_no_teacher": timing.ratio(t.median_ms, base),
                      "final_loss": benches[k].loss(),
                      "steps_run": int(benches[k].runner.host_step(benches[k].state))}
                  for k, t in times.items()},
        "notes": ["the project's train step (loop.Runner.run_step) on one device; the teacher's "
                  "forward pass runs inside the jitted step or its logits come with the batch"],
    }
    out["table"] = {
        "title": (f"distill (student {model} width {student_width:g}, teacher {teacher_model}, "
                  f"batch {batch_size}, {'×'.join(map(str, input_shape))})"),
        "columns": ["teacher", "step ms (median, IQR)", "cost vs no teacher"],
        "rows": [[k, f"{m['step_ms_median']:.2f} (± {m['step_ms_iqr']:.2f})",
                  f"{m['vs_no_teacher']:.2f}×"] for k, m in out["modes"].items()]}
    return out


def bench_ensemble(members: int = 4, *, experiment: str | None = None,
                   steps: int = 100) -> dict[str, Any]:
    """Wall time of one K-member ensemble run against K separate runs of its seeds."""
    from jaxaccel import config as config_lib
    from jaxaccel.bench import sweep as sweep_bench
    from jaxaccel.pipeline import train

    if members < 2:
        raise ValueError(f"ensemble members={members} must be >= 2 to compare")
    if steps < 1:
        raise ValueError(f"ensemble steps={steps} must be >= 1")
    experiment = experiment or sweep_bench.default_experiment()
    if not os.path.isfile(experiment):
        raise FileNotFoundError(f"experiment file {experiment!r} not found")
    overrides = [f"num_steps={steps}", f"log_every={steps}", f"checkpoint_every={steps}",
                 "progress=False", "ensemble.combine=average"]
    base = config_lib.load_experiment(experiment, overrides)

    def separate() -> list[float]:
        accs = []
        for k in range(members):
            config = config_lib.load_experiment(experiment, overrides + [f"seed={base.seed + k}"])
            with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-member-") as wd:
                accs.append(train(config, wd)["test_accuracy"])
        return accs

    def together() -> dict:
        config = config_lib.load_experiment(experiment, overrides + [f"ensemble.members={members}"])
        with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-ensemble-") as wd:
            return train(config, wd)

    results: dict[str, Any] = {}
    seconds = {"separate": timing.time_once(lambda: results.update(separate=separate())),
               "ensemble": timing.time_once(lambda: results.update(ensemble=together()))}
    member_accs = [m["test"]["accuracy"] for m in results["ensemble"]["ensemble"]["members"]]
    speedup = timing.ratio(seconds["separate"], seconds["ensemble"])
    name = os.path.basename(experiment)
    out = {"bench": "ensemble", "members": members, "experiment": name, "steps": steps,
           "separate_s": seconds["separate"], "ensemble_s": seconds["ensemble"],
           "ensemble_speedup": speedup,
           "separate_test_accuracy": results["separate"], "member_test_accuracy": member_accs,
           "notes": ["wall time of jaxaccel.train: K runs one after another vs one run with "
                     "ensemble.members=K (one compiled program), fresh workdirs, compiles, data, "
                     "evaluation and checkpoints included"]}
    out["table"] = {"title": f"ensemble ({members} members × {steps} steps of {name})",
                    "columns": ["mode", "wall s", "per member s", "speed-up"],
                    "rows": [[f"{members} separate runs", f"{seconds['separate']:.1f}",
                              f"{seconds['separate'] / members:.1f}", "1.00×"],
                             ["one ensemble run", f"{seconds['ensemble']:.1f}",
                              f"{seconds['ensemble'] / members:.1f}", f"{speedup:.2f}×"]]}
    return out
