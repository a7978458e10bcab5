"""jaxaccel.pipeline: `train(config, workdir)` — stages in order (the `STAGE_KINDS` registry),
exact resume in any stage, the workdir rules (what may change when a run resumes), and what
a run writes (results.json, metrics, dataset.json)."""
import json
import os
import re
import shutil

import chex
import jax
import numpy as np
import pytest

import jaxaccel
from fixtures.make_old_workdir import config as fixture_config
from image_folders import write_folder
from jaxaccel import checkpoint, config as config_lib, data, metrics, pipeline, stages
from jaxaccel.compress import prune
from jaxaccel.config import default_config
from tiny_runs import ALL_DEVICES, params_of, tiny_config

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OLD = os.path.join(HERE, "old_workdir")


def final_params(workdir):
    return jaxaccel.load(workdir).variables["params"]


def test_stage_kinds_are_the_schemas_kinds():
    assert set(pipeline.STAGE_KINDS) == set(stages.KINDS)
    assert all(callable(fn) for fn in pipeline.STAGE_KINDS.values())


# ----------------------------------------------------------------------------------------
# A one-stage run: resume, results, metrics, the workdir
# ----------------------------------------------------------------------------------------
def test_resume_after_interruption_is_exact(reference, tmp_path):
    ref_wd, ref_results = reference
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd)
    # "Interrupt" after step 10: drop everything written later.
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))
    os.remove(os.path.join(wd, "results.json"))
    results = jaxaccel.train(tiny_config(**{"parallel.num_devices": 1}), wd)
    chex.assert_trees_all_equal(final_params(wd), final_params(ref_wd))
    assert results["test_accuracy"] == ref_results["test_accuracy"]


def test_results_and_metrics_files(reference):
    wd, results = reference
    with open(os.path.join(wd, "results.json")) as f:
        saved = json.load(f)
    for key in ("test_accuracy", "test_loss", "steps", "train_images_per_sec", "num_devices",
                "strategy"):
        assert key in saved
    assert saved["steps"] == 20 and saved["num_devices"] == 1
    rows = list(metrics.read_metrics(wd))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert {"loss", "accuracy", "lr", "grad_norm", "images_per_sec", "step_ms"} <= set(train_rows[-1])
    assert any(r["split"] == "test" for r in rows)
    assert os.listdir(os.path.join(wd, "events"))
    assert config_lib.from_json(open(os.path.join(wd, "config.json")).read()).num_steps == 20


def test_same_config_and_seed_give_bitwise_identical_runs(reference, tmp_path):
    """A second run of the reference config (the subprocess tests above also compare fresh
    processes with in-process runs bit for bit)."""
    again = str(tmp_path / "again")
    results = jaxaccel.train(tiny_config(), again)
    chex.assert_trees_all_equal(params_of(again), params_of(reference[0]))
    for key in ("test_loss", "test_accuracy"):
        assert results[key] == reference[1][key]
    keys = ("split", "step", "loss", "accuracy", "grad_norm")
    rows = [[tuple(r.get(k) for k in keys) for r in metrics.read_metrics(w)]
            for w in (again, reference[0])]
    assert rows[0] == rows[1] and len(rows[0]) >= 5


def test_training_learns_digits(tmp_path):
    # 100 steps: 0.96-0.97 with seeds 0..3, as with 150
    results = jaxaccel.train(tiny_config(**ALL_DEVICES, num_steps=100, log_every=50,
                                         checkpoint_every=100), str(tmp_path))
    assert results["test_accuracy"] > 0.9


