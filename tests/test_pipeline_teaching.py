"""The pipeline's teachers and ensembles: distillation from a frozen teacher (in the step or
precomputed), under every strategy, resumed exactly, refused when the teacher changed; K
ensemble members trained as one program equal K separate runs, combined on validation only."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import checkpoint, cli, data, loading, preemption
from jaxaccel.compress import export as ex
from jaxaccel.preemption import Preempted
from jaxaccel.stages import stage
from tiny_runs import fits_on_two_test_sets, tiny_config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_params_close(a, b, tol):
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def _student(teacher, **changes):
    return tiny_config(**{"model.width": 0.25, "distill.teacher": teacher,
                          "distill.temperature": 4.0, "distill.alpha": 0.9, **changes})


@pytest.fixture(scope="module")
def distilled(reference, tmp_path_factory):
    """A student distilled from the `reference` run (in the step), and the teacher's files
    before it trained."""
    teacher = reference[0]
    before = {name: open(os.path.join(root, name), "rb").read()
              for root, _, files in os.walk(os.path.join(teacher, "checkpoints"))
              for name in files}
    wd = str(tmp_path_factory.mktemp("distilled"))
    return wd, jaxaccel.train(_student(teacher), wd), before


def test_the_teacher_stays_frozen_and_out_of_the_students_checkpoint(distilled, reference,
                                                                     tmp_path):
    wd, results, before = distilled
    teacher = reference[0]
    after = {name: open(os.path.join(root, name), "rb").read()
             for root, _, files in os.walk(os.path.join(teacher, "checkpoints")) for name in files}
    assert after == before  # the teacher's files are untouched
    ckpt = checkpoint.Checkpointer(wd, read_only=True)
    meta = ckpt.read_meta(ckpt.latest_step())
    ckpt.close()
    assert meta["teacher"]["path"] == os.path.abspath(teacher) and len(meta["teacher"]["hash"]) == 16
    plain = str(tmp_path / "plain")
    jaxaccel.train(tiny_config(**{"model.width": 0.25}), plain)

    def stored_leaves(workdir):  # the checksummed leaf names of the raw record on disk
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        step = ckpt.latest_step()
        ckpt.close()
        with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
            return set(json.load(f)[checkpoint.CHECKSUMS_KEY])

    # the same leaves as a student trained without a teacher: nothing of the teacher is stored
    assert stored_leaves(wd) == stored_leaves(plain) and stored_leaves(wd)
    # and the teacher did teach: the same student, seed and batches end elsewhere without it
    plain_results = json.load(open(os.path.join(plain, "results.json")))
    assert results["test_loss"] != plain_results["test_loss"]
    assert results["test_accuracy"] > 0.3


def test_precomputed_teacher_logits_train_like_the_teacher_in_the_step(distilled, reference,
                                                                       tmp_path):
    wd = str(tmp_path / "precomputed")
    jaxaccel.train(_student(reference[0], **{"distill.precompute": True}), wd)
    _assert_params_close(jaxaccel.load(wd).variables["params"],
                         jaxaccel.load(distilled[0]).variables["params"], 1e-5)


def test_a_sparse_qat_bfloat16_student_of_another_architecture(reference, tmp_path):
    """Distillation composes with everything a train stage does: lenet5 (the teacher is
    lenet300_100) in bfloat16, channel-pruned at initialization (a quarter of the channels),
    gradually pruned to 90% then 4-bit QAT, taught in every train stage."""
    teach = {"teacher": reference[0], "temperature": 4.0, "alpha": 0.9}

    c = tiny_config(**{"model.name": "lenet5", "model.dtype": "bfloat16", "model.width": 0.5,
                       "optimizer.lr": 3e-3})
    c.model.kwargs.padding = "SAME"  # 8x8 digits through two 2x2 poolings
    c.stages = (stage("channels", "prune", prune={"method": "one_shot", "sparsity": 0.25,
                                                  "granularity": "channel"}),
                stage("sparse", "train", steps=30, distill=teach,
                      prune={"method": "gradual", "sparsity": 0.9, "initial": 0.0,
                             "begin_step": 0, "end_step": 5, "frequency": 1}),
                stage("qat", "train", steps=10, distill=teach,
                      quant={"mode": "qat", "weight_bits": 4, "act_bits": 8}))
    taught = jaxaccel.train(c, str(tmp_path / "taught"))
    rows = {r["name"]: r for r in taught["stages"]}
    for name in ("sparse", "qat"):
        assert rows[name]["teacher"]["path"] == os.path.abspath(reference[0])
        assert rows[name]["teacher"]["alpha"] == 0.9
    assert "teacher" not in rows["channels"] and rows["channels"]["sparsity"] > 0.15
    assert rows["sparse"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert rows["qat"]["sparsity"] == pytest.approx(0.9, abs=0.01) and rows["qat"]["bits"] == 4
    # it learns (chance is 0.1; 0.25 measured on an AVX2 EPYC)
    assert np.isfinite(taught["test_loss"]) and taught["test_accuracy"] > 0.15


@pytest.mark.parametrize("strategy", ["data", "fsdp", "pmap"])
def test_distillation_on_8_devices_equals_one_device(strategy, distilled, reference, tmp_path):
    wd = str(tmp_path / strategy)
    jaxaccel.train(_student(reference[0], **{"parallel.num_devices": 0,
                                             "parallel.strategy": strategy}), wd)
    _assert_params_close(jaxaccel.load(wd).variables["params"],
                         jaxaccel.load(distilled[0]).variables["params"], 1e-5)


def _preempt_after(monkeypatch, steps):
    calls = {"n": 0}

    def should_stop(self):
        calls["n"] += 1
        return calls["n"] >= steps

    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", should_stop)


def test_a_killed_distillation_resumes_exactly(distilled, reference, tmp_path, monkeypatch):
    wd = str(tmp_path / "resumed")
    _preempt_after(monkeypatch, 7)
    with pytest.raises(Preempted):
        jaxaccel.train(_student(reference[0]), wd)
    monkeypatch.undo()
    jaxaccel.train(_student(reference[0]), wd)
    for a, b in zip(_leaves(jaxaccel.load(wd).variables["params"]),
                    _leaves(jaxaccel.load(distilled[0]).variables["params"])):
        np.testing.assert_array_equal(a, b)


def test_resuming_with_a_changed_teacher_is_refused(reference, tmp_path, monkeypatch):
    teacher = str(tmp_path / "teacher")
    shutil.copytree(reference[0], teacher)
    wd = str(tmp_path / "student")
    _preempt_after(monkeypatch, 7)
    with pytest.raises(Preempted):
        jaxaccel.train(_student(teacher), wd)
    monkeypatch.undo()
    jaxaccel.train(tiny_config(num_steps=30), teacher)  # the teacher trains on: new weights
    with pytest.raises(ValueError, match="the teacher .* changed since this run checkpointed"):
        jaxaccel.train(_student(teacher), wd)


EXPERIMENT = """
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name, c.model.name, c.num_steps, c.batch_size = {dataset!r}, "lenet300_100", 2, 32
    c.progress = False
{body}
    return c
