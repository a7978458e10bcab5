"""The `jaxaccel` command: `main` parses the command line and runs the subcommand's module
(`jaxaccel.cli.<name>`: `add_arguments(parser)` declares its flags, `run(args, overrides)`
makes one library call and prints). Only this package holds argparse.

Bad input ends with one line `jaxaccel: error: ...` and exit status 2, never a traceback
(set JAXACCEL_DEBUG=1 to see one). A preempted run (SIGTERM/SIGINT) saves a checkpoint
and exits with status 3; running the same command again resumes it.

Owns `main`, `build_parser`, `COMMANDS` (name -> module, help) and the exit statuses. Imports
`compilation_cache`, `preemption` and its subcommand modules (by name, lazily); nothing but
`__main__` imports it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import warnings

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3

# name -> (module with `add_arguments(parser)` and `run(args, overrides) -> int`, help).
# Modules import lazily so `jaxaccel --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jaxaccel.cli.train", "train (or resume) an experiment in a workdir"),
    "datasets": ("jaxaccel.cli.datasets", "list datasets and whether each is prepared"),
    "config": ("jaxaccel.cli.config", "print a resolved config: every key with its value, "
                                      "default, type, choices and meaning"),
    "bench": ("jaxaccel.cli.bench", "time training, scaling, input, inference; print tables, "
                                    "write JSON"),
    "compress": ("jaxaccel.cli.compress", "per-layer compression report; compressed checkpoint "
                                          "package; StableHLO export; layer sensitivity"),
    "sweep": ("jaxaccel.cli.sweep", "run every point of an experiment's get_sweep() in "
                                    "sub-workdirs, or an Optuna search over its "
                                    "get_search() (--search)"),
    "report": ("jaxaccel.cli.report", "rebuild a sweep's results.csv/md and plots from its "
                                      "sub-workdirs, or a search's search.md, trials.csv and "
                                      "plots from its study"),
}


def build_parser() -> argparse.ArgumentParser:
    """The whole `jaxaccel` argument parser, every subcommand included (public so tests and
    docs can walk it, e.g. to check that every flag has help)."""
    p = argparse.ArgumentParser(prog="jaxaccel", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(sp)
    return p


def _ignore_closed_loop_callbacks(unraisable: "sys.UnraisableHookArgs") -> None:
    """Drop tensorstore's completion callbacks that reach an asyncio loop orbax already closed
    (after a failed background save): harmless, and otherwise a traceback each on stderr."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _last_words(line: str, program: bool) -> None:
    """Print `line`; as a program (not called from Python), also make it the last thing on
    stderr: background threads still finishing (orbax's save threads after a failed write)
    must not log or print tracebacks after it before the process exits, nor warnings (an orbax
    coroutine left unawaited by the failed save warns when it is collected at exit)."""
    if program:
        logging.disable(logging.CRITICAL)
        sys.unraisablehook = lambda _: None
        threading.excepthook = lambda _: None
        warnings.simplefilter("ignore")
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command in `argv` (None: this process's command line, i.e. run as a program)."""
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known, extra = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if program:
        sys.unraisablehook = _ignore_closed_loop_callbacks
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from jaxaccel.compilation_cache import enable_compilation_cache
    from jaxaccel.preemption import Preempted
    enable_compilation_cache()  # before anything compiles; $JAXACCEL_COMPILATION_CACHE=off disables
    module = importlib.import_module(COMMANDS[known.command][0])
    from jaxaccel.kernels.build import isa_cap
    try:
        isa_cap()  # a bad $JAXACCEL_KERNEL_ISA is refused before anything runs
        return module.run(known, overrides)
    except Preempted as e:
        _last_words(f"jaxaccel: {e}", program)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("jaxaccel: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError,
            FloatingPointError) as e:
        if os.environ.get("JAXACCEL_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        _last_words(f"jaxaccel: error: {message}", program)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