def test_different_config_refused_then_overwritten(reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    with pytest.raises(config_lib.ConfigError, match="optimizer.lr"):
        jaxaccel.train(tiny_config(**ALL_DEVICES, **{"optimizer.lr": 0.5}), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
    results = jaxaccel.train(tiny_config(**ALL_DEVICES, **{"optimizer.lr": 0.002, "num_steps": 5}), wd,
                             overwrite=True)
    assert results["steps"] == 5
    assert checkpoint.Checkpointer(wd).all_steps() == [5]


def test_transfer_learning_reinitialises_mismatched_head(reference, tmp_path):
    from jaxaccel import pipeline, state as state_lib
    src = reference[0]
    cfg = tiny_config(**{"model.kwargs.hidden": (300, 50), "num_steps": 0, "init_from": src})
    setup = state_lib.build(cfg)
    state = setup.init_state(jax.random.PRNGKey(1))
    new_state, reinit = pipeline.transfer(state, src)
    assert "params/fc2/kernel" in reinit and "params/fc3/kernel" in reinit
    np.testing.assert_array_equal(new_state.params["fc1"]["kernel"],
                                  final_params(src)["fc1"]["kernel"])


def test_a_new_workdir_gets_the_config_and_nothing_else(tmp_path):
    wd = str(tmp_path / "new")
    config = tiny_config()
    pipeline.prepare_workdir(config, wd)
    assert os.listdir(wd) == ["config.json"]
    assert config_lib.differences(config, config_lib.from_json(
        open(os.path.join(wd, "config.json")).read())) == []
    assert pipeline.trained_steps(wd) is None
    pipeline.prepare_workdir(config, wd)  # the same experiment again: fine
    pipeline.prepare_workdir(config, str(tmp_path / "other"), is_main=False)  # not process 0
    assert not (tmp_path / "other").exists()


def test_overwrite_removes_only_the_other_experiments_files(tmp_path):
    wd = tmp_path / "run"
    pipeline.prepare_workdir(tiny_config(), str(wd))
    for name in ("checkpoints/10", "events"):
        (wd / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "results.json", "calibration.json", "notes.txt"):
        (wd / name).write_text("x")
    assert pipeline.trained_steps(str(wd)) == 10
    changed = tiny_config(**{"optimizer.lr": 0.5})
    with pytest.raises(config_lib.ConfigError, match=r"holds a different experiment "
                                                     r"\(optimizer.lr: 0.001 -> 0.5\)"):
        pipeline.prepare_workdir(changed, str(wd))
    pipeline.prepare_workdir(changed, str(wd), overwrite=True)
    assert sorted(os.listdir(wd)) == ["config.json", "notes.txt"]
    assert config_lib.from_json((wd / "config.json").read_text()).optimizer.lr == 0.5


def test_which_num_steps_changes_a_resumed_run_would_change_silently():
    def problem(schedule="constant", old=8, new=12, trained=8, **changes):
        saved = tiny_config(num_steps=old, **{"optimizer.schedule": schedule}, **changes)
        return pipeline.extension_problem(
            saved, tiny_config(num_steps=new, **{"optimizer.schedule": schedule}, **changes),
            trained)

    assert problem() is None and problem("piecewise") is None  # these extend exactly
    assert "fewer than the 8 steps" in problem(new=6)
    assert re.search(r"num_steps 8 -> 12: optimizer.schedule='cosine' decays over num_steps, so "
                     r"the learning rate at step 8 would jump from .* to ", problem("cosine"))
    assert "warmup_cosine" in problem("warmup_cosine", **{"optimizer.warmup_steps": 2})
    assert "every IMP round" in problem(**{"imp.rounds": 1})
    assert problem(**{"imp.rounds": 1, "imp.steps": 4}) is None
    with_stages = tiny_config(num_steps=4)
    with_stages.stages = (stages.stage("t", "train", steps=3),)
    assert pipeline.extension_problem(with_stages, with_stages, 8) is None  # stages: own steps


def _config(steps, schedule):
    c = default_config()
    c.dataset.name, c.model.name = "digits", "lenet300_100"
    c.num_steps, c.log_every, c.checkpoint_every, c.progress = steps, 4, 4, False
    c.batch_size, c.eval_batch_size = 32, 120
    c.optimizer.schedule, c.optimizer.lr = schedule, 3e-3
    c.parallel.num_devices = 1
    return c


def _params(workdir):
    return jax.tree.leaves(jax.device_get(jaxaccel.load(workdir).variables["params"]))


# cosine only: the refusal, the untouched files and the overwrite do not depend on which
# decaying schedule it is; warmup_cosine's message is checked in
# test_which_num_steps_changes_a_resumed_run_would_change_silently above
@pytest.mark.parametrize("schedule", ["cosine"])
def test_more_steps_under_a_decaying_schedule_is_refused(schedule, tmp_path):
    workdir = str(tmp_path / "run")
    c = _config(8, schedule)
    c.optimizer.warmup_steps = 2 if schedule == "warmup_cosine" else 0
    jaxaccel.train(c, workdir)
    before = {f: open(os.path.join(workdir, f)).read() for f in ("config.json", "results.json")}
    c.num_steps = 12
    with pytest.raises(ValueError, match=rf"num_steps 8 -> 12: optimizer.schedule='{schedule}' "
                                         r"decays over num_steps.*step 8 would jump from"):
        jaxaccel.train(c, workdir)
    assert before == {f: open(os.path.join(workdir, f)).read() for f in before}
    results = jaxaccel.train(c, workdir, overwrite=True)  # starts again, as asked
    assert results["steps"] == 12
    assert json.load(open(os.path.join(workdir, "config.json")))["num_steps"] == 12


def test_a_constant_schedule_extends_exactly(tmp_path, caplog):
    extended, fresh = str(tmp_path / "extended"), str(tmp_path / "fresh")
    jaxaccel.train(_config(8, "constant"), extended)
    with caplog.at_level("INFO", logger="jaxaccel"):
        results = jaxaccel.train(_config(12, "constant"), extended)
    assert "num_steps 8 -> 12" in caplog.text and "continuing from step 8" in caplog.text
    assert results["steps"] == 12
    jaxaccel.train(_config(12, "constant"), fresh)
    for a, b in zip(_params(extended), _params(fresh)):
        np.testing.assert_array_equal(a, b)


def test_a_run_records_its_dataset_and_class_names(tmp_path):
    import jaxaccel
    from jaxaccel.config import default_config
    root = tmp_path / "pets"
    write_folder(root, classes=("cat", "dog"), per_class=(16, 4), size=(8, 8))
    c = default_config()
    c.dataset.name, c.dataset.path = "image_folder", str(root)
    c.dataset.data_dir, c.dataset.image_size = str(tmp_path / "tfds"), (6, 6)
    c.model.name, c.num_steps, c.batch_size, c.eval_batch_size = "lenet300_100", 2, 8, 8
    c.progress, c.parallel.num_devices = False, 1
    workdir = tmp_path / "run"
    jaxaccel.train(c, str(workdir))
    record = json.loads((workdir / "dataset.json").read_text())
    assert record["class_names"] == ["cat", "dog"] and record["image_shape"] == [6, 6, 3]
    assert record["num_train_examples"] == 32 and record["num_test_examples"] == 8
    assert len(record["mean"]) == len(record["std"]) == 3


def test_dataset_record_says_what_the_model_takes():
    splits = data.splits_for(tiny_config(**{"dataset.validation_split": 0.1}).dataset)
    record = pipeline.dataset_record(data.dataset_spec("digits"), splits)
    assert record == {"name": "digits", "kind": "builtin", "image_shape": [8, 8, 1],
                      "num_classes": 10, "class_names": list("0123456789"),
                      "mean": list(data.dataset_spec("digits").mean),
                      "std": list(data.dataset_spec("digits").std), **splits.sizes()}
    assert record["num_validation_examples"] == 144


# ----------------------------------------------------------------------------------------
# Multi-stage pipelines: train → prune → finetune → quantize → evaluate, resumable
# ----------------------------------------------------------------------------------------
def pipeline_config(**changes):
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.optimizer.lr = 2e-3
    c.log_every = 10
    c.checkpoint_every = 10
    c.keep_checkpoints = 20
    c.progress = False
    c.parallel.num_devices = 1
    c.stages = (
        stages.stage("train", "train", steps=60),
        stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.8}),
        stages.stage("finetune", "train", steps=30, optimizer={"lr": 2e-4}),
        stages.stage("quantize", "quantize", quant={"mode": "ptq", "calibration_batches": 2}),
        stages.stage("evaluate", "evaluate"),
    )
    for k, v in changes.items():
        config_lib.set_value(c, k, v)
    return c


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("pipeline"))
    return wd, jaxaccel.train(pipeline_config(), wd)


