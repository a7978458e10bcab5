"""The `jaxaccel` command (jaxaccel.cli): every flag has help; bad input gives one line
`jaxaccel: error: ...` and exit status 2 (a traceback only with JAXACCEL_DEBUG); a preempted
run exits with 3. Subcommands: tests/test_cli_<name>.py, and beside the library module a
command drives (compress: test_artifacts.py; sweep: test_sweep_runners.py,
test_sweep_vectorized.py; report: test_sweep_report.py)."""
import argparse
import os

import pytest

from jaxaccel import cli
from jaxaccel.preemption import Preempted
from tiny_runs import assert_one_line_error, run_cli

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_lenet5.py")




@pytest.mark.parametrize("override,needles", [
    ("--config.model.name=resnet99", ["resnet99", "cnn3", "lenet5"]),
    ("--config.dataset.name=imagenet42", ["imagenet42", "mnist5k"]),
    ("--config.optimizer.name=lion", ["lion", "adamw"]),
    ("--config.parallel.strategy=tp", ["tp", "fsdp", "pmap"]),
    ("--config.optimizer.lrr=0.1", ["optimizer.lrr", "optimizer.lr"]),
    ("--config.batch_size=abc", ["batch_size", "int"]),
    ("--config.batch_size=60", ["batch_size=60", "8"]),
    ("--config.dataset.name=image_folder", ["dataset.path"]),
])
def test_bad_input_one_line_exit_2(override, needles, tmp_path):
    wd = tmp_path / "wd"
    proc = run_cli("train", "--config", EXPERIMENT, "--workdir", str(wd), "--cpu-devices", "8",
                   override)
    assert_one_line_error(proc, *needles)
    assert not (wd / "checkpoints").exists()


def test_missing_config_file(tmp_path):
    proc = run_cli("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path))
    assert_one_line_error(proc, "nope.py")


KNOWN_MISSING_HELP: set[str] = set()  # arguments allowed to lack help (none)


def _arguments(parser: argparse.ArgumentParser, path: str = "jaxaccel"):
    """(where, name, help) of every argument and subcommand in the tree below `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield path, choice.dest, choice.help
            for name, sub in action.choices.items():
                yield from _arguments(sub, f"{path} {name}")
            continue
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        yield path, name, action.help


def test_every_argument_has_help():
    found = list(_arguments(cli.build_parser()))
    where = {w for w, _, _ in found}
    # The walk reaches every subcommand and the nested ones.
    assert {f"jaxaccel {c}" for c in cli.COMMANDS} <= where
    assert {f"jaxaccel compress {c}" for c in ("report", "package")} <= where
    assert ("jaxaccel bench", "suite") in {(w, n) for w, n, _ in found}
    missing = {f"{w.removeprefix('jaxaccel ')} {n}" for w, n, h in found
               if not (h and h.strip() and h != argparse.SUPPRESS)}
    assert missing == KNOWN_MISSING_HELP, (
        f"arguments without help: {sorted(missing - KNOWN_MISSING_HELP)}; "
        f"now with help, drop from KNOWN_MISSING_HELP: {sorted(KNOWN_MISSING_HELP - missing)}")


def test_exit_statuses_of_errors_preemption_and_interrupts(monkeypatch, tmp_path, capsys):
    from jaxaccel.cli import report
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    missing = str(tmp_path / "empty")  # not a sweep
    os.mkdir(missing)
    assert cli.main(["report", missing]) == cli.EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxaccel: error: {missing!r} holds no sweep points (no sub-workdirs with "
                   f"point.json, results.json or config.json)"]
    monkeypatch.setenv("JAXACCEL_DEBUG", "1")  # the traceback, for debugging
    with pytest.raises(ValueError, match="holds no sweep points"):
        cli.main(["report", missing])

    def preempted(args, overrides):
        raise Preempted(7, "SIGTERM")

    monkeypatch.setattr(report, "run", preempted)
    assert cli.main(["report", missing]) == cli.EXIT_PREEMPTED == 3
    assert capsys.readouterr().err.strip().startswith("jaxaccel: preempted by SIGTERM at step 7")

    def interrupted(args, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    assert cli.main(["report", missing]) == 130
    assert capsys.readouterr().err.strip() == "jaxaccel: interrupted"


def test_config_overrides_reach_the_command_and_other_arguments_are_refused(monkeypatch,
                                                                          capsys):
    from jaxaccel.cli import report
    seen = []
    monkeypatch.setattr(report, "run", lambda args, overrides: seen.append(
        (args.workdir, args.no_plots, overrides)) or 0)
    assert cli.main(["report", "w", "--no-plots", "--config.seed=1", "--config.a.b=x"]) == 0
    assert seen == [("w", True, ["seed=1", "a.b=x"])]
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "w", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_kernel_isa_cap_that_is_not_one_is_one_line_and_writes_nothing(monkeypatch, tmp_path,
                                                                          capsys):
    monkeypatch.setenv("JAXACCEL_KERNEL_ISA", "avx1024")
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", EXPERIMENT, "--workdir", str(workdir),
                     "--config.num_steps=2", "--config.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["jaxaccel: error: JAXACCEL_KERNEL_ISA='avx1024' is not one of "
                                 "avx2, avx512, avx512_vnni"]
    assert not workdir.exists()
