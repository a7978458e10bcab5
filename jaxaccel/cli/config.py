"""`jaxaccel config`: a resolved config, every key with its value, default, type, choices and meaning.

Imports config and io; never another subcommand's module.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace, overrides: list[str]) -> int:
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