def test_five_stage_pipeline_rows(pipeline_run):
    wd, results = pipeline_run
    rows = {r["name"]: r for r in results["stages"]}
    assert list(rows) == ["train", "prune", "finetune", "quantize", "evaluate"]
    assert rows["train"]["sparsity"] == 0.0
    for name in ("prune", "finetune", "quantize", "evaluate"):
        assert rows[name]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert rows["quantize"]["bits"] == 8 and rows["train"]["bits"] == 32
    assert rows["quantize"]["packed_bytes"] < rows["finetune"]["packed_bytes"] < rows["train"]["packed_bytes"]
    # Fine-tuning recovers what one-shot pruning lost; int8 tracks fake-quant.
    assert rows["finetune"]["test_accuracy"] >= rows["prune"]["test_accuracy"]
    assert rows["train"]["test_accuracy"] > 0.8
    assert abs(rows["quantize"]["test_accuracy"] - rows["finetune"]["test_accuracy"]) < 0.03
    q = rows["quantize"]
    assert abs(q["int8_test_accuracy"] - q["fake_quant_test_accuracy"]) <= 0.01
    assert q["float32_test_accuracy"] == rows["finetune"]["test_accuracy"]
    assert results["steps"] == 90
    saved = json.load(open(os.path.join(wd, "results.json")))
    assert [r["name"] for r in saved["stages"]] == list(rows)
    stages_logged = {r.get("stage") for r in metrics.read_metrics(wd) if r["split"] == "train"}
    assert stages_logged == {"train", "finetune"}


