"""`jaxaccel sweep --config X.py --workdir W`: every point of an experiment's get_sweep();
with `--search tpe|random|grid|cmaes --trials N`, an Optuna study over its get_search().

Imports sweep (and `sweep.report`, `sweep.search`) and parallel; never another subcommand's
module.
"""
from __future__ import annotations

import argparse

from jaxaccel import sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Extra --config.KEY=VALUE arguments apply to every point (every trial). Exit "
                "status: 0 all points (trials) done, 1 some failed, 2 bad input, 3 preempted.")
    p.add_argument("--config", required=True, help="experiment file with get_config() and "
                   "get_sweep() (get_search() with --search)")
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
    r = p.add_argument_group("engine (where the points run)")
    r.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this machine (in this process, or --workers); ray: each point "
                        "a Ray task on a cluster (pip install -e '.[ray]')")
    r.add_argument("--address", default=None,
                   help="HOST:PORT of a running Ray cluster's head (default: start a local "
                        "Ray for this sweep and stop it after)")
    r.add_argument("--trial-cpus", type=float, default=None,
                   help="--engine ray: CPUs each point asks Ray for (default 1; one point per "
                        "slot)")
    r.add_argument("--trial-gpus", type=float, default=None,
                   help="--engine ray: GPUs each point asks Ray for (default 0; Ray sets "
                        "CUDA_VISIBLE_DEVICES)")
    s = p.add_argument_group("search (an Optuna study over the experiment's get_search())")
    s.add_argument("--search", default=None, choices=("tpe", "random", "grid", "cmaes"),
                   help="sample get_search()'s space with this Optuna sampler instead of "
                        "running get_sweep()'s points (grid: every key a choice; cmaes: no "
                        "choice keys); trials train one after another in WORKDIR/trials/")
    s.add_argument("--trials", type=int, default=None,
                   help="trials in total, those of earlier runs of the same search included "
                        "(a rerun resumes the study)")
    s.add_argument("--objective", default="validation_accuracy",
                   choices=("validation_accuracy", "validation_loss"),
                   help="what the study optimizes: validation accuracy (maximized) or loss "
                        "(minimized); never the test split")
    s.add_argument("--pruner", default="none", choices=("asha", "hyperband", "median", "none"),
                   help="stop unpromising trials early, judged at the evaluations every "
                        "eval_every steps (asha: successive halving)")
    s.add_argument("--storage", default=None,
                   help="Optuna storage URL (default sqlite:///WORKDIR/study.db)")
    s.add_argument("--study-seed", type=int, default=0, help="the sampler's seed")
    s.add_argument("--run-trial", type=int, default=None, metavar="N",
                   help="train only trial N, already asked by a search on Ray (what its Ray "
                        "tasks run)")
    s.add_argument("--vectorize-trials", type=int, default=None, metavar="K",
                   help="with --vectorize: ask K suggestions at once (default 4) and train "
                        "them as one compiled program (searched keys must keep shapes; no "
                        "pruner)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxaccel import parallel
    if args.workers < 0:
        raise ValueError(f"--workers={args.workers} must be >= 0")
    if args.engine != "ray":  # nothing a user wrote is silently ignored
        ray_only = [f for f, v in (("--trial-cpus", args.trial_cpus),
                                   ("--trial-gpus", args.trial_gpus)) if v is not None]
        if ray_only:
            raise ValueError(f"{ray_only[0]} sets what a Ray task asks for: add --engine ray")
    if args.search:
        return run_search(args, overrides)
    given = [f for f, v in (("--trials", args.trials), ("--storage", args.storage),
                            ("--pruner", None if args.pruner == "none" else args.pruner),
                            ("--objective", None if args.objective == "validation_accuracy"
                             else args.objective),
                            ("--study-seed", args.study_seed or None),
            ("--vectorize-trials", args.vectorize_trials), ("--run-trial", args.run_trial)
            ) if v is not None]
    if given:
        raise ValueError(f"{given[0]} belongs to a search: add --search tpe|random|grid|cmaes")
    overrides = list(overrides)
    if args.cpu_devices is not None:
        overrides.append(f"parallel.cpu_devices={args.cpu_devices}")
        if not args.workers:
            parallel.set_cpu_devices(args.cpu_devices)  # before the backend starts
    result = sweep.run(args.config, args.workdir, overrides=overrides, workers=args.workers,
                       vectorize=args.vectorize, report=not args.no_report,
                       engine=args.engine, address=args.address, **_trial_resources(args))
    if not args.no_report:  # the table of results.md, so the results are seen at once
        from jaxaccel.sweep import report as report_lib
        print("\n".join(report_lib.results_table(report_lib.collect(args.workdir))) + "\n")
    done = sum(r.status == sweep.DONE for r in result.runs)
    print(f"sweep: {done}/{len(result.runs)} points done ({len(result.skipped)} finished "
          f"before), {len(result.failed)} failed; workdir={args.workdir}")
    for r in result.failed:
        print(f"  failed {r.name}: {r.error}")
    return 1 if result.failed else 0


def run_search(args: argparse.Namespace, overrides: list[str]) -> int:
    """An Optuna study (`sweep.search.run`); prints its trials and the best one."""
    if args.workers:
        raise ValueError("--search trains its trials in this process (one after another, or "
                         "K at once with --vectorize); --workers is not supported with it")
    if args.trials is None:
        raise ValueError("--search needs --trials N (trials in total)")
    if args.vectorize_trials is not None and not args.vectorize:
        raise ValueError(f"--vectorize-trials {args.vectorize_trials} is how many trials "
                         f"--vectorize trains as one program: add --vectorize")
    from jaxaccel import parallel
    from jaxaccel.sweep import search
    overrides = list(overrides)
    if args.cpu_devices is not None:
        overrides.append(f"parallel.cpu_devices={args.cpu_devices}")
        parallel.set_cpu_devices(args.cpu_devices)  # before the backend starts
    if args.run_trial is not None:  # one trial, in a sweep's Ray task
        search.run_one_trial(args.config, args.workdir, args.run_trial, sampler=args.search,
                             trials=args.trials, objective=args.objective, pruner=args.pruner,
                             storage=args.storage, study_seed=args.study_seed,
                             overrides=overrides)
        return 0
    result = search.run(args.config, args.workdir, sampler=args.search, trials=args.trials,
                        objective=args.objective, pruner=args.pruner, storage=args.storage,
                        study_seed=args.study_seed, overrides=overrides,
                        vectorize=args.vectorize, per_program=args.vectorize_trials or 4,
                        engine=args.engine, address=args.address, **_trial_resources(args))
    if not args.no_report:  # search.md, trials.csv and plots, as `jaxaccel report W` builds
        from jaxaccel.sweep import search_report
        search_report.build(args.workdir)
    print("\n".join(search.table(result.record)))
    c = result.record["counts"]
    print(f"search: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed "
          f"({len(result.ran)} trained now); workdir={args.workdir}")
    for t in result.failed:
        print(f"  failed trial {t['number']}: {t.get('error', '')}")
    return 1 if result.failed else 0


def _trial_resources(args: argparse.Namespace) -> dict[str, float]:
    """--trial-cpus / --trial-gpus as given, else Ray's defaults here: 1 CPU, no GPU."""
    return {"trial_cpus": 1.0 if args.trial_cpus is None else args.trial_cpus,
            "trial_gpus": 0.0 if args.trial_gpus is None else args.trial_gpus}
