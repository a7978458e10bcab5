"""Metric writers: `workdir/metrics.jsonl`, TensorBoard events, and a progress display.

`metrics.jsonl` holds one JSON object per line, appended and flushed per write, so a crash
never loses earlier rows; `read_metrics` skips a torn last line.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterator

log = logging.getLogger("jaxaccel")


class MetricWriter:
    """Appends `{"step", "split", **values}` rows to metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only writers need it
            self._tb = SummaryWriter(os.path.join(workdir, "events"))

    def write(self, step: int, values: dict[str, Any], *, prefix: str) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in values.items()}
        row = {"step": int(step), "split": prefix, "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    f = float(v)
    return None if math.isnan(f) or math.isinf(f) else f


def read_metrics(workdir: str) -> Iterator[dict]:
    """Rows of `workdir/metrics.jsonl`; a torn (half-written) line is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


class Progress:
    """A tqdm bar with live metrics on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, *, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        shown = {k: row[k] for k in ("loss", "accuracy", "images_per_sec") if k in row}
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        else:
            print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()),
                  flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