def test_a_quantizing_pipeline_reports_the_model_it_deploys(pipeline_run):
    """After a quantize stage, rows and the top level describe the int8 model (the one that
    would be deployed), with the float32 and fake-quant numbers beside it under their names."""
    _, results = pipeline_run
    rows = {r["name"]: r for r in results["stages"]}
    for name in ("quantize", "evaluate"):  # evaluate after quantize evaluates the int8 model
        row = rows[name]
        assert row["deployed"] == "int8" and row["bits"] == 8
        assert row["test_accuracy"] == row["int8_test_accuracy"]
        assert row["test_loss"] == row["int8_test_loss"]
        assert row["int8_runtime_bytes"] > 0
    assert rows["evaluate"]["int8_test_accuracy"] == rows["quantize"]["int8_test_accuracy"]
    assert "deployed" not in rows["finetune"] and rows["finetune"]["bits"] == 32
    assert results["deployed"] == "int8"
    assert results["test_accuracy"] == rows["evaluate"]["int8_test_accuracy"]
    assert results["float32_test_accuracy"] == rows["finetune"]["test_accuracy"]
    assert results["fake_quant_test_accuracy"] == rows["evaluate"]["fake_quant_test_accuracy"]


def test_pruned_weights_stay_zero_through_finetune(pipeline_run):
    wd, _ = pipeline_run
    params = jaxaccel.load(wd).variables["params"]
    summary = prune.sparsity_summary(params)
    kernel = summary["leaves"]["fc1/kernel"]
    assert kernel["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_resume_after_kill_in_third_stage(pipeline_run, tmp_path):
    ref_wd, ref = pipeline_run
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd)
    # Kill during "finetune" (global steps 61..90): lose everything after step 70.
    for step in os.listdir(os.path.join(wd, "checkpoints")):
        if step.isdigit() and int(step) > 70:
            shutil.rmtree(os.path.join(wd, "checkpoints", step))
    os.remove(os.path.join(wd, "results.json"))
    results = jaxaccel.train(pipeline_config(), wd)
    chex.assert_trees_all_equal(jaxaccel.load(wd).variables["params"],
                                jaxaccel.load(ref_wd).variables["params"])
    assert [r["test_accuracy"] for r in results["stages"][2:]] == \
        [r["test_accuracy"] for r in ref["stages"][2:]]


