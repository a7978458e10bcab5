"""jaxaccel.bench.sweep: sequential vs vectorized sweeps, skipped with a clear message when
it cannot run."""
import importlib.util

import pytest

from jaxaccel.bench import sweep

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
