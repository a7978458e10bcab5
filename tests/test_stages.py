"""Multi-stage pipelines: train → prune → finetune → quantize → evaluate, resumable."""
import json
import os
import re
import shutil

import chex
import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel.compress import sections
from jaxaccel import config as config_lib, metrics, stages
from jaxaccel.compress import prune


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


def test_imp_rounds_expand():
    c = pipeline_config()
    c.stages = ()
    c.imp.rounds = 2
    c.imp.steps = 5
    names = [s.name for s in stages.expand(c)]
    assert names == ["round0/train", "round1/prune", "round1/rewind", "round1/train",
                     "round2/prune", "round2/rewind", "round2/train"]


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


def test_iterated_prune_stages_shrink_masks_to_the_one_shot_masks():
    """Prune stages start from the carried masks: each is a subset of the last, and on fixed
    weights the iterates land exactly on the one-shot masks of the final sparsity."""
    rng = np.random.default_rng(0)
    params = {"fc1": {"kernel": rng.standard_normal((64, 32)).astype(np.float32),
                      "bias": np.zeros(32, np.float32)},
              "fc2": {"kernel": rng.standard_normal((32, 10)).astype(np.float32),
                      "bias": np.zeros(10, np.float32)}}
    dense = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    final = {"fc1/kernel": 0.92, "fc2/kernel": 0.74}
    masks, p, previous = dense, params, None
    for r in (1, 2, 3):
        per_layer = {k: 1 - (1 - s) ** (r / 3) for k, s in final.items()}
        s = stages.stage("p", "prune", prune={"method": "one_shot", "per_layer": per_layer})
        p, masks = sections.prune_once(p, masks, s.prune)
        for path, m in prune.named_leaves(masks):
            if path in final:
                keep = (1 - final[path]) ** (r / 3)
                assert np.mean(np.asarray(m)) == pytest.approx(keep, abs=1.0 / m.size)
        if previous is not None:
            assert all(np.all(np.asarray(new) <= np.asarray(old)) for new, old in
                       zip(jax.tree.leaves(masks), jax.tree.leaves(previous)))
        previous = masks
    s = stages.stage("e", "evaluate", prune={"method": "one_shot", "per_layer": final})
    _, once = sections.prune_once(params, dense, s.prune)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, masks), jax.tree.map(np.asarray, once))


@pytest.mark.parametrize("stage_kwargs,needle", [
    ({"kind": "shrinkify"}, "kind='shrinkify'"),
    ({"kind": "prune", "prune": {"method": "gradual"}}, "one_shot or imp"),
    ({"kind": "train", "steps": 5, "quant": {"mode": "ptq"}}, "qat"),
    ({"kind": "quantize", "quant": {"mode": "ptq", "weight_bits": 9}}, "weight_bits=9"),
    ({"kind": "prune", "prune": {"method": "one_shot", "sparsity": 1.5}}, "sparsity=1.5"),
    ({"kind": "evaluate", "prune": {"method": "gradual"}},
     "stages[0] (s).prune.method='gradual' is not valid for an evaluate stage; "
     "choose one of: none, one_shot"),
    ({"kind": "evaluate", "prune": {"method": "one_shot", "sparsity": 1.0}}, "sparsity=1.0"),
])
def test_bad_stages(stage_kwargs, needle):
    c = pipeline_config()
    kind = stage_kwargs.pop("kind")
    c.stages = (stages.stage("s", kind, **stage_kwargs),)
    with pytest.raises(ValueError, match=re.escape(needle)) as e:
        stages.expand(c)
    assert "\n" not in str(e.value)


def test_iterative_pruning_stages_follow_han_schedule():
    final = {"fc1/kernel": 0.92, "fc3/kernel": 0.74}
    st = stages.iterative_pruning(final, rounds=3, dense_steps=100, retrain_steps=3200,
                                  retrain_optimizer={"lr": 1e-4})
    assert [s.name for s in st] == ["dense", "no_retrain", "round1/prune", "round1/retrain",
                                    "round2/prune", "round2/retrain", "round3/prune", "retrain"]
    assert st[1].kind == "evaluate" and st[1].prune.per_layer.to_dict() == final
    retrains = [s for s in st[2:] if s.kind == "train"]
    assert [s.steps for s in retrains] == [1067, 1067, 1066]
    assert all(s.optimizer.lr == 1e-4 for s in retrains)
    for r, p in enumerate([s for s in st if s.kind == "prune"], start=1):
        for k, v in final.items():  # keep ratio final_keep ** (r / 3)
            assert abs((1 - p.prune.per_layer[k]) - (1 - v) ** (r / 3)) < 1e-12
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        stages.iterative_pruning(final, rounds=0, dense_steps=1, retrain_steps=1)


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
