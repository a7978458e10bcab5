"""scripts/gpu_check.sh needs a GPU; here --dry-run prints its commands in order and runs none.

Every program the script could run (python, pip, nvidia-smi, timeout, rm) is a stub on PATH
that leaves a mark when called; the dry run must leave none and create no output folder.
The table half of scripts/gpu_check.py (pure Python) is tested on rows like the script's.
"""
import importlib.util
import json
import os
import stat
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STUBS = ("python3", "python", "pip", "nvidia-smi", "timeout", "rm", "mkdir")


@pytest.fixture
def stubs(tmp_path):
    """A PATH of stubs that record their calls in tmp_path/called, and a stub PY."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marks = tmp_path / "called"
    for name in STUBS + ("py",):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{marks}"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir, marks


def dry(stubs, tmp_path, *args, cpu=True):
    bin_dir, _ = stubs
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "DEMO_STEPS")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", PY=str(bin_dir / "py"))
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path / "out"), *args],
                          check=False, capture_output=True, text=True, timeout=30, env=env)


def test_dry_run_on_cpu_prints_every_step_in_order_and_runs_nothing(stubs, tmp_path):
    p = dry(stubs, tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout.replace("\\", "")
    order = ["pip install -q -e .[bench,onnx]",
             "would skip the CUDA install",
             "nvidia-smi --query-gpu=name,memory.total",
             "-m jaxaccel train --config experiments/mnist5k_cnn3.py --workdir " + str(tmp_path / "out" / "demo"),
             "-m jaxaccel bench train --compare-torch",
             "gpu_check.py train-bf16",
             "gpu_check.py train-torch-cuda",
             "-m jaxaccel bench infer",
             "-m jaxaccel compress export " + str(tmp_path / "out" / "demo") + " --format onnx",
             "gpu_check.py onnx-session",
             "gpu_check.json"]
    positions = [out.find(needle) for needle in order]
    assert -1 not in positions, [n for n, i in zip(order, positions) if i == -1]
    assert positions == sorted(positions), out
    assert "pip install -q -U jax[cuda12]" not in out and "pip install -q onnxruntime-gpu" not in out
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
    assert not (tmp_path / "out").exists()


def test_dry_run_for_a_gpu_pins_the_cuda_jax_to_the_installed_version(stubs, tmp_path):
    p = dry(stubs, tmp_path, cpu=False)
    assert p.returncode == 0, p.stderr
    out = p.stdout.replace("\\", "")
    # the stub python answers the version query with nothing: a placeholder is printed
    assert "pip install -q -U jax[cuda12]==JAX_VERSION" in out
    assert out.index("jax[cuda12]") < out.index("onnxruntime-gpu") < out.index("jaxaccel train")
    assert "would skip the CUDA install" not in out
    calls = (tmp_path / "called").read_text().splitlines()  # only that read-only query
    assert len(calls) == 1 and calls[0].startswith("py -c import importlib.metadata")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [("--bogus",), ("--out",)])
def test_a_bad_argument_is_a_one_line_usage_error(stubs, tmp_path, args):
    p = subprocess.run(["bash", SCRIPT, *args], check=False, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stdout == "" and len(p.stderr.splitlines()) == 1 and p.stderr.startswith("usage:")


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_is_markdown_and_strict_json(tmp_path, capsys):
    helper = _helper()
    rows = tmp_path / "steps.tsv"
    rows.write_text("demo\tok\t41\ttest accuracy 0.98 | 400 steps\tpython -m jaxaccel train\tdemo.log\n"
                    "torch-cuda\tskipped\t2\tnot available: no CUDA\t\t\n"
                    "infer\tfailed\tnan\texit 1: boom\tx\t\n")
    assert helper.main(["table", str(rows), "--json", str(tmp_path / "t.json"), "--gpu",
                        "NVIDIA H200, 143771 MiB", "--budget-s", "480", "--elapsed-s", "61"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("GPU: NVIDIA H200, 143771 MiB;") and "61 s of a 480 s budget" in text
    assert "| step | status | seconds | key figure |" in text
    assert "| demo | ok | 41 | test accuracy 0.98 \\| 400 steps |" in text
    data = json.loads((tmp_path / "t.json").read_text(), parse_constant=pytest.fail)
    assert data["counts"] == {"ok": 1, "failed": 1, "skipped": 1}
    assert [s["status"] for s in data["steps"]] == ["ok", "skipped", "failed"]
    assert data["steps"][2]["seconds"] is None


def test_train_figure_says_pytorch_ran_on_the_cpu(tmp_path, capsys):
    helper = _helper()
    r = {"step_ms_median": 1.5, "train_images_per_sec": 85000.0, "mfu": 0.02, "conv_impl": "auto",
         "conv_impl_resolved": "xla", "jax_vs_torch_speed": 9.0, "torch_version": "2.13.0",
         "torch_step_ms_median": 13.5}
    (tmp_path / "train.json").write_text(json.dumps(r))
    assert helper.main(["figure", "train", str(tmp_path / "train.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("FIGURE: 1.50 ms/step, 85000 img/s, MFU 2.0 %") and "torch ran on the CPU" in line
    assert helper.main(["figure", "demo", str(tmp_path / "missing")]) == 1
