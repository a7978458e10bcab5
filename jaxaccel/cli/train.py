"""`jaxaccel train --config X.py --workdir W`: train (or resume) an experiment in a workdir.

Imports pipeline, config and parallel; never another subcommand's module.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "Extra --config.KEY=VALUE arguments override config fields."
    p.add_argument("--config", required=True, help="experiment file with get_config()")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics, results go")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate N CPU devices (sets parallel.cpu_devices)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a different experiment's checkpoints/metrics in --workdir")
    p.add_argument("--coordinator-address", default=None,
                   help="multi-process: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="multi-process: how many processes take part (or $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None,
                   help="multi-process: this process's index, 0..N-1 (or $JAX_PROCESS_ID)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxaccel import config as config_lib
    from jaxaccel import parallel

    config = config_lib.load_experiment(args.config, overrides)
    if args.cpu_devices is not None:
        config.parallel.cpu_devices = args.cpu_devices
    if args.coordinator_address is not None:
        config.distributed.coordinator_address = args.coordinator_address
    if args.num_processes is not None:
        config.distributed.num_processes = args.num_processes
    if args.process_id is not None:
        config.distributed.process_id = args.process_id
    config_lib.validate(config)
    parallel.set_cpu_devices(config.parallel.cpu_devices)  # before the backend starts

    from jaxaccel.pipeline import train
    results = train(config, args.workdir, overwrite=args.overwrite)
    print(f"test_accuracy={_number(results['test_accuracy'])} "
          f"test_loss={_number(results['test_loss'])} steps={results['steps']} "
          f"devices={results['num_devices']} strategy={results['strategy']} "
          f"workdir={args.workdir}")
    return 0


def _number(x) -> str:
    """A result for the summary line: 4 decimals, or `nan` for a non-finite (null) value."""
    return "nan" if x is None else f"{x:.4f}"
