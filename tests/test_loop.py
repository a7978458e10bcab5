"""jaxaccel.loop: the one training loop, evaluation and what results.json holds.

`train_loop` is driven here by a tiny fake runner honouring `loop.LoopRunner` (host-side
numbers, no compiles): which rows it writes and when, evaluations and checkpoints on their
cadence, snapshots, resume, preemption, and the non-finite policy for one state and for K.
Then `Evaluator`, `weight_stats`, `stage_row` and `results_record`, and the policy and
validation rows of real runs.
"""
import math

import chex
import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import config as config_lib, data, io, loop, metrics, stages
from jaxaccel.config import default_config
from jaxaccel.compress import package
from jaxaccel.preemption import Preempted
from tiny_runs import params_of, steps_in, tiny_config


class FakeRunner:
    """K states {"step", "w"}: the step run at global step s adds s to every point's w.

    Its metrics: loss s + 100 * k for point k, lr 0.1 * s; `bad` holds the (point, global
    step) pairs whose update is non-finite."""
    block = 1
    steps_per_epoch = 4
    compile_seconds = None
    sync_each_call = False

    def __init__(self, points=1, bad=()):
        self.points, self.bad, self.calls = points, set(bad), []

    def run(self, state, step, steps):
        self.calls.append(step)
        k = np.arange(self.points)
        m = {"loss": step + 100.0 * k, "accuracy": np.full(self.points, 0.5),
             "grad_norm": np.ones(self.points), "lr": np.full(self.points, 0.1 * step),
             "nonfinite": np.array([(i, step) in self.bad for i in k], np.int32)}
        return {"step": state["step"] + 1, "w": state["w"] + step}, m

    def host_metrics(self, fetched):
        return {key: np.stack([np.asarray(m[key]) for m in fetched]) for key in fetched[0]}

    def evaluate(self, state, evaluator):
        return [{"test": {"loss": float(w), "accuracy": 0.25, "count": 4}} for w in state["w"]]

    def host_step(self, state):
        return int(state["step"])

    def payload(self, state):
        return {"state": dict(state)}

    def snapshot(self, state):
        return np.array(state["w"])


class Saves:
    """Stands in for a Checkpointer: records what the loop saves."""

    def __init__(self, steps=()):
        self.saved = [(s, None, None) for s in steps]
        self.closed = False

    def save(self, step, payload, meta):
        self.saved.append((step, payload, meta))

    def steps(self):
        return [s for s, _, _ in self.saved]

    def latest_step(self):
        return self.saved[-1][0] if self.saved else None

    def close(self):
        self.closed = True


class Guard:
    """Stands in for PreemptionGuard: asks to stop at its `stop_at`-th check."""
    signal_name = "SIGTERM"

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def should_stop(self):
        self.calls += 1
        return self.calls == self.stop_at


class Evaluations:
    """What the loop needs of an Evaluator when the runner evaluates: its rows."""
    write = staticmethod(loop.Evaluator.write)


def loop_config(**changes):
    c = config_lib.default_config()
    c.batch_size, c.log_every, c.checkpoint_every, c.eval_every = 8, 5, 4, 3
    for k, v in changes.items():
        config_lib.set_value(c, k, v)
    return c


def start(points=1, step=0):
    return {"step": step, "w": np.zeros(points)}


def rows(workdir, split="train"):
    return [r for r in metrics.read_metrics(workdir) if r["split"] == split]


