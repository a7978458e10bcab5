"""Benchmarks run end to end at tiny sizes and produce the promised keys (no timing asserts)."""
import importlib.util
import json
import math

import pytest

from jaxaccel import cli
from jaxaccel.bench import compilation_cache, sweep, tables, timing, torch_cnn3, workload
from jaxaccel.bench.inference import bench_infer, resolve_skip
from jaxaccel.compress import int8 as i8
from jaxaccel.kernels import int8 as int8_cpu
from jaxaccel.bench.input_pipeline import bench_input
from jaxaccel.bench.scaling import bench_scaling

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


@pytest.mark.parametrize("argv,needles", [
    (["--model", "resnet99"], ["resnet99", "cnn3", "lenet5"]),
    (["--input-shape", "32x32"], ["32x32", "H,W,C"]),
    (["--input-shape", "32,32,0"], ["32,32,0"]),
    (["--conv-impl", "fastest"], ["fastest", "xla"]),
    (["--device-counts", "1,two"], ["1,two"]),
    (["--strategies", "data,tp"], ["tp", "fsdp"]),
    (["--repeats", "0"], ["--repeats 0"]),
])
def test_bad_input_is_one_line_exit_2(argv, needles, capsys):
    rc = cli.main(["bench", "train", *argv])
    assert rc == cli.EXIT_BAD_INPUT
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    for needle in needles:
        assert needle in err[0]


def test_parse_input_shape():
    assert workload.parse_input_shape("32, 32,3") == (32, 32, 3)
    assert workload.parse_input_shape((28, 28, 1)) == (28, 28, 1)
    for bad in ("32,32", "a,b,c", "1,2,3,4", "-1,2,3", ""):
        with pytest.raises(ValueError, match="input shape"):
            workload.parse_input_shape(bad)


def test_scaling_rows_for_each_strategy_and_count():
    # 12x12x1 matches no dataset: exercises the re-derived initialiser for other shapes.
    out = bench_scaling("lenet300_100", 8, (12, 12, 1), device_counts=(1, 2, 16),
                        strategies=("pmap",), warmup=0, repeats=1)
    rows = [(r["strategy"], r["devices"]) for r in out["results"]]
    assert rows == [("pmap", 1), ("pmap", 2)]
    assert out["results"][0]["vs_1_device"] == 1.0
    assert all(r["images_per_sec"] > 0 and r["step_ms_median"] > 0 for r in out["results"])
    assert any("16" in n for n in out["notes"])  # 16 devices do not exist: skipped, said so
    assert "data_8_vs_1" not in out and len(out["table"]["rows"]) == 2


def test_scaling_rejects_batch_not_divisible():
    with pytest.raises(ValueError, match="not divisible"):
        bench_scaling("lenet300_100", 6, (8, 8, 1), device_counts=(1, 4), warmup=0, repeats=1)


def test_input_bench_reports_ratio_to_training():
    out = bench_input("digits", 16, model="lenet300_100", warmup=0, repeats=2)
    assert [r["mode"] for r in out["results"]] == ["in-memory", "in-memory + crop/flip",
                                                    "from array_record"]
    assert out["input_images_per_sec"] > 0 and out["train_images_per_sec"] > 0
    assert out["input_vs_train"] == pytest.approx(out["input_images_per_sec"] / out["train_images_per_sec"])
    assert isinstance(out["goal_met"], bool) and out["image_shape"] == [8, 8, 1]


def test_input_bench_unknown_dataset():
    with pytest.raises(ValueError, match="imagenet42"):
        bench_input("imagenet42", 16, measure_train=False)


def test_infer_bench_variants_and_speedups():
    out = bench_infer("lenet300_100", 16, (8, 8, 1), sparsities=(0.5,), warmup=0, repeats=2)
    names = [r["variant"] for r in out["results"]]
    assert names[:2] == ["float32", "fake-quant"] and names[-1] == "pruned 50%"
    pruned = out["results"][-1]
    assert 0 < pruned["mac_fraction"] < 0.6  # 50% of each hidden width: about a quarter of fc2
    assert out["pruned_50_speedup"] > 0 and out["float32_ms_median"] > 0
    assert out["int8_float_layers"] == []  # every layer int8 by default
    if out["int8_speedup"] is None:
        assert "int8 skipped" in " ".join(out["notes"])
    else:
        int8 = next(r for r in out["results"] if r["variant"] == "int8")
        assert int8["top1_agreement_vs_fake_quant"] >= 0.9
        assert out["int8_conv_lowering"] == i8.resolve_conv_lowering("auto")
        ceiling = out["int8_ceiling"]  # the int8 layers (fc1, fc2, fc3) as plain matmuls
        assert ceiling["shapes_mkn"] == [[16, 64, 300], [16, 300, 100], [16, 100, 10]]
        assert ceiling["macs"] == 16 * 64 * 300 + 16 * 300 * 100 + 16 * 100 * 10
        assert ceiling["float32_ms_median"] > 0 and ceiling["int8_ms_median"] > 0
        if int8_cpu.available():  # the AVX2 kernel's time for the same matmuls, beside XLA's int8 dot
            assert ceiling["kernel_ms_median"] > 0 and ceiling["kernel_speedup"] > 0
            assert min(1.0, ceiling["kernel_speedup"]) <= ceiling["kernel_bound_speedup"] <= max(1.0, ceiling["kernel_speedup"])
        else:
            assert ceiling["kernel_speedup"] is None
        # Amdahl: the whole model gains less than its matmuls (or loses less, if int8 is slower).
        assert min(1.0, ceiling["speedup"]) <= ceiling["bound_speedup"] <= max(1.0, ceiling["speedup"])
        assert any("int8 ceiling" in n for n in out["notes"])


