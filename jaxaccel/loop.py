"""The one training loop, for one train state or K stacked ones, and what it reports.

`train_loop(runner, state, config, ...)` runs a stage's steps: it logs train metrics,
applies the non-finite policy, evaluates every `eval_every` steps, checkpoints, honours
preemption and times the steps, the same way whatever the runner is:
  * `Runner` — one state, compiled with `jit` (strategies data, fsdp) or `pmap`;
  * `jaxaccel.stacked.StackedRunner` — K states stacked on a leading axis and trained as one
    program (vectorized sweeps; ensembles).
A runner advances `block` steps per call and says how to read its metrics, evaluate its
states and checkpoint them; everything else lives here once. `Evaluator` evaluates the
validation (when held out) and test splits; `stage_row` and `results_record` build what
`results.json` holds, for the pipeline and for every point of a stacked run alike.

Imports state, data, parallel, metrics, preemption, io and compress (prune, quant, package);
never stacked, the pipeline, sweeps or the CLI.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaccel import data, io, metrics, parallel
from jaxaccel.compress import package, prune, quant, sharing
from jaxaccel.preemption import Preempted
from jaxaccel.state import Setup, TrainState, check_structure, make_eval_step, make_train_step


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------
class Evaluator:
    """Loss and accuracy on the validation split (when the run holds one out) and on the
    test split, of one state or of K stacked states.

    Selection (early stopping, best points, searches) reads "validation"; "test" is reported
    beside it and never selects anything.
    """

    def __init__(self, splits: data.Splits, spec: data.DatasetSpec, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1):
        self.sources = {"validation": splits.validation, "test": splits.test}
        if splits.validation is None:
            del self.sources["validation"]
        self.spec, self.batch_size = spec, batch_size
        self.process_index, self.process_count = process_index, process_count

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.sources)

    def batches(self, split: str):
        """Every example of `split` once, as padded eval batches (this process's rows)."""
        return data.eval_batches(self.sources[split], self.spec, batch_size=self.batch_size,
                                 process_index=self.process_index,
                                 process_count=self.process_count)

    def evaluate(self, run_eval: Callable, state: Any, points: int = 1) -> list[dict[str, dict]]:
        """Point i's `{split: {"loss", "accuracy", "count"}}` for each of `points` states;
        `run_eval(state, batch)` returns per-point sums of loss, correct and count."""
        out: list[dict[str, dict]] = [{} for _ in range(points)]
        for split in self.sources:
            totals = {k: np.zeros(points) for k in ("loss", "correct", "count")}
            for batch in self.batches(split):
                sums = jax.device_get(run_eval(state, batch))
                for k in totals:
                    totals[k] += np.asarray(sums[k], np.float64).reshape(points)
            n = np.maximum(totals["count"], 1.0)
            for i in range(points):
                out[i][split] = {"loss": float(totals["loss"][i] / n[i]),
                                 "accuracy": float(totals["correct"][i] / n[i]),
                                 "count": int(totals["count"][i])}
        return out

    def __call__(self, run_eval: Callable, state: Any) -> dict[str, dict]:
        """`{split: {"loss", "accuracy", "count"}}` of one state."""
        return self.evaluate(run_eval, state)[0]

    @staticmethod
    def row(result: dict[str, dict]) -> dict[str, float]:
        """`{split}_accuracy` and `{split}_loss` of every evaluated split (results rows)."""
        return {f"{split}_{k}": r[k] for split, r in result.items() for k in ("accuracy", "loss")}

    @staticmethod
    def write(writer: metrics.MetricWriter, step: int, result: dict[str, dict],
              stage_name: str) -> None:
        """One metrics row per split (`split` = "validation" / "test")."""
        for split, r in result.items():
            writer.write(step, {**r, "stage": stage_name}, prefix=split)


# ----------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------
class LoopRunner(Protocol):
    """What `train_loop` needs of a runner (`Runner`, `stacked.StackedRunner`)."""
    points: int                    # states trained together (1, or K stacked)
    block: int                     # steps per call of `run`
    steps_per_epoch: int
    compile_seconds: float | None  # known compile time (None: the first call compiles)
    sync_each_call: bool           # wait for each call (XLA:CPU collectives, see Runner)

    def run(self, state: Any, step: int, steps: int) -> tuple[Any, Any]: ...
    def host_metrics(self, fetched: Sequence[Any]) -> dict[str, np.ndarray]: ...
    def evaluate(self, state: Any, evaluator: Evaluator) -> list[dict[str, dict]]: ...
    def host_step(self, state: Any) -> int: ...
    def payload(self, state: Any) -> dict[str, Any]: ...
    def snapshot(self, state: Any) -> Any: ...


class Runner:
    """Compiled train/eval steps for one stage's model and optimizer on one mesh and strategy,
    fed by `batches` (`data.TrainBatches`).

    Hides the difference between `jit` (data, fsdp) and `pmap`: `run`, `evaluate`,
    `to_device`/`to_host` (host = an unreplicated state, what checkpoints hold).
    """

    points = 1
    block = 1
    compile_seconds = None

    def __init__(self, setup: Setup, mesh: jax.sharding.Mesh, strategy: str, batches: Any = None,
                 *, teacher: Any = None):
        spec, config = setup.spec, setup.config
        self.setup, self.mesh, self.strategy, self.batches = setup, mesh, strategy, batches
        self.steps_per_epoch = batches.steps_per_epoch if batches is not None else 1
        # XLA:CPU can deadlock in a collective's rendezvous when two multi-device steps are
        # in flight at once (seen with 8 simulated devices); wait for each step there.
        self.sync_each_call = jax.default_backend() == "cpu" and mesh.devices.size > 1
        pmap = strategy == "pmap"
        axis = parallel.AXIS if pmap else None
        step_fn = make_train_step(setup.model, setup.tx, setup.schedule,
                                  num_classes=spec.num_classes,
                                  label_smoothing=config.label_smoothing, axis_name=axis,
                                  skip_nonfinite=config.nonfinite == "skip",
                                  mask_update=setup.mask_update, qat_config=setup.qat_config,
                                  distill=setup.distill, ste=setup.ste)
        in_step_teacher = setup.distill is not None and setup.distill.teacher_apply is not None
        if in_step_teacher and teacher is None:
            raise ValueError("this stage distils from a teacher computed in the step: pass its "
                             "variables (teacher=...)")
        eval_fn = make_eval_step(setup.model, num_classes=spec.num_classes, axis_name=axis,
                                 qat_config=setup.qat_config, ste=setup.ste)
        self.abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
        if pmap:
            devices = list(mesh.devices.flat)
            split = lambda b: parallel.split_for_pmap(b, len(devices))  # noqa: E731
            p_step = jax.pmap(step_fn, axis_name=parallel.AXIS, donate_argnums=(0,),
                              devices=devices)
            p_eval = jax.pmap(eval_fn, axis_name=parallel.AXIS, devices=devices)
            self.shardings = None
            if in_step_teacher:  # the frozen teacher, a copy on every device
                teacher = parallel.replicate(teacher, devices)
                self.run_step = lambda s, b: p_step(s, split(b), teacher)
            else:
                self.run_step = lambda s, b: p_step(s, split(b))
            self.run_eval = lambda s, b: parallel.unreplicate(p_eval(s, split(b)))
            self.to_device = lambda s: parallel.replicate(s, devices)
            self.to_host = parallel.unreplicate
        else:
            sh = parallel.state_shardings(self.abstract, mesh, strategy)
            batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
            j_eval = jax.jit(eval_fn, in_shardings=(sh, batch_sh), out_shardings=rep)
            self.shardings = sh
            if in_step_teacher:  # the frozen teacher, placed as the strategy places params
                t_sh = parallel.state_shardings(teacher, mesh, strategy)
                teacher = jax.device_put(teacher, t_sh)
                j_step = jax.jit(step_fn, in_shardings=(sh, batch_sh, t_sh),
                                 out_shardings=(sh, rep), donate_argnums=(0,))
                self.run_step = lambda s, b: j_step(s, parallel.shard_batch(b, mesh), teacher)
            else:
                j_step = jax.jit(step_fn, in_shardings=(sh, batch_sh), out_shardings=(sh, rep),
                                 donate_argnums=(0,))
                self.run_step = lambda s, b: j_step(s, parallel.shard_batch(b, mesh))
            self.run_eval = lambda s, b: j_eval(s, parallel.shard_batch(b, mesh))
            self.to_device = lambda s: jax.device_put(s, sh)
            self.to_host = lambda s: s

    # -- the loop's interface -------------------------------------------------------------
    def run(self, state: TrainState, step: int, steps: int = 1) -> tuple[TrainState, dict]:
        """One step on the batch of global step `step`."""
        return self.run_step(state, self.batches.batch(step))

    def host_metrics(self, fetched: Sequence[dict]) -> dict[str, np.ndarray]:
        """Fetched step metrics as `{name: (steps, 1)}` (a pmap step's copies: the first)."""
        return {k: np.asarray([np.ravel(m[k])[0] for m in fetched])[:, None] for k in fetched[0]}

    def evaluate(self, state: TrainState, evaluator: Evaluator) -> list[dict[str, dict]]:
        return evaluator.evaluate(self.run_eval, state)

    def host_step(self, state: TrainState) -> int:
        return int(self.to_host(state).step)

    def payload(self, state: TrainState) -> dict[str, Any]:
        return {"state": self.to_host(state)}

    def snapshot(self, state: TrainState) -> Any:
        """A host copy of the params (steps donate the state's buffers)."""
        return jax.device_get(self.to_host(state).params)

    # -- states for this stage --------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        """A fresh state, placed for this strategy."""
        return self.to_device(jax.jit(self.setup.init_state)(rng))

    def start(self, carry: dict) -> TrainState:
        """A state for this stage from the previous stage's weights, masks and rng.

        The optimizer state is fresh (a stage may change the optimizer); masks (and the
        cluster assignments of shared weights) carry over.
        """
        qat = (quant.qat_init(self.setup.model, {"params": carry["params"],
                                                 "batch_stats": carry["batch_stats"]},
                              jnp.zeros(self.setup.input_shape, jnp.float32),
                              self.setup.qat_config)
               if self.setup.qat_config else {})
        opt_state = prune.set_masks(self.setup.tx.init(carry["params"]), carry["masks"])
        if sharing.has_assignments(opt_state):  # after a cluster stage: its assignments
            if carry.get("clusters") is None:
                raise ValueError("this stage fine-tunes shared weights, but no cluster "
                                 "assignments were carried to it")
            opt_state = sharing.set_assignments(opt_state, carry["clusters"])
        state = TrainState(step=jnp.zeros((), jnp.int32), params=carry["params"],
                           batch_stats=carry["batch_stats"], opt_state=opt_state,
                           rng=carry["rng"], qat=qat)
        check_structure(self.abstract, state)
        return self.to_device(state)

    def restore_target(self) -> Any:
        """Abstract state with this strategy's shardings, for orbax restores."""
        if self.shardings is None:
            return self.abstract
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract, self.shardings)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class StoppedEarly(Exception):
    """`on_evaluation` asked the loop to stop (e.g. a search's pruner): it saved a checkpoint
    at global step `step` and stopped training there."""

    def __init__(self, step: int):
        super().__init__(f"stopped early at step {step} (checkpoint saved)")
        self.step = step