def test_rows_evaluations_checkpoints_and_snapshot_on_their_cadence(tmp_path):
    runner, saves = FakeRunner(), Saves()
    with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        state, stats, extras, failed = loop.train_loop(
            runner, start(), loop_config(), num_steps=10, writers=[writer], checkpointer=saves,
            guard=Guard(), evaluator=Evaluations(), step_offset=100,
            meta=lambda: {"stage": 2}, snapshot_at=103, stage_name="s", show_progress=False)
    assert runner.calls == list(range(100, 110))  # global steps: offset + stage step
    assert state["step"] == 10 and state["w"][0] == sum(range(100, 110))
    # A row every log_every steps, at the end, and before every checkpoint: the mean of the
    # steps since the last row (lr: the last step's).
    train = rows(str(tmp_path))
    assert [r["step"] for r in train] == [104, 105, 108, 110]
    assert [r["loss"] for r in train] == [101.5, 104.0, 106.0, 108.5]
    assert train[0]["lr"] == pytest.approx(10.3) and train[-1]["lr"] == pytest.approx(10.9)
    assert all(r["stage"] == "s" and r["nonfinite"] == 0 and r["nonfinite_total"] == 0
               for r in train)
    assert all(r["images_per_sec"] > 0 and r["step_ms"] > 0 for r in train)
    # Evaluations every eval_every steps (not at the end: the stage's caller evaluates).
    test = rows(str(tmp_path), "test")
    assert [(r["step"], r["loss"], r["count"]) for r in test] == [
        (103, 303.0, 4), (106, 303.0 + 103 + 104 + 105, 4), (109, 303.0 + 103 + 104 + 105
                                                                  + 106 + 107 + 108, 4)]
    # Checkpoints every checkpoint_every steps and at the end, with the params after global
    # step 103 as the snapshot.
    assert saves.steps() == [104, 108, 110] and not saves.closed
    step, payload, meta = saves.saved[0]
    assert meta == {"stage": 2, "stage_step": 4, "step": 104, "epoch": 104 // 4}
    assert payload["state"]["step"] == 4 and failed == {}
    np.testing.assert_array_equal(payload["snapshot"], [303.0])
    np.testing.assert_array_equal(extras["snapshot"], [303.0])
    assert stats["nonfinite_steps"] == [0] and stats["compile_seconds"] >= 0
    assert stats["train_images_per_sec"] > 0


def test_a_resumed_stage_runs_only_the_steps_left(tmp_path):
    runner, saves = FakeRunner(), Saves()
    with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        state, *_ = loop.train_loop(runner, start(step=6), loop_config(eval_every=0),
                                    num_steps=10, writers=[writer], checkpointer=saves,
                                    guard=Guard(), evaluator=Evaluations(), show_progress=False)
    assert runner.calls == [6, 7, 8, 9] and state["step"] == 10
    assert [r["step"] for r in rows(str(tmp_path))] == [8, 10]
    assert saves.steps() == [8, 10]
    # A finished stage runs nothing; it saves its end only if that checkpoint is missing.
    for before, after in (((), [10]), ((10,), [10])):
        saves = Saves(before)
        loop.train_loop(FakeRunner(), start(step=10), loop_config(), num_steps=10,
                        writers=[writer], checkpointer=saves, guard=Guard(),
                        evaluator=Evaluations(), show_progress=False)
        assert saves.steps() == after


def test_preemption_saves_the_step_it_stopped_at_and_raises(tmp_path):
    saves = Saves()
    with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(Preempted) as stopped:
            loop.train_loop(FakeRunner(), start(), loop_config(log_every=100, eval_every=0,
                                                               checkpoint_every=100),
                            num_steps=10, writers=[writer], checkpointer=saves,
                            guard=Guard(stop_at=3), evaluator=Evaluations(), step_offset=20,
                            show_progress=False)
    assert stopped.value.step == 23 and "SIGTERM" in str(stopped.value)
    assert saves.steps() == [23] and saves.closed
    assert [r["step"] for r in rows(str(tmp_path))] == [23]  # the metrics so far


def test_nonfinite_stop_fails_one_state_before_its_checkpoint(tmp_path):
    saves = Saves()
    with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(FloatingPointError,
                           match=r"non-finite loss or gradient at step 102; set nonfinite='skip'"):
            loop.train_loop(FakeRunner(bad={(0, 102)}),
                            start(), loop_config(log_every=1, checkpoint_every=1),
                            num_steps=10, writers=[writer], checkpointer=saves, guard=Guard(),
                            evaluator=Evaluations(), step_offset=100, show_progress=False)
    assert saves.steps() == [101, 102]  # the state after the bad step is never saved
    assert [r["step"] for r in rows(str(tmp_path))] == [101, 102]


def test_nonfinite_skip_counts_the_steps(tmp_path):
    with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        _, stats, _, failed = loop.train_loop(
            FakeRunner(bad={(0, 2), (0, 3)}), start(), loop_config(nonfinite="skip",
                                                                   eval_every=0),
            num_steps=10, writers=[writer], checkpointer=Saves(), guard=Guard(),
            evaluator=Evaluations(), show_progress=False)
    assert stats["nonfinite_steps"] == [2] and failed == {}
    train = rows(str(tmp_path))
    assert [(r["step"], r["nonfinite"], r["nonfinite_total"]) for r in train] == [
        (4, 2, 2), (5, 0, 2), (8, 0, 2), (10, 0, 2)]


def test_nonfinite_stop_fails_only_the_bad_point_of_k_states(tmp_path):
    reported = []
    writers = [metrics.MetricWriter(str(tmp_path / str(k)), tensorboard=False) for k in range(3)]
    try:
        state, stats, _, failed = loop.train_loop(
            FakeRunner(points=3, bad={(1, 3)}), start(3),
            loop_config(log_every=2, checkpoint_every=100, eval_every=2), num_steps=6,
            writers=writers, checkpointer=Saves(), guard=Guard(), evaluator=Evaluations(),
            on_failed=lambda i, message: reported.append((i, message)), show_progress=False)
    finally:
        for w in writers:
            w.close()
    message = "non-finite loss or gradient at step 3; set nonfinite='skip' to skip such updates"
    assert reported == [(1, message)] and failed == {1: message}
    assert state["step"] == 6 and stats["nonfinite_steps"] == [0, 1, 0]
    steps = {k: [r["step"] for r in rows(str(tmp_path / str(k)))] for k in range(3)}
    assert steps == {0: [2, 4, 6], 1: [2], 2: [2, 4, 6]}
    assert [r["loss"] for r in rows(str(tmp_path / "2"))] == [200.5, 202.5, 204.5]
    evaluated = {k: [r["step"] for r in rows(str(tmp_path / str(k)), "test")] for k in range(3)}
    assert evaluated == {0: [2, 4], 1: [2], 2: [2, 4]}  # the failed point's rows stop


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------
def test_evaluator_averages_every_example_once_per_split():
    spec = data.dataset_spec("digits")
    labels = np.arange(10, dtype=np.int32)
    images = np.zeros((10, 8, 8, 1), np.uint8)
    splits = data.Splits(train=None, validation=data.ArraySource(images[:6], labels[:6]),
                         test=data.ArraySource(images, labels))
    evaluator = loop.Evaluator(splits, spec, batch_size=4)
    assert evaluator.splits == ("validation", "test")
    seen = []

    def run_eval(state, batch):  # loss = label, correct = even label; padding masked out
        seen.append(len(batch["label"]))
        m = batch["mask"].astype(np.float64)
        one = {"loss": np.sum(m * batch["label"]), "correct": np.sum(m * (batch["label"] % 2 == 0)),
               "count": np.sum(m)}
        return {k: np.array([v, state * v]) for k, v in one.items()}  # two points

    results = evaluator.evaluate(run_eval, 2.0, points=2)
    assert set(seen) == {4} and len(seen) == 2 + 3  # padded to equal shapes
    assert results[0] == {"validation": {"loss": 2.5, "accuracy": 0.5, "count": 6},
                          "test": {"loss": 4.5, "accuracy": 0.5, "count": 10}}
    assert results[1]["test"] == {"loss": 4.5, "accuracy": 0.5, "count": 20}
    assert loop.Evaluator.row(results[0]) == {
        "validation_accuracy": 0.5, "validation_loss": 2.5, "test_accuracy": 0.5,
        "test_loss": 4.5}
    held_out_none = loop.Evaluator(data.Splits(None, None, splits.test), spec, batch_size=4)
    assert held_out_none.splits == ("test",)


# ----------------------------------------------------------------------------------------
# What results.json holds
# ----------------------------------------------------------------------------------------
def weights():
    kernel_mask = np.zeros((4, 5), bool)
    kernel_mask[0] = True  # 5 of 20 kept
    params = {"fc": {"kernel": np.ones((4, 5), np.float32), "bias": np.ones(5, np.float32)}}
    masks = {"fc": {"kernel": kernel_mask, "bias": np.ones(5, bool)}}
    return params, masks


def test_weight_stats_counts_kernels_and_sizes():
    params, masks = weights()
    stats = loop.weight_stats(params, masks)
    assert stats["sparsity"] == 0.75 and stats["nonzero_weights"] == 5 and stats["bits"] == 32
    assert stats["dense_float32_bytes"] == 4 * 25
    assert stats["packed_bytes"] == package.packed_bytes({"params": params, "batch_stats": {}},
                                                         masks, bits=32)
    with_bn = loop.weight_stats(params, masks, 8, batch_stats={"bn": {"mean": np.zeros(3)}})
    assert with_bn["bits"] == 8 and with_bn["dense_float32_bytes"] == 4 * 28
    assert with_bn["packed_bytes"] == package.packed_bytes(
        {"params": params, "batch_stats": {"bn": {"mean": np.zeros(3)}}}, masks, bits=8)


def test_stage_rows_and_the_results_record():
    params, masks = weights()
    result = {"validation": {"loss": 0.4, "accuracy": 0.8, "count": 5},
              "test": {"loss": math.nan, "accuracy": 0.7, "count": 9}}
    train = stages.stage("dense", "train", steps=3)
    row = loop.stage_row(train, result, {"params": params, "masks": masks, "batch_stats": {}})
    assert row == {"name": "dense", "kind": "train", "steps": 3, "validation_accuracy": 0.8,
                   "validation_loss": 0.4, "test_accuracy": 0.7, "test_loss": row["test_loss"],
                   **loop.weight_stats(params, masks)}
    assert math.isnan(row["test_loss"])
    q = stages.stage("q", "quantize", quant={"mode": "ptq", "weight_bits": 4})
    quantized = {**loop.stage_row(q, result, {"params": params, "masks": masks,
                                              "batch_stats": {}}, quant_section=q.quant),
                 "deployed": "int8"}
    assert quantized["bits"] == 4
    config = tiny_config(**{"parallel.strategy": "fsdp"})
    record = loop.results_record(
        config, [row, quantized], steps=3, stats={"train_images_per_sec": 10.0,
                                                  "compile_seconds": 1.5},
        sizes={"num_test_examples": 9}, num_devices=2, num_processes=1, num_params=25,
        vectorized={"points": 2})
    assert record["test_accuracy"] == 0.7 and record["test_loss"] is None  # strict JSON
    assert record["validation_accuracy"] == 0.8 and record["deployed"] == "int8"
    assert (record["steps"], record["num_devices"], record["num_processes"]) == (3, 2, 1)
    assert (record["strategy"], record["model"], record["dataset"]) == (
        "fsdp", "lenet300_100", "digits")
    assert record["num_test_examples"] == 9 and record["num_params"] == 25
    assert record["train_images_per_sec"] == 10.0 and record["compile_seconds"] == 1.5
    assert record["nonfinite_steps"] == 0 and record["vectorized"] == {"points": 2}
    assert record["sparsity"] == 0.75 and record["packed_bytes"] == quantized["packed_bytes"]
    assert [r["name"] for r in record["stages"]] == ["dense", "q"]
    assert "bits" not in record  # the rows carry it
    assert io.loads(io.dumps(record)) == record


# ----------------------------------------------------------------------------------------
# Real runs: the non-finite policy, validation beside test
# ----------------------------------------------------------------------------------------
EXPLODE = {"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.lr": 1e30,
           "num_steps": 8, "log_every": 50}  # step 0 is finite, every later step is not


def test_nonfinite_stop_names_the_step_and_never_checkpoints_it(tmp_path):
    wd = str(tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 1;"):
        jaxaccel.train(tiny_config(**EXPLODE, checkpoint_every=1), wd)
    assert steps_in(wd) == [1]  # the state after the bad step 1 was not saved
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_of(wd)))