def test_resolve_skip():
    order = ["conv1", "conv2", "fc1"]
    assert resolve_skip("first", order) == ("conv1",)
    assert resolve_skip("none", order) == ()
    assert resolve_skip("conv2,fc1", order) == ("conv2", "fc1")
    with pytest.raises(ValueError, match="conv9"):
        resolve_skip("conv9", order)


def test_sweep_skips_with_a_clear_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jaxaccel.sweep" else real(name, *a))
    out = sweep.bench_sweep(2)
    assert out["skipped"] is True and "sweep.py does not exist" in out["reason"]
    assert out["table"]["rows"][0][0].startswith("skipped:")
    monkeypatch.undo()
    if sweep.sweep_support()[0] is not None:
        out = sweep.bench_sweep(2, experiment="/nonexistent.py")
        assert out["skipped"] is True and "not found" in out["reason"]


@pytest.mark.slow
def test_sweep_bench_sequential_vs_vectorized():
    out = sweep.bench_sweep(2, steps=5)
    assert out["skipped"] is False and out["vectorized_speedup"] > 0


def test_torch_comparison_skips_cleanly(monkeypatch):
    monkeypatch.setattr(torch_cnn3, "torch_available", lambda: False)
    step, why = torch_cnn3.try_make_step("cnn3", 8, (32, 32, 3))
    assert step is None and "pip install" in why
    step, why = torch_cnn3.try_make_step("resnet20", 8, (32, 32, 3))
    assert step is None and "cnn3" in why


def test_torch_cnn3_step_trains():
    pytest.importorskip("torch")
    step = torch_cnn3.make_step(8, (16, 16, 3), threads=1)
    losses = [step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_time_interleaved_takes_turns_and_counts():
    calls = []
    works = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = timing.time_interleaved(works, warmup=1, repeats=4, round_size=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert {k: len(v.samples_ms) for k, v in out.items()} == {"a": 4, "b": 4}
    t = timing.Timing((1.0, 2.0, 3.0, 10.0))
    assert t.median_ms == 2.5 and t.min_ms == 1.0 and t.iqr_ms > 0
    with pytest.raises(ValueError, match="repeats"):
        timing.time_calls(lambda: None, warmup=0, repeats=0)
    assert timing.ratio(3.0, 0.0) is None and timing.ratio(3.0, 2.0) == 1.5


def test_compilation_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.cache_dir().endswith("/.cache/jaxaccel/xla")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "xla"))
    assert compilation_cache.cache_dir() == str(tmp_path / "xla")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.cache_dir() is None
    assert compilation_cache.cache_dir(str(tmp_path)) == str(tmp_path)


@pytest.mark.slow
def test_compile_bench_cold_then_warm():
    out = compilation_cache.bench_compile("lenet300_100", 8, (8, 8, 1))
    assert out["cache_files"] > 0 and out["cold_compile_s"] > 0 and out["warm_compile_s"] >= 0


def test_report_markdown():
    table = {"title": "t", "columns": ["a", "b"], "rows": [["x|y", "1"]]}
    text = tables.markdown_result({"table": table, "notes": ["n1"]})
    assert text.splitlines()[:4] == ["### t", "", "| a | b |", "|---|---|"]
    assert "x\\|y" in text and text.endswith("- n1")


def test_step_flops_counts_model_flops_not_winograds_fewer():
    """MFU counts the model's FLOPs (the plain-Flax step); cnn3's Winograd convs on CPU execute fewer."""
    from jaxaccel.bench import training

    config = workload.bench_config("cnn3", 8, (16, 16, 3), conv_impl="winograd", strategy="data")
    setup = workload.bench_setup(config, (16, 16, 3))
    model_flops = training.step_flops(setup, 8, conv_impl="xla")
    executed = training.step_flops(setup, 8)
    # conv2 + conv3 forward MACs alone (3x3, 8x8x32->64 and 4x4x64->128), times 2 FLOPs
    assert model_flops > 2 * 8 * (8 * 8 * 9 * 32 * 64 + 4 * 4 * 9 * 64 * 128)
    assert executed < model_flops  # (XLA counts the transforms as dense 16x16 matmuls)


def test_resolved_conv_impl_is_the_models_own_auto_choice():
    import jax

    on_cpu = jax.default_backend() == "cpu"
    from jaxaccel.kernels import winograd

    cnn3_cpu = "cpu_kernel" if winograd.available() else "winograd"
    assert workload.resolved_conv_impl("auto", "cnn3") == (cnn3_cpu if on_cpu else "xla")
    assert workload.resolved_conv_impl("auto", "resnet20") == ("cpu" if on_cpu else "xla")
    assert workload.resolved_conv_impl("cpu", "cnn3") == "cpu"
