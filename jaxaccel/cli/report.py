"""`jaxaccel report W`: rebuild a sweep's results.csv / results.md / plots from its point
directories; on a search's workdir (`jaxaccel sweep --search`: W/search.json or W/study.db),
its search.md / trials.csv / plots from the study and its trials.

Imports `sweep.points`, `sweep.report` and (for a search) `sweep.search_report`; never another
subcommand's module.
"""
from __future__ import annotations

import argparse
import os

from jaxaccel.sweep import points
from jaxaccel.sweep.report import build, collect


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="a sweep's workdir (holding one sub-workdir per point), or "
                                   "a search's (jaxaccel sweep --search: search.json, study.db)")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"report takes no --config overrides (got --config.{overrides[0]})")
    if os.path.isdir(args.workdir):
        from jaxaccel.sweep import search_report
        if search_report.is_search(args.workdir):
            return run_search(args)
    records = collect(args.workdir)
    if not records:
        raise ValueError(f"{args.workdir!r} holds no sweep points (no sub-workdirs with "
                         f"point.json, results.json or config.json)")
    paths = build(args.workdir, plots=not args.no_plots)
    done = sum(r.status == points.DONE for r in records)
    print(f"report: {done}/{len(records)} points done; wrote "
          + ", ".join(os.path.basename(p) for p in paths.values()))
    return 0


def run_search(args: argparse.Namespace) -> int:
    """The report of a search: search.md, trials.csv and its plots."""
    from jaxaccel.sweep import search_report
    paths, body = search_report.build(args.workdir, plots=not args.no_plots)
    print("\n".join(search_report.summary(body)))
    print("report: wrote " + ", ".join(os.path.basename(p) for p in paths.values()))
    return 0
