"""jaxaccel.compress.sensitivity and `jaxaccel compress sensitivity`: per-layer accuracy when
only one layer is pruned or quantized, and the allocation of per-layer sparsity and bits for
a size / MAC target (exact for the additive model), on a tiny run with a validation split."""
import itertools
import json
import os

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import artifacts, cli, config as config_lib, loading, stages
from jaxaccel.compress import layer_table, package, prune, sensitivity
from tiny_runs import tiny_config

VALIDATION = {"dataset.validation_split": 0.2}
SPARSITIES = (0.0, 0.5, 0.9)
BITS = (8, 4, 2)


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    """A finished dense tiny run holding out 20% of train as validation: (workdir, results)."""
    wd = str(tmp_path_factory.mktemp("sensitivity_run"))
    return wd, jaxaccel.train(tiny_config(**VALIDATION), wd)


@pytest.fixture(scope="module")
def record(val_run, tmp_path_factory):
    """`artifacts.sensitivity_run` of the run with a small grid and a byte target."""
    wd, _ = val_run
    out = str(tmp_path_factory.mktemp("sensitivity_out"))
    return artifacts.sensitivity_run(wd, sparsities=SPARSITIES, bits=BITS, target_bytes=20_000,
                                     out=out)


@pytest.fixture(scope="module")
def weights(val_run):
    run = loading.final_weights(val_run[0])
    sizes = sensitivity.layer_sizes(run.model, run.variables, run.input_shape)
    return run, sizes


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# --------------------------------------------------------------------------- one layer at a time
def test_pruning_or_quantizing_one_layer_changes_only_that_layer(weights):
    run, _ = weights
    params = run.variables["params"]
    masks = jax.tree.map(lambda p: p != 0, params)
    before = dict(prune.named_leaves(_host(params)))
    for changed in (sensitivity.prune_layer(params, masks, "fc2/kernel", 0.5),
                    sensitivity.quantize_layer(params, "fc2/kernel", 3)):
        after = dict(prune.named_leaves(_host(changed)))
        for path, leaf in before.items():
            if path != "fc2/kernel":
                assert after[path].dtype == leaf.dtype
                np.testing.assert_array_equal(after[path], leaf)  # bit-identical
        assert not np.array_equal(after["fc2/kernel"], before["fc2/kernel"])
    pruned = np.asarray(sensitivity.prune_layer(params, masks, "fc2/kernel", 0.5)["fc2"]["kernel"])
    assert np.count_nonzero(pruned) == 300 * 100 // 2
    quantized = np.asarray(sensitivity.quantize_layer(params, "fc2/kernel", 3)["fc2"]["kernel"])
    assert all(len(np.unique(quantized[:, c])) <= 7 for c in range(100))  # codes -3..3
    with pytest.raises(ValueError, match="'fc2/bias' is not a conv/dense kernel"):
        sensitivity.prune_layer(params, masks, "fc2/bias", 0.5)


def test_pruning_is_on_top_of_the_current_mask(weights):
    run, _ = weights
    params = run.variables["params"]
    w = np.asarray(params["fc1"]["kernel"])
    prior = np.abs(w) > np.quantile(np.abs(w), 0.7)  # 70% already pruned
    masks = jax.tree.map(lambda p: p == p, params)
    masks = {**masks, "fc1": {**masks["fc1"], "kernel": prior}}
    params = {**params, "fc1": {**params["fc1"], "kernel": np.where(prior, w, 0)}}
    less = np.asarray(sensitivity.prune_layer(params, masks, "fc1/kernel", 0.5)["fc1"]["kernel"])
    np.testing.assert_array_equal(less, np.where(prior, w, 0))  # already sparser: unchanged
    more = np.asarray(sensitivity.prune_layer(params, masks, "fc1/kernel", 0.9)["fc1"]["kernel"])
    assert np.count_nonzero(more) == w.size - round(0.9 * w.size)
    assert not np.any(more[~prior])  # a subset of the current mask
    assert sensitivity.kept(w.size, int(prior.sum()), 0.5) == int(prior.sum())


