"""jaxaccel.bench.scaling: rows per strategy and device count (no timing asserts)."""
import pytest

from jaxaccel.bench.scaling import bench_scaling

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
