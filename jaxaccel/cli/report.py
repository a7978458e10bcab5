"""`jaxaccel report W`: rebuild a sweep's results.csv / results.md / plots from its point directories.

Imports `sweep.points` and `sweep.report`; never another subcommand's module.
"""
from __future__ import annotations

import argparse
import os

from jaxaccel.sweep import points
from jaxaccel.sweep.report import build, collect


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="a sweep's workdir (holding one sub-workdir per point)")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"report takes no --config overrides (got --config.{overrides[0]})")
    records = collect(args.workdir)
    if not records:
        raise ValueError(f"{args.workdir!r} holds no sweep points (no sub-workdirs with "
                         f"point.json, results.json or config.json)")
    paths = build(args.workdir, plots=not args.no_plots)
    done = sum(r.status == points.DONE for r in records)
    print(f"report: {done}/{len(records)} points done; wrote "
          + ", ".join(os.path.basename(p) for p in paths.values()))
    return 0
