"""`jaxaccel sweep --config X.py --workdir W`: every point of an experiment's get_sweep().

Imports sweep (and `sweep.report`) and parallel; never another subcommand's module.
"""
from __future__ import annotations

import argparse

from jaxaccel import sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Extra --config.KEY=VALUE arguments apply to every point. Exit status: 0 all "
                "points done, 1 some failed, 2 bad input, 3 preempted.")
    p.add_argument("--config", required=True, help="experiment file with get_config() and "
                   "get_sweep()")
    p.add_argument("--workdir", required=True, help="the sweep's directory; one sub-workdir "
                   "per point")
    p.add_argument("--workers", type=int, default=0,
                   help="run points in N `jaxaccel train` processes (default: in this process)")
    p.add_argument("--vectorize", nargs="?", const="auto", default=None,
                   choices=("auto", "vmap", "loop"),
                   help="train all pending points as one compiled program (only keys that do "
                        "not change shapes may vary); vmap: batched over the points (GPU/TPU), "
                        "loop: one point after another inside the program (CPU); auto picks")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate N CPU devices (sets parallel.cpu_devices)")
    p.add_argument("--no-report", action="store_true", help="skip results.csv/md and plots")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxaccel import parallel
    if args.workers < 0:
        raise ValueError(f"--workers={args.workers} must be >= 0")
    overrides = list(overrides)
    if args.cpu_devices is not None:
        overrides.append(f"parallel.cpu_devices={args.cpu_devices}")
        if not args.workers:
            parallel.set_cpu_devices(args.cpu_devices)  # before the backend starts
    result = sweep.run(args.config, args.workdir, overrides=overrides, workers=args.workers,
                 vectorize=args.vectorize, report=not args.no_report)
    if not args.no_report:  # the table of results.md, so the results are seen at once
        from jaxaccel.sweep import report as report_lib
        print("\n".join(report_lib.results_table(report_lib.collect(args.workdir))) + "\n")
    done = sum(r.status == sweep.DONE for r in result.runs)
    print(f"sweep: {done}/{len(result.runs)} points done ({len(result.skipped)} finished "
          f"before), {len(result.failed)} failed; workdir={args.workdir}")
    for r in result.failed:
        print(f"  failed {r.name}: {r.error}")
    return 1 if result.failed else 0
