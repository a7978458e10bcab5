"""The core subcommands: `jaxaccel train` and `jaxaccel datasets`."""
from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
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


def run_train(args: argparse.Namespace, overrides: list[str]) -> int:
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

    from jaxaccel.train import train
    results = train(config, args.workdir, overwrite=args.overwrite)
    print(f"test_accuracy={_number(results['test_accuracy'])} "
          f"test_loss={_number(results['test_loss'])} steps={results['steps']} "
          f"devices={results['num_devices']} strategy={results['strategy']} "
          f"workdir={args.workdir}")
    return 0


def _number(x) -> str:
    """A result for the summary line: 4 decimals, or `nan` for a non-finite (null) value."""
    return "nan" if x is None else f"{x:.4f}"


def add_datasets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="where prepared datasets live (default $JAXACCEL_DATA_DIR, "
                        "else ~/.cache/jaxaccel/tfds)")


_KIND_WORDS = {"builtin": "built-in", "catalog": "catalog", "folder": "folder"}
_FIRST_USE = "built on first use (offline)"


def run_datasets(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print every dataset, what it is, and whether it is prepared; prepares nothing.

    "Not prepared" is only said of catalog datasets, the ones a run cannot build itself.
    """
    from jaxaccel import data
    data_dir = data.default_data_dir(args.data_dir)
    rows = [("dataset", "kind", "status")]
    missing_catalog = False
    for d in data.list_datasets(data_dir):
        if d.prepared:
            status = "prepared"
        elif d.kind == "catalog":
            status = (f"not prepared: needs `tfds build {d.name}` on a machine with internet "
                      "(see README)")
            missing_catalog = True
        else:
            status = _FIRST_USE
        rows.append((d.name, _KIND_WORDS.get(d.kind, d.kind), status))
    usage = (f"--config.dataset.name={data.FOLDER_DATASET} --config.dataset.path=ROOT "
             "(ROOT/train/<class>/*.png, ROOT/test/<class>/*.png)")
    rows.append((data.FOLDER_DATASET, _KIND_WORDS["folder"], f"{_FIRST_USE}: {usage}"))
    for name, kind, status in rows:
        print(f"{name:16s} {kind:9s} {status}")
    print(f"data dir: {data_dir}")
    if missing_catalog:
        print("catalog datasets are never downloaded by jaxaccel: where there is internet, run "
              f"`tfds build NAME --file_format=array_record --data_dir=DIR`, then copy "
              f"DIR/NAME into {data_dir} (or pass --config.dataset.data_dir=DIR)")
    return 0


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Extra --config.KEY=VALUE arguments override config fields, as for train. Each "
                "line reads KEY = VALUE  # type, default, choices: meaning; VALUE is written as "
                "--config.KEY=VALUE takes it.")
    p.add_argument("--config", dest="experiment", default=None,
                   help="experiment file with get_config() (default: the built-in defaults)")
    p.add_argument("--changed", action="store_true",
                   help="only the keys whose value differs from the default")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per key (key, value, default, type, choices, "
                        "help) instead of the annotated listing")


def run_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxaccel import config as config_lib

    if args.experiment:
        config = config_lib.load_experiment(args.experiment, overrides)
    else:
        config = config_lib.default_config()
        config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    rows = config_lib.describe(config)
    from jaxaccel import io
    if args.changed:
        rows = [r for r in rows if r["value"] != io.to_jsonable(r["default"])]
    for row in rows:
        print(io.dumps(row, indent=None, sort_keys=False) if args.json else _config_line(row))
    return 0


def _config_line(row: dict) -> str:
    """`key = value  # type, default …, one of …: help` (value as --config.key=value takes it)."""
    from jaxaccel import io

    def literal(v):
        return repr(tuple(v)) if isinstance(v, list) and row["type"] == "tuple" else repr(v)
    notes = [row["type"]]
    if row["default"] is not None and io.to_jsonable(row["default"]) != row["value"]:
        notes.append(f"default {literal(io.to_jsonable(row['default']))}")
    if row["choices"]:
        notes.append("one of " + "|".join(map(str, row["choices"])))
    return f"{row['key']} = {literal(row['value'])}  # {', '.join(notes)}: {row['help']}"

