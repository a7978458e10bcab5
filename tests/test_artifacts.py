"""jaxaccel.artifacts: what a finished run turns into — its per-layer compression report, its
compressed package and its StableHLO export — and the `jaxaccel compress report|package|
export` commands that write them. Packages and exports take raw uint8 images, like
`jaxaccel.load(W).predict`."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from export_helpers import LOADER, foreign_calls
from jaxaccel import artifacts, cli, config as config_lib, data, loading, stages
from jaxaccel.compress import export as ex
from jaxaccel.compress import fold, package, quant, sections
from jaxaccel.compress import int8 as i8
from jaxaccel.compress import quant as q
from ties import assert_equal_up_to_ties

DIGITS = data.dataset_spec("digits")  # (8, 8, 1), mean 0.305, std 0.376


# --------------------------------------------------------------------------- report, package
def test_report_and_package_of_a_run_and_of_its_package(pruned_run, tmp_path):
    wd, results = pruned_run
    rep = artifacts.compression_report(wd)
    assert (rep["step"], rep["stage"], rep["bits"]) == (10, "prune", 32)
    assert rep["totals"]["nonzeros"] == results["stages"][-1]["nonzero_weights"]
    assert artifacts.compression_report(wd, bits=4)["bits"] == 4
    out = str(tmp_path / "m.npz")
    info = artifacts.package_run(wd, out, bits=8)
    assert (info["step"], info["stage"]) == (10, "prune")
    assert info["checkpoint_dir"] == os.path.join(wd, "checkpoints", "10")
    assert info["checkpoint_ratio"] == pytest.approx(info["checkpoint_bytes"]
                                                     / info["package_file_bytes"])
    assert any("applied again" in n for n in info["notes"])
    from_package = artifacts.compression_report(out)
    assert from_package["bits"] == 8
    assert from_package["totals"]["nonzeros"] == rep["totals"]["nonzeros"]
    with pytest.raises(ValueError, match="--bits and --step apply to workdirs"):
        artifacts.compression_report(out, bits=4)
    with pytest.raises(FileNotFoundError, match="neither a workdir nor a package"):
        artifacts.compression_report(str(tmp_path / "missing"))


def test_bad_outputs_and_kinds_fail_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        artifacts.check_out_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        artifacts.check_out_file(str(tmp_path / "nope" / "m.npz"))
    artifacts.check_out_file(str(tmp_path / "m.npz"))  # a new file in an existing directory
    with pytest.raises(ValueError, match="bits"):
        artifacts.package_run(str(tmp_path / "not_a_run"), str(tmp_path / "m.npz"), bits=9)
    with pytest.raises(ValueError, match="export kind 'onnx'.*float, fake-quant, int8"):
        artifacts.export_run(str(tmp_path), str(tmp_path / "m"), kind="onnx")
    with pytest.raises(FileNotFoundError, match="calibration.json.*quantize"):
        artifacts.read_calibration(str(tmp_path), "int8")
    assert os.listdir(tmp_path) == []


def test_report_command(pruned_run,tmp_path, capsys):
    wd, results = pruned_run
    out = tmp_path / "report.json"
    assert cli.main(["compress", "report", wd, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fc1 | dense | 64x300 | 19,200 | 1,920 | 90.00% | 32 |" in text
    assert "prune" in text and "applied again" in text
    rep = json.loads(out.read_text())
    assert [r["layer"] for r in rep["layers"]] == ["fc1", "fc2", "fc3"]
    assert rep["step"] == 10 and rep["bits"] == 32 and rep["stage"] == "prune"
    t = rep["totals"]
    # The pruned weights the report rebuilt are the ones the run evaluated.
    prune_row = results["stages"][-1]
    assert t["sparsity"] == pytest.approx(prune_row["sparsity"])
    assert t["nonzeros"] == prune_row["nonzero_weights"]
    assert t["packed_bytes"] == prune_row["packed_bytes"]
    assert t["macs_effective"] * 10 == t["macs_dense"] == 64 * 300 + 300 * 100 + 100 * 10

    assert cli.main(["compress", "report", wd, "--bits", "8"]) == 0
    assert "| fc1 | dense | 64x300 | 19,200 | 1,920 | 90.00% | 8 |" in capsys.readouterr().out


def test_package_command_then_load_and_report(pruned_run,tmp_path, capsys):
    wd, _ = pruned_run
    out = tmp_path / "model.npz"
    sizes = tmp_path / "sizes.json"
    assert cli.main(["compress", "package", wd, "--out", str(out), "--json", str(sizes)]) == 0
    text = capsys.readouterr().out
    info = json.loads(sizes.read_text())
    assert info["package_file_bytes"] == out.stat().st_size
    assert f"{info['package_file_bytes']:,} bytes on disk" in text
    assert "float32 dense parameters" in text and "orbax checkpoint" in text
    assert info["checkpoint_bytes"] > 10 * info["package_file_bytes"]
    assert info["ratio"] > 10 and info["sparsity"] == pytest.approx(0.9)
    # The package alone rebuilds the pruned int8 model: the run's final (pruned) weights,
    # fake-quantized as the PTQ stage does.
    pkg = package.load_compressed(out)
    model, variables = pkg.model, pkg.variables
    final = loading.final_weights(wd)
    assert model == final.model
    want = jax.jit(lambda p: quant.quantize_weights(p, package.weight_config(8))[0])(
        final.variables["params"])
    chex.assert_trees_all_equal(variables["params"], jax.device_get(want))
    assert np.count_nonzero(np.asarray(variables["params"]["fc1"]["kernel"])) == 1920
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    chex.assert_trees_all_close(apply(variables, x), apply({"params": want}, x),
                                atol=1e-5, rtol=1e-5)
    # It takes what jaxaccel.load(wd).predict takes: raw uint8 test images, normalised inside,
    # and gives the run's predictions with the int8 weights.
    raw, _ = data.read_arrays(data.get_source("digits", "test"), np.arange(64))
    loaded = jaxaccel.load(wd)
    chex.assert_trees_all_close(pkg.predict(raw),
                                loaded.predict_fn({**loaded.variables, "params": want}, raw),
                                atol=1e-5, rtol=1e-5)
    assert pkg.spec == data.dataset_spec("digits") and pkg.step == 10
    assert cli.main(["compress", "report", str(out)]) == 0
    assert "| fc1 | dense | 64x300 | 19,200 | 1,920 | 90.00% | 8 |" in capsys.readouterr().out


@pytest.mark.parametrize("args,needles", [
    (["package", "{wd}", "--out", "{tmp}/x.npz", "--bits", "9"], ["bits", "9"]),
    (["report", "{wd}", "--bits", "12"], ["bits", "12"]),
    (["report", "{tmp}/nope"], ["nope"]),
    (["report", "{tmp}"], ["config.json"]),
    (["report", "{wd}", "--input-shape", "8,8"], ["--input-shape", "8,8"]),
    (["report", "{wd}", "--step", "3"], ["step=3", "10"]),
    (["report", "{wd}", "--config.seed=1"], ["--config.seed=1"]),
])
def test_bad_input_is_one_line_and_exit_2(pruned_run,tmp_path, capsys, args, needles, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd, _ = pruned_run
    argv = ["compress"] + [a.format(wd=wd, tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not (tmp_path / "x.npz").exists()


# --------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def export_run(tmp_path_factory):
    """A tiny trained run (cnn3 width 0.25 on 8x8 digits, 40 steps) with the calibration file
    its quantize stage would write: BN folded, activations calibrated on normalised train
    images with the stage's default PTQ configs."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "cnn3"
    c.model.width = 0.25
    c.batch_size = 64
    c.eval_batch_size = 120
    c.log_every = 20
    c.checkpoint_every = 40
    c.progress = False
    c.parallel.num_devices = 1
    c.stages = (stages.stage("train", "train", steps=40),)
    wd = str(tmp_path_factory.mktemp("export_run"))
    jaxaccel.train(c, wd)
    loaded = jaxaccel.load(wd)
    train_images, _ = data.read_arrays(data.get_source("digits", "train"), np.arange(256))
    raw, labels = data.read_arrays(data.get_source("digits", "test"), np.arange(360))
    model, variables = fold.fold_bn(loaded.model, loaded.variables, input_shape=(1, 8, 8, 1))
    w_cfg, a_cfg = sections.ptq_configs(stages.stage("q", "quantize", quant={"mode": "ptq"}).quant)
    act = q.calibrate(model, variables, [data.normalize(train_images, DIGITS)], a_cfg)
    q.save_calibration(os.path.join(wd, "calibration.json"), act, w_cfg,
                       meta={"step": int(loaded.step), "stage": "quantize"})
    return dict(wd=wd, loaded=loaded, raw=raw, labels=labels, model=model, variables=variables,
                act=act, w_cfg=w_cfg)


