"""jaxaccel.bench.torch_cnn3: the optional PyTorch comparison trains, or skips cleanly."""
import math

import pytest

from jaxaccel.bench import torch_cnn3

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