# Called with (global step, `{split: {"loss", "accuracy", "count"}}`) after each evaluation
# inside a stage; returns True to stop training at that step.
EvaluationHook = Callable[[int, dict], bool]


def train_loop(runner: LoopRunner, state: Any, config: ml_collections.ConfigDict, *,
               num_steps: int, writers: Sequence[metrics.MetricWriter], checkpointer: Any,
               guard: Any, evaluator: Evaluator, step_offset: int = 0,
               meta: Callable[[], dict] = dict, extras: dict | None = None,
               snapshot_at: int | None = None, stage_name: str = "train",
               failed: dict[int, str] | None = None,
               on_failed: Callable[[int, str], None] = lambda i, message: None,
               show_progress: bool = True,
               on_evaluation: EvaluationHook | None = None
               ) -> tuple[Any, dict, dict, dict[int, str]]:
    """Run a stage's steps `runner.host_step(state) .. num_steps`; returns (state, stats,
    extras, failed).

    Global step = `step_offset` + stage step (data order, checkpoint ids, metrics rows).
    `writers[i]` receives point i's rows. A non-finite loss or gradient with
    `config.nonfinite="stop"` fails the point: one state raises `FloatingPointError`; among
    K stacked states that point is reported through `on_failed(i, message)` and `failed`
    (its rows stop, the others go on). Checkpoints hold `runner.payload(state)` plus
    `extras`, with `meta()` and the step in the record; with `snapshot_at`, the params after
    that global step are stored as `extras["snapshot"]` (for rewinding). `stats`:
    `train_images_per_sec` (median per point), `compile_seconds`, `nonfinite_steps` (per point).
    `on_evaluation` (one state only) sees every evaluation every `eval_every` steps (not the
    stage's final one); when it returns True the loop checkpoints that step and raises
    `StoppedEarly`.
    """
    points, block = runner.points, runner.block
    if on_evaluation is not None and points != 1:
        raise ValueError(f"on_evaluation needs a single-state run, not {points} stacked states")
    failed, extras = dict(failed or {}), dict(extras or {})
    start = runner.host_step(state)
    progress = metrics.Progress(step_offset + num_steps, step_offset + start,
                                enabled=show_progress, label=stage_name)
    window: list[Any] = []
    rates: list[float] = []
    timed = 0
    nonfinite = np.zeros(points, int)
    compile_seconds = runner.compile_seconds

    def save(done: int) -> None:
        step = step_offset + done
        checkpointer.save(step, {**runner.payload(state), **extras},
                          {**meta(), "stage_step": done, "step": step,
                           "epoch": step // runner.steps_per_epoch})

    if snapshot_at is not None and snapshot_at == step_offset + start:
        extras["snapshot"] = runner.snapshot(state)
    t0 = time.perf_counter()
    for first in range(start, num_steps, block):
        state, m = runner.run(state, step_offset + first, block)
        if runner.sync_each_call:
            jax.block_until_ready(m)
        window.append(m)
        done = first + block
        if compile_seconds is None:  # the first call of a process includes compilation
            jax.block_until_ready(m)
            compile_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        else:
            timed += block
        if snapshot_at is not None and snapshot_at == step_offset + done:
            extras["snapshot"] = runner.snapshot(state)
        side_work, stopping = False, guard.should_stop()
        evaluating = bool(config.eval_every) and done % config.eval_every == 0 and done != num_steps
        # Rows are also flushed before every checkpoint and on preemption, so the metrics
        # always cover the saved steps (and a non-finite step never gets checkpointed); with
        # `on_evaluation`, before every evaluation too (it may stop the run there).
        if (done % config.log_every == 0 or done == num_steps or stopping
                or done % config.checkpoint_every == 0
                or (evaluating and on_evaluation is not None)):
            host = runner.host_metrics(jax.device_get(window))
            elapsed = time.perf_counter() - t0
            rate = timed * config.batch_size / elapsed if timed else None
            first_step = step_offset + done - len(host["loss"])
            shown: dict[str, float] = {}
            for i in range(points):
                if i in failed:
                    continue
                bad = np.flatnonzero(host["nonfinite"][:, i])
                nonfinite[i] += len(bad)
                if len(bad) and config.nonfinite == "stop":
                    failed[i] = (f"non-finite loss or gradient at step {first_step + int(bad[0])}"
                                 f"; set nonfinite='skip' to skip such updates")
                    if points == 1:
                        raise FloatingPointError(failed[i])
                    on_failed(i, failed[i])
                    continue
                row = {k: float(np.mean(host[k][:, i])) for k in ("loss", "accuracy", "grad_norm")}
                row.update(lr=float(host["lr"][-1, i]), nonfinite_total=int(nonfinite[i]),
                           nonfinite=len(bad))  # per row: sums correctly across resumed runs
                if rate is not None:
                    row.update(images_per_sec=rate, step_ms=1000 * elapsed / timed)
                writers[i].write(step_offset + done, {**row, "stage": stage_name},
                                 prefix="train")
                shown = shown or row
            if rate is not None:
                rates.append(rate)
            if points > 1 and shown:
                shown = {"loss": float(np.mean(host["loss"][-1])),
                         "images_per_sec": rate * points if rate else None}
            progress.update(step_offset + done, {k: v for k, v in shown.items() if v is not None})
            window, timed, side_work = [], 0, True
        stop_early = False
        if evaluating:
            for i, result in enumerate(runner.evaluate(state, evaluator)):
                if i not in failed:
                    evaluator.write(writers[i], step_offset + done, result, stage_name)
                    if on_evaluation is not None:
                        stop_early = bool(on_evaluation(step_offset + done, result))
            side_work = True
        if done % config.checkpoint_every == 0 or done == num_steps:
            save(done)
            side_work = True
        if side_work:
            t0 = time.perf_counter()
        if stop_early:
            if checkpointer.latest_step() != step_offset + done:
                save(done)
            checkpointer.close()
            progress.close()
            raise StoppedEarly(step_offset + done)
        if stopping:
            if checkpointer.latest_step() != step_offset + done:
                save(done)
            checkpointer.close()
            progress.close()
            raise Preempted(step_offset + done, guard.signal_name)
    progress.close()
    if start == num_steps and checkpointer.latest_step() != step_offset + num_steps:
        save(num_steps)
    stats = {"train_images_per_sec": statistics.median(rates) if rates else None,
             "compile_seconds": compile_seconds, "nonfinite_steps": nonfinite.tolist()}
    return state, stats, extras, failed


# ----------------------------------------------------------------------------------------
# What results.json holds
# ----------------------------------------------------------------------------------------
def weight_stats(params: Any, masks: Any, bits: int = 32, *, batch_stats: Any = None,
                 per_channel: bool = True) -> dict[str, Any]:
    """Sparsity of the prunable kernels and the sizes of the weights, by their one definition.

    `packed_bytes`: what a compressed package of these weights stores before zlib
    (`compress.package.packed_bytes`: kernels' codes at `bits` + bit-masks + scales, the rest
    float32; also the compression report's total); `dense_float32_bytes`: every variable as
    float32. Counted on the devices (masks may span processes).
    """
    flat_m = dict(prune.named_leaves(masks))
    kernel_size = kernel_kept = 0
    for path, w in prune.named_leaves(params):
        if prune.is_kernel(path, w):
            kernel_size += int(np.size(w))
            kernel_kept += int(jnp.count_nonzero(flat_m[path]))
    variables = {"params": params, "batch_stats": batch_stats or {}}
    count = sum(int(np.size(x)) for x in jax.tree.leaves(variables))
    return {"sparsity": 1.0 - kernel_kept / max(kernel_size, 1), "bits": bits,
            "nonzero_weights": kernel_kept,
            "packed_bytes": package.packed_bytes(variables, masks, bits=bits,
                                                 per_channel=per_channel),
            "dense_float32_bytes": 4 * count}


def stage_row(stage: ml_collections.ConfigDict, result: dict[str, dict], weights: dict, *,
              quant_section: Any = None) -> dict[str, Any]:
    """A stage's row: name, kind, steps, `{split}_accuracy/_loss` of `result`, and the
    `weight_stats` of `weights` (params, batch_stats, masks) at the quantization it carries."""
    bits = quant_section.weight_bits if quant_section is not None else 32
    per_channel = quant_section.per_channel if quant_section is not None else True
    return {"name": stage.name, "kind": stage.kind, "steps": stage.steps,
            **Evaluator.row(result),
            **weight_stats(weights["params"], weights["masks"], bits,
                           batch_stats=weights["batch_stats"], per_channel=per_channel)}


def results_record(config: ml_collections.ConfigDict, rows: list[dict], *, steps: int,
                   stats: dict, sizes: dict[str, int], num_devices: int, num_processes: int,
                   num_params: int, **extra: Any) -> dict[str, Any]:
    """What `results.json` holds for a run (or one point of a stacked run), JSON-ready.

    The top level repeats the final row's numbers, which describe the model the run ends
    with (after a quantize stage: the deployed int8 / fake-quant model, with the float one
    beside it); `stages` holds every row.
    """
    final = rows[-1]
    reported = {k: v for k, v in final.items()
                if k == "deployed" or k.endswith(("_accuracy", "_loss"))}
    return io.to_jsonable({
        **reported, "steps": steps, "num_devices": num_devices, "num_processes": num_processes,
        "strategy": config.parallel.strategy, "model": config.model.name,
        "dataset": config.dataset.name, **sizes,
        "train_images_per_sec": stats.get("train_images_per_sec"),
        "compile_seconds": stats.get("compile_seconds"),
        "nonfinite_steps": stats.get("nonfinite_steps", 0), "num_params": num_params,
        "sparsity": final["sparsity"], "packed_bytes": final["packed_bytes"],
        **({"ensemble": final["ensemble"]} if "ensemble" in final else {}),
        "stages": rows, **extra})