def test_sparsity_zero_equals_the_unpruned_evaluation(record, val_run):
    _, results = val_run
    base = record["baseline"]
    # The same numbers the run's own evaluation (loop.Evaluator) reported on validation.
    assert base["accuracy"] == pytest.approx(results["validation_accuracy"], abs=1e-9)
    assert base["loss"] == pytest.approx(results["validation_loss"], rel=1e-5)
    assert record["sparsities"] == [0.0, 0.5, 0.9] and record["bits"] == [8, 4, 2]
    assert [r["layer"] for r in record["layers"]] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    for row in record["layers"]:
        assert row["prune"]["accuracy"][0] == base["accuracy"]
        assert row["prune"]["loss"][0] == base["loss"]
        assert row["prune"]["accuracy"][-1] < base["accuracy"]  # 90% of one layer costs
    assert record["split"] == "validation" and not record["selected_on_test"]
    on_disk = json.loads(open(record["paths"]["json"]).read())
    assert on_disk["allocation"]["prune_per_layer"] == record["allocation"]["prune_per_layer"]
    assert os.path.getsize(record["paths"]["png"]) > 0


# --------------------------------------------------------------------------- allocation
def _brute_force(table, sizes, kind, limit):
    layers = list(sizes["layers"])
    best = None
    grid = list(itertools.product(sorted({0.0, *table["sparsities"]}), table["bits"]))
    for choice in itertools.product(grid, repeat=len(layers)):
        p = sensitivity.predict(table, sizes, {k: c[0] for k, c in zip(layers, choice)},
                                {k: c[1] for k, c in zip(layers, choice)})
        if p[kind] <= limit and (best is None or p["predicted_drop"] < best):
            best = p["predicted_drop"]
    return best


