"""`jaxaccel bench` (jaxaccel.cli.bench): a benchmark end to end at tiny sizes writes the
promised JSON keys and prints its table (no timing asserts); bad input is one line, exit 2."""
import json

import pytest

from jaxaccel import cli

TINY = ["--batch-size", "8", "--input-shape", "8,8,1", "--warmup", "0", "--repeats", "2",
        "--matmul-size", "32"]


def test_cli_train_writes_json_with_promised_keys(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "train", "--model", "lenet300_100", *TINY, "--compare-torch",
                   "--json", str(path)])
    assert rc == 0
    out = json.loads(path.read_text())
    for key in ("train_images_per_sec", "step_ms_median", "compile_s", "flops_per_step",
                "matmul_peak_gflops", "mfu", "machine", "command"):
        assert out[key] is not None, key
    assert out["bench"] == "train" and out["step_repeats"] == 2
    assert out["train_images_per_sec"] == pytest.approx(8 / (out["step_ms_median"] / 1000))
    # The timed function is the project's train step: it counts steps and learns.
    assert out["steps_run"] == 1 + 0 + 2 and out["final_loss"] < out["first_loss"]
    # Forward + weight gradients of the three matmuls at least (XLA's count of the whole step).
    assert out["flops_per_step"] > 2 * 2 * 8 * (64 * 300 + 300 * 100) and 0 < out["mfu"]
    assert "jax_vs_torch_speed" not in out and "cnn3" in out["torch_status"]
    assert any("PyTorch comparison skipped" in n for n in out["notes"])
    assert any("no convolutions" in n for n in out["notes"]) and "conv_impl_speedup" not in out
    assert out["command"].startswith("jaxaccel bench train") and "--compare-torch" in out["command"]
    printed = capsys.readouterr().out
    assert "| train step (median, IQR) |" in printed and "model FLOPs utilisation" in printed


def test_cli_train_with_distill(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "train", "--model", "lenet300_100", *TINY, "--distill",
                   "--student-width", "0.5", "--json", str(path)])
    assert rc == 0
    out = json.loads(path.read_text())
    assert out["bench"] == "train" and set(out["with"]) == {"distill"}
    modes = out["with"]["distill"]["modes"]
    assert set(modes) == {"no teacher", "teacher in the step", "precomputed logits"}
    assert all(m["steps_run"] == 1 + 0 + 2 and m["step_ms_median"] > 0 for m in modes.values())
    # The same teacher on the same batch: logits in the step or precomputed train the same.
    assert modes["teacher in the step"]["final_loss"] == pytest.approx(
        modes["precomputed logits"]["final_loss"], rel=1e-4)
    assert modes["no teacher"]["final_loss"] != pytest.approx(
        modes["precomputed logits"]["final_loss"], rel=1e-3)
    assert "| teacher in the step |" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_train_with_ensemble(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "train", "--model", "lenet300_100", *TINY, "--ensemble", "2",
                   "--ensemble-steps", "3", "--json", str(path)])
    assert rc == 0
    ens = json.loads(path.read_text())["with"]["ensemble"]
    assert ens["members"] == 2 and ens["separate_s"] > 0 and ens["ensemble_s"] > 0
    # The ensemble's members are the separate runs (same seeds), trained as one program.
    assert ens["member_test_accuracy"] == pytest.approx(ens["separate_test_accuracy"], abs=0.02)
    assert "| one ensemble run |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needles", [
    (["--model", "resnet99"], ["resnet99", "cnn3", "lenet5"]),
    (["--input-shape", "32x32"], ["32x32", "H,W,C"]),
    (["--input-shape", "32,32,0"], ["32,32,0"]),
    (["--conv-impl", "fastest"], ["fastest", "xla"]),
    (["--device-counts", "1,two"], ["1,two"]),
    (["--strategies", "data,tp"], ["tp", "fsdp"]),
    (["--repeats", "0"], ["--repeats 0"]),
    (["--ensemble", "1"], ["--ensemble 1", ">= 2"]),
    (["--student-width", "0"], ["--student-width 0"]),
    (["--search"], ["--search", "bench sweep"]),
])
def test_bad_input_is_one_line_exit_2(argv, needles, capsys):
    rc = cli.main(["bench", "train", *argv])
    assert rc == cli.EXIT_BAD_INPUT
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0]
