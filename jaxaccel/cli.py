"""The `jaxaccel` command: train | datasets (more subcommands join as they land).

Bad input ends with one line `jaxaccel: error: ...` and exit status 2, never a traceback
(set JAXACCEL_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxaccel", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) an experiment in a workdir",
                       description="Extra --config.KEY=VALUE arguments override config fields.")
    t.add_argument("--config", required=True, help="experiment file with get_config()")
    t.add_argument("--workdir", required=True, help="where checkpoints, metrics, results go")
    t.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate N CPU devices (sets parallel.cpu_devices)")
    t.add_argument("--overwrite", action="store_true",
                   help="discard a different experiment's checkpoints/metrics in --workdir")

    d = sub.add_parser("datasets", help="list datasets and whether each is prepared")
    d.add_argument("--data-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    known, extra = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if known.command == "train":
            return _train(known, overrides)
        if known.command == "datasets":
            return _datasets(known)
    except KeyboardInterrupt:
        print("jaxaccel: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
            FloatingPointError) as e:
        if os.environ.get("JAXACCEL_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxaccel: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _train(args, overrides: list[str]) -> int:
    from jaxaccel import config as config_lib
    from jaxaccel import parallel

    config = config_lib.load_experiment(args.config, overrides)
    if args.cpu_devices is not None:
        config.parallel.cpu_devices = args.cpu_devices
    config_lib.validate(config)
    parallel.set_cpu_devices(config.parallel.cpu_devices)  # before the backend starts

    from jaxaccel.train import train
    results = train(config, args.workdir, overwrite=args.overwrite)
    print(f"test_accuracy={results['test_accuracy']:.4f} test_loss={results['test_loss']:.4f} "
          f"steps={results['steps']} devices={results['num_devices']} "
          f"strategy={results['strategy']} workdir={args.workdir}")
    return 0


def _datasets(args) -> int:
    from jaxaccel import data
    for name, prepared in data.list_datasets(args.data_dir):
        print(f"{name:16s} {'prepared' if prepared else 'not prepared'}")
    print(f"{data.FOLDER_DATASET:16s} your folder: --config.dataset.path=ROOT "
          f"(ROOT/train/<class>/*.png, ROOT/test/<class>/*.png)")
    print(f"data dir: {data.default_data_dir(args.data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