"""


def _bad(tmp_path, capsys, body, dataset="digits"):
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(dataset=dataset, body=body))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not workdir.exists(), err
    return err[0]


@pytest.mark.parametrize("body,needle", [
    ("    c.distill.teacher = '/no/such/run'", "is not a jaxaccel workdir"),
    ("    c.distill.teacher = TEACHER\n    c.distill.temperature = 0.0", "temperature=0.0 must be > 0"),
    ("    c.distill.teacher = TEACHER\n    c.distill.alpha = 1.5", "alpha=1.5 must be in [0, 1]"),
    ("    c.ensemble.members = 0", "ensemble.members=0 must be an integer >= 1"),
    ("    c.ensemble.members, c.ensemble.combine = 3, 'stack'", "set dataset.validation_split > 0"),
    ("    c.distill.teacher = TEACHER\n    c.dataset.flip = True\n    c.distill.precompute = True",
     "precompute=True needs fixed inputs"),
])
def test_bad_teachers_and_ensembles_are_one_line_errors(body, needle, reference, tmp_path, capsys):
    line = _bad(tmp_path, capsys, body.replace("TEACHER", repr(reference[0])))
    assert needle in line, line


def test_a_teacher_without_checkpoints_or_of_another_shape_is_refused(reference, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(reference[0], "config.json"), empty / "config.json")
    assert "has no finished checkpoint" in _bad(tmp_path, capsys, f"    c.distill.teacher = {str(empty)!r}")
    line = _bad(tmp_path, capsys, f"    c.distill.teacher = {reference[0]!r}", dataset="mnist5k")
    assert "takes images of shape (8, 8, 1), the student (28, 28, 1)" in line, line


# ------------------------------------------------------------------------------ ensembles
@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ensemble"))
    config = tiny_config(**{"ensemble.members": 3, "dataset.validation_split": 0.2,
                            "ensemble.combine": "stack"})
    return wd, config, jaxaccel.train(config, wd)


def test_ensemble_members_equal_separate_runs_with_their_seeds(ensemble, tmp_path):
    wd, config, results = ensemble
    members = jaxaccel.load(wd)
    assert members.members == 3 and type(members.model).__name__ == "Ensemble"
    for k in range(3):
        single = str(tmp_path / f"seed{k}")
        jaxaccel.train(tiny_config(**{"seed": k, "dataset.validation_split": 0.2}), single)
        want = jaxaccel.load(single).variables["params"]
        got = jax.tree.map(lambda x, k=k: x[k], members.variables["params"])
        _assert_params_close(got, want, 1e-5)
    record = results["ensemble"]
    assert len(record["members"]) == 3
    assert set(record) >= {"members", "average", "stacked", "logistic"}  # all, with validation
    for combo in ("average", "stacked", "logistic"):
        assert set(record[combo]) == {"validation", "test"}
        assert set(record[combo]["test"]) == {"accuracy", "loss", "ece", "count"}
    assert results["test_accuracy"] == record["stacked"]["test"]["accuracy"]
    assert sum(record["weights"]) == pytest.approx(1, abs=1e-5)


def test_a_loaded_ensemble_predicts_its_combination(ensemble):
    wd, config, results = ensemble
    run = jaxaccel.load(wd)
    images, labels = data.read_arrays(data.get_source("digits", "test"), np.arange(360))
    accuracy = float(np.mean(np.asarray(run.predict(images)).argmax(-1) == labels))
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)
    weights = json.load(open(os.path.join(wd, "ensemble.json")))["weights"]
    assert weights == results["ensemble"]["weights"]


def test_stacking_reads_only_the_validation_split(ensemble):
    wd, config, _ = ensemble
    weights = [np.asarray(w) for w in fits_on_two_test_sets(wd, config)]
    np.testing.assert_array_equal(weights[0], weights[1])


def test_an_ensemble_can_teach(ensemble, tmp_path):
    wd = str(tmp_path / "student_of_ensemble")
    results = jaxaccel.train(_student(ensemble[0]), wd)
    teacher = loading.load(ensemble[0])
    assert teacher.members == 3 and results["test_accuracy"] > 0.2


def test_an_ensemble_exports_like_any_run(ensemble, tmp_path, capsys):
    """`compress export` of an ensemble workdir: one StableHLO function of raw uint8 images
    whose logits are the loaded ensemble's combination."""
    wd = ensemble[0]
    out = tmp_path / "ensemble.stablehlo"
    assert cli.main(["compress", "export", wd, "--out", str(out)]) == 0
    capsys.readouterr()
    raw, _ = data.read_arrays(data.get_source("digits", "test"), np.arange(50))
    np.testing.assert_allclose(ex.load_exported(out).call(raw), jaxaccel.load(wd).predict(raw),
                               rtol=1e-5, atol=1e-5)
