"""Preemption: SIGTERM/SIGINT ask the train loop to checkpoint and stop cleanly.

A preempted TPU VM or a scheduler sends SIGTERM; the loop finishes its current step, saves
a checkpoint and the metrics so far, and raises `Preempted` (the CLI exits with status 3).
In a multi-process job every process must stop at the same step, so the flag is agreed on
with an all-gather.

Owns `PreemptionGuard` and `Preempted`. Imports nothing of jaxaccel; the loop, the pipeline,
sweeps and the CLI use it.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class Preempted(Exception):
    """The run was asked to stop; it saved a checkpoint at `step` and can be resumed."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} at step {step}; checkpoint saved — "
                         f"run the same command again to resume")
        self.step = step


class PreemptionGuard:
    """Context manager that records SIGTERM/SIGINT instead of dying mid-step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every process once any process has been signalled."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([local], np.int32))
        stop = bool(np.any(flags))
        if stop and self.signal_name is None:
            self.signal_name = "SIGTERM (another process)"
        return stop