def test_gradual_pruning_and_qat_stage(tmp_path):
    c = pipeline_config()
    c.stages = (
        stages.stage("gradual", "train", steps=40,
                     prune={"method": "gradual", "sparsity": 0.9, "begin_step": 0,
                            "end_step": 30, "frequency": 10}),
        stages.stage("qat", "train", steps=10, quant={"mode": "qat", "weight_bits": 4}),
    )
    results = jaxaccel.train(c, str(tmp_path))
    rows = results["stages"]
    assert rows[0]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert rows[1]["sparsity"] == pytest.approx(0.9, abs=1e-3)  # sparsity survives QAT
    assert rows[1]["bits"] == 4
    assert rows[1]["test_accuracy"] > 0.5


def test_imp_rewinds_to_init_and_prunes_geometrically(tmp_path):
    c = pipeline_config(**{"num_steps": 20})
    c.stages = ()
    c.imp.rounds = 2
    c.imp.rate = 0.5
    results = jaxaccel.train(c, str(tmp_path))
    sp = {r["name"]: r["sparsity"] for r in results["stages"]}
    assert sp["round1/train"] == pytest.approx(0.5, abs=1e-3)
    assert sp["round2/train"] == pytest.approx(0.75, abs=1e-3)


def test_evaluate_with_prune_section_leaves_the_state_unchanged(tmp_path):
    """`evaluate` + one-shot prune: a pruned-evaluation row; the next stages see no pruning."""
    c = pipeline_config()
    c.stages = (
        stages.stage("train", "train", steps=20),
        stages.stage("no_retrain", "evaluate", prune={"method": "one_shot", "sparsity": 0.8}),
        stages.stage("again", "evaluate"),
        stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.5}),
        stages.stage("deeper", "evaluate",
                     prune={"method": "one_shot", "per_layer": {"fc1/kernel": 0.9}}),
        stages.stage("finetune", "train", steps=5),
    )
    rows = {r["name"]: r for r in jaxaccel.train(c, str(tmp_path))["stages"]}
    assert rows["no_retrain"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert rows["no_retrain"]["packed_bytes"] < rows["train"]["packed_bytes"]
    assert rows["no_retrain"]["test_accuracy"] != rows["train"]["test_accuracy"]
    # The carried state was not pruned: the same weights, the same accuracy, dense.
    assert rows["again"]["sparsity"] == 0.0
    assert rows["again"]["test_accuracy"] == rows["train"]["test_accuracy"]
    assert rows["again"]["packed_bytes"] == rows["train"]["packed_bytes"]
    # On top of carried masks: fc1 at 90%, the other kernels keep the prune stage's 50%.
    assert rows["prune"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    fc1, rest = 64 * 300, 300 * 100 + 100 * 10
    assert rows["deeper"]["sparsity"] == pytest.approx((0.9 * fc1 + 0.5 * rest) / (fc1 + rest),
                                                       abs=1e-3)
    assert rows["finetune"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_console_lines_name_their_stage(tmp_path, capsys, caplog):
    c = pipeline_config()
    c.dataset.name = "digits"
    c.progress, c.log_every = True, 2
    c.stages = (stages.stage("dense", "train", steps=2),
                stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.5}),
                stages.stage("finetune", "train", steps=2))
    with caplog.at_level("INFO", logger="jaxaccel"):
        jaxaccel.train(c, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "[dense] step 2: loss=" in out and "[finetune] step 4: loss=" in out
    assert "stage 3/3 'finetune': train, 2 steps" in caplog.text
    assert "[prune] test_accuracy=" in caplog.text and "sparsity=0.5" in caplog.text


def test_quantize_stage_writes_its_calibration_and_the_int8_export_matches(pipeline_run,
                                                                            tmp_path):
    """The chain a deployment follows: the quantize stage writes calibration.json, `compress
    export --int8` turns the run into a StableHLO artifact of raw uint8 images, and the
    artifact's accuracy is the stage's int8 accuracy (up to rounding ties)."""
    import numpy as np
    from jaxaccel import cli, data
    from jaxaccel.compress import export, quant
    wd, results = pipeline_run
    act, w_cfg, meta = quant.load_calibration(os.path.join(wd, "calibration.json"))
    assert meta == {"stage": "quantize", "step": 90} and w_cfg.bits == 8 and act
    out = str(tmp_path / "model.int8.stablehlo")
    assert cli.main(["compress", "export", wd, "--out", out, "--int8"]) == 0
    config = jaxaccel.load(wd).config
    test = data.splits_for(config.dataset).test
    images, labels = data.read_arrays(test, np.arange(len(test)))
    logits = np.asarray(export.load_exported(out).call(images))  # raw uint8 in
    accuracy = float(np.mean(logits.argmax(-1) == labels))
    row = {r["name"]: r for r in results["stages"]}["quantize"]
    assert abs(accuracy - row["int8_test_accuracy"]) <= 0.005


def test_one_size_definition_across_rows_report_and_package(pipeline_run, tmp_path):
    """`packed_bytes` means one thing: what a package of the weights stores before zlib. The
    pipeline's final row, `compress report` and `compress package` agree on it; the package
    file on disk (zlib) and the int8 runtime's arrays are other quantities, named so."""
    from jaxaccel import cli
    wd, results = pipeline_run
    final = results["stages"][-1]
    assert final["bits"] == 8 and results["packed_bytes"] == final["packed_bytes"]
    assert cli.main(["compress", "report", wd, "--json", str(tmp_path / "r.json")]) == 0
    report = json.load(open(tmp_path / "r.json"))
    assert report["bits"] == 8 and report["totals"]["packed_bytes"] == final["packed_bytes"]
    assert cli.main(["compress", "package", wd, "--out", str(tmp_path / "m.npz"),
                     "--json", str(tmp_path / "p.json")]) == 0
    info = json.load(open(tmp_path / "p.json"))
    assert info["packed_bytes"] == final["packed_bytes"]
    assert info["package_file_bytes"] == os.path.getsize(tmp_path / "m.npz")
    assert final["int8_runtime_bytes"] > final["packed_bytes"]  # dense int8 kernels in memory
    assert final["dense_float32_bytes"] == 4 * sum(
        np.size(x) for x in jax.tree.leaves(jaxaccel.load(wd).variables))


# ----------------------------------------------------------------------------------------
# Workdirs written by older versions of jaxaccel resume to the uninterrupted result
# (`tests/fixtures/old_workdir`, written at commit 3189569 by
# `tests/fixtures/make_old_workdir.py`: a train → prune → finetune pipeline preempted after 9
# of its 12 steps, in its finetune stage; tests/test_loading.py loads it).
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(HERE, "old_workdir_expected.npz")))


def test_old_workdir_resumes_to_the_uninterrupted_result(tmp_path, expected):
    workdir = str(tmp_path / "old")
    shutil.copytree(OLD, workdir)
    config = fixture_config()
    config.parallel.num_devices = 1  # as the fixture was made (the rounding of a sum differs)
    results = jaxaccel.train(config, workdir)
    assert results["steps"] == 12
    assert [row["name"] for row in results["stages"]] == ["train", "prune", "finetune"]
    params = jaxaccel.load(workdir).variables["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_allclose(np.asarray(leaf), expected["final" + jax.tree_util.keystr(path)],
                                   rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
