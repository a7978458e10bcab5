"""The cnn3 train step in PyTorch eager, for `--compare-torch` (optional: `pip install '.[bench]'`).

Same layers as `jaxaccel.models.CNN3` (3×3 SAME conv + ReLU + 2×2 max-pool, ×3 with 32/64/128
channels, fc 128 + ReLU, fc 10), same loss (softmax cross-entropy, mean) and optimizer (Adam,
lr 1e-3), channels-last memory format, as many intra-op threads as cores. Only the timing is
compared; the weights are PyTorch's own initialisation.

Owns `make_step` / `try_make_step`. Imports nothing of jaxaccel (torch only, inside functions).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Sequence

NUM_CLASSES = 10


def torch_available() -> bool:
    """Whether PyTorch can be imported (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def torch_version() -> str | None:
    if not torch_available():
        return None
    import torch

    return torch.__version__


def torch_threads() -> int | None:
    if not torch_available():
        return None
    import torch

    return torch.get_num_threads()


def make_step(batch_size: int, input_shape: Sequence[int], *, features: Sequence[int] = (32, 64, 128),
              hidden: int = 128, lr: float = 1e-3, threads: int | None = None,
              seed: int = 0) -> Callable[[], float]:
    """A function running one Adam step of cnn3 on a fixed batch; returns the loss.

    PyTorch's CPU ops are synchronous, so when it returns the step is done.
    """
    import torch
    from torch import nn

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    h, w, c = (int(v) for v in input_shape)
    layers: list[nn.Module] = []
    cin = c
    for f in features:
        layers += [nn.Conv2d(cin, f, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin = f
        h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(cin * h * w, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)]
    model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.randn(batch_size, c, *input_shape[:2]).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch_size,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def try_make_step(model: str, batch_size: int, input_shape: Sequence[int]) -> tuple[Callable | None, str]:
    """(step, "ok") or (None, why the comparison is skipped)."""
    if model != "cnn3":
        return None, f"the PyTorch comparison exists for cnn3 only, not {model!r}"
    if not torch_available():
        return None, "torch is not installed (pip install '.[bench]' pulls torch==2.13.0, the CPU build)"
    h, w, _ = input_shape
    if h < 8 or w < 8:
        return None, f"input {h}×{w} is too small for cnn3's three 2×2 pools"
    return make_step(batch_size, input_shape), "ok"
