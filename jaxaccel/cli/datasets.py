"""`jaxaccel datasets`: every dataset, its kind and whether it is prepared.

Imports data; never another subcommand's module.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="where prepared datasets live (default $JAXACCEL_DATA_DIR, "
                        "else ~/.cache/jaxaccel/tfds)")


_KIND_WORDS = {"builtin": "built-in", "catalog": "catalog", "folder": "folder"}
_FIRST_USE = "built on first use (offline)"


def run(args: argparse.Namespace, overrides: list[str]) -> int:
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
