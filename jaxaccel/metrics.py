"""Metric writers: `workdir/metrics.jsonl`, TensorBoard events, and a progress display.

`metrics.jsonl` holds one JSON object per line, appended and flushed per write, so a crash
never loses earlier rows. A crash mid-write can leave a torn last line: readers skip it and
the next writer starts on a fresh line. Each run (fresh or resumed) first appends a `start`
row naming the step it starts from; rows an earlier, crashed run wrote past that step
describe lost work, and `read_metrics` drops them (and keeps only the last copy of a row
written twice), so the history reads as one uninterrupted run. `raw=True` gives every line.

Owns `MetricWriter`, `read_metrics` and `Progress`. Imports only `io` of jaxaccel; never state,
the loop or anything above.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Iterator

from jaxaccel import io
from jaxaccel.workdir import METRICS_FILE

log = logging.getLogger("jaxaccel")

START = "start"  # split name of the row a run writes when it starts or resumes


class MetricWriter:
    """Appends `{"step", "split", **values}` rows to metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        torn = _ends_with_torn_line(path)
        self._file = open(path, "a")
        if torn:  # a crash cut the last row short: keep it on its own (skipped) line
            self._file.write("\n")
            self._file.flush()
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only writers need it
            self._tb = SummaryWriter(os.path.join(workdir, "events"))

    def write(self, step: int, values: dict[str, Any], *, prefix: str) -> None:
        if not self.enabled:
            return
        clean = io.to_jsonable(values)
        row = {"step": int(step), "split": prefix, "time": round(time.time(), 3), **clean}
        self._file.write(io.dumps(row, indent=None, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def mark_start(self, step: int) -> None:
        """Record that a run starts (or resumes) at `step`: later rows replace those past it."""
        self.write(step, {}, prefix=START)

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


def _ends_with_torn_line(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_metrics(workdir: str, *, raw: bool = False) -> Iterator[dict]:
    """Rows of `workdir/metrics.jsonl` as one consistent history; torn lines are skipped.

    Rows written before a `start` row at step s with a step > s are dropped (that work was
    lost and redone), a row written again for the same (split, step, stage) replaces the
    earlier copy, and `start` rows themselves are left out. `raw=True`: every parsed line.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    if raw:
        yield from rows
        return
    kept: list[dict | None] = []
    where: dict[tuple, int] = {}
    for row in rows:
        step = row.get("step")
        if row.get("split") == START:
            if isinstance(step, (int, float)):
                for i, r in enumerate(kept):
                    if r is not None and isinstance(r.get("step"), (int, float)) \
                            and r["step"] > step:
                        kept[i] = None
            continue
        key = (row.get("split"), step, str(row.get("stage")))
        if key in where:
            kept[where[key]] = None
        where[key] = len(kept)
        kept.append(row)
    yield from (r for r in kept if r is not None)


class Progress:
    """A tqdm bar with live metrics on a terminal; plain log lines otherwise, each prefixed
    with `label` (the stage name) so a log shows which stage a loss belongs to."""

    def __init__(self, total: int, start: int, *, enabled: bool = True, label: str = ""):
        self.enabled = enabled
        self.bar = None
        self.prefix = f"[{label}] " if label else ""
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            desc=label or None)
        self.last = start

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        shown = {k: row[k] for k in ("loss", "accuracy", "images_per_sec") if k in row}
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        else:
            print(f"{self.prefix}step {step}: "
                  + " ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
