"""jaxaccel.bench.input_pipeline: input throughput beside training's (no timing asserts)."""
import pytest

from jaxaccel.bench.input_pipeline import bench_input

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