def test_nonfinite_skip_keeps_weights_and_counts_in_metrics(tmp_path):
    wd = str(tmp_path)
    results = jaxaccel.train(tiny_config(**EXPLODE, nonfinite="skip", checkpoint_every=4), wd)
    assert results["nonfinite_steps"] == 7
    rows = [r for r in metrics.read_metrics(wd) if r["split"] == "train"]
    assert sum(r["nonfinite"] for r in rows) == 7 and rows[-1]["nonfinite_total"] == 7
    # Steps 1..7 were skipped: the weights at step 8 are those after step 0 (and finite).
    chex.assert_trees_all_equal(params_of(wd, 8), params_of(wd, 4))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_of(wd, 8)))
    assert jaxaccel.load(wd, 8).step == 8


def test_run_reports_validation_beside_test(tmp_path):
    c = default_config()
    c.dataset.name, c.dataset.validation_split = "digits", 0.2
    c.model.name = "lenet300_100"
    c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 6, 3, 3, 6
    c.batch_size, c.eval_batch_size, c.progress = 64, 128, False
    workdir = str(tmp_path / "run")
    results = jaxaccel.train(c, workdir)
    assert results["num_train_examples"] == 1150 and results["num_validation_examples"] == 287
    assert results["num_test_examples"] == 360
    assert 0 <= results["validation_accuracy"] <= 1 and results["validation_loss"] > 0
    row = results["stages"][0]
    assert (row["validation_accuracy"], row["test_accuracy"]) == (
        results["validation_accuracy"], results["test_accuracy"])
    evaluated = [(r["split"], r["step"]) for r in metrics.read_metrics(workdir)
                 if r["split"] in ("validation", "test")]
    assert sorted(evaluated) == [("test", 3), ("test", 6), ("validation", 3), ("validation", 6)]
    c.dataset.validation_split, workdir = 0.0, str(tmp_path / "plain")
    results = jaxaccel.train(c, workdir)
    assert results["num_validation_examples"] == 0 and "validation_accuracy" not in results