def test_allocation_meets_the_target_and_beats_uniform(record, weights):
    run, sizes = weights
    table = {k: record[k] for k in ("baseline", "sparsities", "bits", "layers")}
    for s, b in itertools.product((0.5, 0.9), BITS):
        uniform = sensitivity.predict(table, sizes, s, b)
        alloc = sensitivity.allocate(table, sizes, target_bytes=uniform["bytes"])
        assert alloc["bytes"] <= uniform["bytes"]
        assert alloc["predicted_drop"] <= uniform["predicted_drop"]
        assert alloc["predicted_drop"] == _brute_force(table, sizes, "bytes", uniform["bytes"])
    alloc = record["allocation"]
    assert alloc["bytes"] <= 20_000 and alloc["target"] == {"bytes": 20_000}
    # Its bytes are those of the weights it describes, counted as a package counts them.
    params = run.variables["params"]
    masks = prune.magnitude_masks(params, 0.0, per_layer=alloc["prune_per_layer"],
                                  prior_masks=jax.tree.map(lambda p: p != 0, params))
    pruned = _host(prune.apply_masks(params, masks))
    leaves = dict(prune.named_leaves(pruned))
    total = sizes["fixed_bytes"] + sum(
        package.kernel_bytes(leaves[k].size, int(np.count_nonzero(leaves[k])),
                             leaves[k].shape[-1], alloc["bits_per_layer"][k]) for k in leaves
        if prune.is_kernel(k, leaves[k]))
    assert total == alloc["bytes"]
    same_bits = sensitivity.predict(table, sizes, alloc["prune_per_layer"], 4)
    assert same_bits["bytes"] == package.packed_bytes({**run.variables, "params": pruned}, bits=4)
    macs = layer_table.layer_table(run.model, {**run.variables, "params": pruned},
                                   run.input_shape)["totals"]["macs_effective"]
    assert alloc["macs"] == macs
    by_macs = sensitivity.allocate(table, sizes, target_macs=macs // 2)
    assert by_macs["macs"] <= macs // 2
    assert by_macs["predicted_drop"] == _brute_force(table, sizes, "macs", macs // 2)
    least = sensitivity.smallest(sizes, SPARSITIES, BITS)["bytes"]
    with pytest.raises(ValueError, match="smaller than the smallest achievable"):
        sensitivity.allocate(table, sizes, target_bytes=least - 1)
    assert sensitivity.allocate(table, sizes, target_bytes=least)["bytes"] == least
    with pytest.raises(ValueError, match="not both"):
        sensitivity.allocate(table, sizes, target_bytes=10**6, target_macs=10**6)


def test_the_allocation_runs_in_a_pipeline_prune_stage(record, weights, tmp_path):
    _, sizes = weights
    per_layer = record["allocation"]["prune_per_layer"]
    assert f'"per_layer": {json.dumps(per_layer)}' in record["allocation"]["prune_stage"]
    c = tiny_config(**VALIDATION)
    c.stages = (stages.stage("train", "train", steps=20),
                stages.stage("prune", "prune", prune={"method": "one_shot",
                                                      "per_layer": per_layer}))
    wd = str(tmp_path / "run")
    jaxaccel.train(c, wd)
    rep = artifacts.compression_report(wd)
    got = {f"{r['layer']}/kernel": r["nonzeros"] for r in rep["layers"] if r["kind"] != "other"}
    assert got == {k: sensitivity.kept(v["size"], v["size"], per_layer[k])
                   for k, v in sizes["layers"].items()}


# --------------------------------------------------------------------------- the command
def test_command_prints_the_tables_and_the_allocation(val_run, tmp_path, capsys):
    wd, _ = val_run
    out = tmp_path / "sens"
    assert cli.main(["compress", "sensitivity", wd, "--sparsities", "0.5,0.9", "--bits", "8,2",
                     "--split", "test", "--target-macs", "20000", "--out", str(out),
                     "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "| layer | sparsity 0.5 | sparsity 0.9 |" in text
    assert "| layer | bits 8 | bits 2 |" in text
    assert "TEST split" in text and "selected on test" in text
    assert 'stage("prune", "prune", prune={"method": "one_shot", "per_layer": {' in text
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["selected_on_test"] and rec["allocation"]["macs"] <= 20000
    assert sorted(os.listdir(out)) == ["sensitivity.json", "sensitivity.png"]


@pytest.mark.parametrize("args,needles", [
    (["--sparsities", "0.5,1.0"], ["sparsity=1.0", "[0, 1)"]),
    (["--sparsities", "0.5,-0.1"], ["sparsity=-0.1"]),
    (["--sparsities", "0.5,half"], ["--sparsities", "numbers"]),
    (["--bits", "8,9"], ["bits 9", "2..8"]),
    (["--bits", "1"], ["bits 1", "2..8"]),
    (["--bits", "4.5"], ["--bits", "integers"]),
    (["--target-bytes", "1000", "--target-macs", "1000"], ["one of --target-bytes"]),
    (["--target-bytes", "-5"], ["--target-bytes", "positive"]),
    (["--target-bytes", "100"], ["target_bytes=100", "smallest achievable"]),
    (["--target-macs", "10"], ["target_macs=10", "smallest achievable"]),
    (["--split", "train"], ["--split 'train'", "validation, test"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(val_run, tmp_path, capsys, args,
                                                          needles, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd, _ = val_run
    out = tmp_path / "sens"
    assert cli.main(["compress", "sensitivity", wd, "--out", str(out)] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()


def test_a_run_without_validation_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd = tmp_path / "run"  # only the config is read before refusing
    wd.mkdir()
    (wd / "config.json").write_text(config_lib.to_json(tiny_config()))
    for extra in ([], ["--split", "validation"]):
        assert cli.main(["compress", "sensitivity", str(wd)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no validation split" in err[0] and "--split test" in err[0]
    assert sorted(os.listdir(wd)) == ["config.json"]