def _export(export_run,tmp_path, capsys, *flags):
    out = tmp_path / "model.stablehlo"
    assert cli.main(["compress", "export", export_run["wd"], "--out", str(out), *flags]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "uint8 (b, 8, 8, 1)" in line
    assert f"{out.stat().st_size:,} bytes" in line
    exp = ex.load_exported(out)
    assert exp.in_avals[0].dtype == jnp.uint8 and exp.in_avals[0].shape[1:] == (8, 8, 1)
    assert not isinstance(exp.in_avals[0].shape[0], int)  # symbolic batch
    assert not foreign_calls(exp)  # no process-local CPU kernels
    assert os.listdir(tmp_path) == ["model.stablehlo"]
    return out, exp


def test_float_export_of_a_run_equals_predict(export_run,tmp_path, capsys):
    out, exp = _export(export_run,tmp_path, capsys)
    raw = export_run["raw"]
    np.testing.assert_allclose(exp.call(raw), export_run["loaded"].predict(raw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exp.call(raw[:3]), export_run["loaded"].predict(raw[:3]), rtol=1e-5, atol=1e-5)


def test_fake_quant_export_equals_in_process_ptq(export_run,tmp_path, capsys):
    out, exp = _export(export_run,tmp_path, capsys, "--fake-quant")
    raw = export_run["raw"]
    want = jax.jit(lambda v, x: q.apply_fake_quant(export_run["model"], v, x, export_run["act"],
                                                   weight_config=export_run["w_cfg"]))(
        export_run["variables"], data.normalize(raw, DIGITS))
    assert_equal_up_to_ties(exp.call(raw), want)
    # quantization changed the function: the float logits differ
    assert not np.allclose(exp.call(raw), export_run["loaded"].predict(raw), atol=1e-4)


def test_int8_export_equals_in_process_int8(export_run,tmp_path, capsys):
    out, exp = _export(export_run,tmp_path, capsys, "--int8")
    raw = export_run["raw"]
    qm = i8.convert_int8(export_run["variables"], export_run["act"], weight_config=export_run["w_cfg"])
    want = jax.jit(lambda m, x: i8.int8_apply(export_run["model"], m, x))(qm, data.normalize(raw, DIGITS))
    assert_equal_up_to_ties(exp.call(raw), want)
    # and in a fresh Python that never imports jaxaccel, raw uint8 in
    in_file, out_file = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(in_file, raw=raw)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([sys.executable, "-c", LOADER, str(in_file), str(out_file), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    assert_equal_up_to_ties(np.load(out_file)[f"{out}:raw"], want)


def _copy_run(export_run,dest, calibration=None):
    """The run's workdir copied to `dest`, with `calibration` (None: no calibration.json)."""
    shutil.copytree(export_run["wd"], dest, ignore=shutil.ignore_patterns("calibration.json"))
    if calibration is not None:
        act, w_cfg, meta = calibration
        q.save_calibration(os.path.join(dest, "calibration.json"), act, w_cfg, meta=meta)
    return str(dest)


@pytest.mark.parametrize("case", ["both", "out_dir", "missing_dir", "no_calibration_int8",
                                  "no_calibration_fq", "other_step", "4bit_int8", "no_workdir",
                                  "bad_step"])
def test_bad_export_input_is_one_line_and_exit_2(case, export_run,tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    wd, out = export_run["wd"], str(tmp_path / "out" / "m.stablehlo")
    (tmp_path / "out").mkdir()
    act, w_cfg = export_run["act"], export_run["w_cfg"]
    cases = {  # lazily: some copy the workdir
        "both": lambda: ([wd, "--out", out, "--int8", "--fake-quant"], ["--int8", "--fake-quant"]),
        "out_dir": lambda: ([wd, "--out", str(tmp_path / "out")], ["is a directory"]),
        "missing_dir": lambda: ([wd, "--out", str(tmp_path / "nope" / "m.stablehlo")],
                                ["nope", "does not exist"]),
        "no_calibration_int8": lambda: (
            [_copy_run(export_run,tmp_path / "w"), "--out", out, "--int8"],
            ["calibration.json", 'stage("quantize", "quantize", quant={"mode": "ptq"})']),
        "no_calibration_fq": lambda: ([_copy_run(export_run,tmp_path / "w"), "--out", out, "--fake-quant"],
                                      ["--fake-quant", "calibration.json", "quantize"]),
        "other_step": lambda: (
            [_copy_run(export_run,tmp_path / "w", (act, w_cfg, {"step": 3})), "--out", out, "--int8"],
            ["step 3", "step 40"]),
        "4bit_int8": lambda: (
            [_copy_run(export_run,tmp_path / "w", (act, dataclasses.replace(w_cfg, bits=4), {})),
             "--out", out, "--int8"], ["8-bit", "--fake-quant"]),
        "no_workdir": lambda: ([str(tmp_path / "missing"), "--out", out], ["missing"]),
        "bad_step": lambda: ([wd, "--out", out, "--step", "3"], ["step=3"]),
    }
    args, needles = cases[case]()
    assert cli.main(["compress", "export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert os.listdir(tmp_path / "out") == []  # nothing written, not even a temporary file
    assert not (tmp_path / "nope").exists()
