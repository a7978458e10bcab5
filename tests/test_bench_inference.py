"""jaxaccel.bench.inference: float32, fake-quant, int8 and pruned variants, their speedups
and the int8 ceiling (no timing asserts); which layers stay float."""
import pytest

from jaxaccel.bench.inference import bench_infer, resolve_skip
from jaxaccel.compress import int8 as i8
from jaxaccel.kernels import int8 as int8_cpu

def test_infer_bench_variants_and_speedups():
    out = bench_infer("lenet300_100", 16, (8, 8, 1), sparsities=(0.5,), warmup=0, repeats=2)
    names = [r["variant"] for r in out["results"]]
    assert names[:2] == ["float32", "fake-quant"] and names[-2] == "pruned 50%"
    pruned = out["results"][-2]
    clustered = out["results"][-1]  # decoded from a Huffman-coded package: dense float32
    assert clustered["variant"] == "clustered 5-bit (decoded)" and clustered["mac_fraction"] == 1
    assert out["clustered"]["decode_ms_median"] > 0
    assert out["clustered"]["package_file_bytes"] < out["clustered"]["dense_float32_bytes"] / 4
    assert any("clustered: every kernel shared among 32 values" in n for n in out["notes"])
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


def test_infer_bench_times_onnxruntime_beside_jaxaccel():
    """--compare-onnxruntime: the same model's ONNX float and int8 graphs run in ONNX Runtime,
    timed with the rest; their top-1 agrees with jaxaccel's own float32 / int8 (no timing
    asserts)."""
    pytest.importorskip("onnxruntime")
    out = bench_infer("lenet300_100", 16, (8, 8, 1), sparsities=(0.5,), warmup=0, repeats=2,
                      compare_onnxruntime=True)
    rows = {r["variant"]: r for r in out["results"]}
    assert rows["onnxruntime float32"]["top1_agreement_vs_jaxaccel_float32"] == 1.0
    if out["int8_speedup"] is not None:
        assert rows["onnxruntime int8"]["top1_agreement_vs_jaxaccel_int8"] >= 0.9
        assert set(out["vs_onnxruntime"]) == {"float32", "int8"}
    assert out["vs_onnxruntime"]["float32"] > 0 and out["onnxruntime_version"]
    assert any("ONNX Runtime" in n for n in out["notes"])


def test_resolve_skip():
    order = ["conv1", "conv2", "fc1"]
    assert resolve_skip("first", order) == ("conv1",)
    assert resolve_skip("none", order) == ()
    assert resolve_skip("conv2,fc1", order) == ("conv2", "fc1")
    with pytest.raises(ValueError, match="conv9"):
        resolve_skip("conv9", order)
