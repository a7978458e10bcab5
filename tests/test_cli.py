"""The `jaxaccel` command: bad input gives one line and exit status 2; workdirs survive."""
import os
import subprocess
import sys

import pytest

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_lenet5.py")


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxaccel", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "JAXACCEL_DEBUG": ""})


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("jaxaccel: error:") or "error:" in lines[-1], proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.mark.parametrize("override,needles", [
    ("--config.model.name=resnet99", ["resnet99", "cnn3", "lenet5"]),
    ("--config.dataset.name=imagenet42", ["imagenet42", "mnist5k"]),
    ("--config.optimizer.name=lion", ["lion", "adamw"]),
    ("--config.parallel.strategy=tp", ["tp", "fsdp", "pmap"]),
    ("--config.optimizer.lrr=0.1", ["optimizer.lrr", "optimizer.lr"]),
    ("--config.batch_size=abc", ["batch_size", "int"]),
    ("--config.batch_size=60", ["batch_size=60", "8"]),
    ("--config.dataset.name=image_folder", ["dataset.path"]),
])
def test_bad_input_one_line_exit_2(override, needles, tmp_path):
    wd = tmp_path / "wd"
    proc = run_cli("train", "--config", EXPERIMENT, "--workdir", str(wd), "--cpu-devices", "8",
                   override)
    assert_one_line_error(proc, *needles)
    assert not (wd / "checkpoints").exists()


def test_missing_config_file(tmp_path):
    proc = run_cli("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path))
    assert_one_line_error(proc, "nope.py")


def test_train_then_refuse_different_config_keeps_workdir(tmp_path):
    wd = tmp_path / "wd"
    # One device: this test is about the workdir, not sharding (and compiles 2-3x faster).
    ok = run_cli("train", "--config", EXPERIMENT, "--workdir", str(wd), "--cpu-devices", "1",
                 "--config.num_steps=10", "--config.log_every=5", "--config.progress=false",
                 "--config.eval_batch_size=120")
    assert ok.returncode == 0, ok.stderr
    assert "test_accuracy=" in ok.stdout
    before = {p: os.path.getmtime(p) for p in map(str, wd.rglob("*")) if os.path.isfile(p)}
    bad = run_cli("train", "--config", EXPERIMENT, "--workdir", str(wd), "--cpu-devices", "1",
                  "--config.num_steps=10", "--config.optimizer.lr=0.5",
                  "--config.eval_batch_size=120")
    assert_one_line_error(bad, "optimizer.lr", "--overwrite")
    after = {p: os.path.getmtime(p) for p in map(str, wd.rglob("*")) if os.path.isfile(p)}
    assert before == after


def test_datasets_lists_builtins():
    proc = run_cli("datasets")
    assert proc.returncode == 0, proc.stderr
    for name in ("digits", "mnist5k", "image_folder"):
        assert name in proc.stdout
