"""`jaxaccel train` (jaxaccel.cli.train): random override sets, types and values thrown at it
must run or fail in one line without touching the workdir; a finished workdir survives a
different config or fewer steps.

Every fuzzed case must either run (exit 0, results written) or end with exactly one line
`jaxaccel: error: ...` and exit status 2 — never a traceback, never a hang, and never a
touched workdir (a run that fails on its input must not create or modify anything). A run
that starts and then diverges (a huge learning rate) may stop with its one-line non-finite
message after writing; that is a run, not bad input.
Excluded on purpose: values that only exhaust the machine (a width of 1e6, an evaluation
batch of 1e12) and a coordinator address (it would wait for peers that never come).
"""
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from jaxaccel import cli, config as config_lib
from tiny_runs import assert_one_line_error, run_cli

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_lenet5.py")




def test_train_then_refuse_different_config_keeps_workdir(tmp_path):
    wd = tmp_path / "wd"
    # One device: this test is about the workdir, not sharding (and compiles 2-3x faster).
    ok = run_cli("train", "--config", EXPERIMENT, "--workdir", str(wd), "--cpu-devices", "1",
                 "--config.num_steps=10", "--config.log_every=5", "--config.progress=false",
                 "--config.eval_batch_size=120")
    assert ok.returncode == 0, ok.stderr
    assert "test_accuracy=" in ok.stdout
    before = {p: os.path.getmtime(p) for p in map(str, wd.rglob("*")) if os.path.isfile(p)}
    bad = run_cli("train", "--config", EXPERIMENT, "--workdir", str(wd), "--cpu-devices", "1",
                  "--config.num_steps=10", "--config.optimizer.lr=0.5",
                  "--config.eval_batch_size=120")
    assert_one_line_error(bad, "optimizer.lr", "--overwrite")
    after = {p: os.path.getmtime(p) for p in map(str, wd.rglob("*")) if os.path.isfile(p)}
    assert before == after


def test_fewer_steps_than_trained_is_refused_on_the_command_line(tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from jaxaccel.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.dataset.name, c.model.name = 'digits', 'lenet300_100'\n"
        "    c.num_steps, c.checkpoint_every, c.batch_size, c.progress = 4, 4, 32, False\n"
        "    return c\n")
    workdir = str(tmp_path / "run")
    args = ["train", "--config", str(experiment), "--workdir", workdir]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args + ["--config.num_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxaccel: error: workdir {workdir!r}: num_steps=2 is fewer than the 4 steps "
                   f"this run already trained; use a new --workdir, or --overwrite to start again"]


# ----------------------------------------------------------------------------------------
# Fuzzing the overrides (in-process `cli.main`)
# ----------------------------------------------------------------------------------------
BASE = {"dataset.name": "digits", "model.name": "lenet300_100", "batch_size": 64,
        "eval_batch_size": 120, "num_steps": 2, "log_every": 1, "checkpoint_every": 2,
        "progress": False}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    c = config_lib.default_config()
    for k, v in BASE.items():
        config_lib.set_value(c, k, v)
    path = str(tmp_path_factory.mktemp("fuzz") / "experiment.py")
    with open(path, "w") as f:
        f.write("from jaxaccel.config import from_json\n\n\ndef get_config():\n"
                f"    return from_json({config_lib.to_json(c)!r})\n")
    return path


KNOWN_KEYS = [k for k in config_lib.flat_keys(config_lib.default_config())
              if k not in ("distributed.coordinator_address", "dataset.data_dir")]


SIZE_KEYS = {"batch_size", "eval_batch_size", "num_steps", "model.width", "imp.rounds",
             "imp.steps", "optimizer.warmup_steps", "keep_checkpoints", "parallel.cpu_devices",
             "parallel.num_devices", "rewind_step", "eval_every", "dataset.crop_padding"}


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)


any_value = st.one_of(
    st.integers(-2**40, 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "None", "nan", "inf", "-inf", "()", "[]", "{}", "(1,)",
                     "[1, 2]", "{'a': 1}", "1e400", "-0", "0x10", "1_000", "'quoted'", "",
                     "=", "a=b", "(", "[[[", "lambda: 0", "__import__('os')", "digits",
                     "cifar10", "imagenet", "resnet20", "sgd", "adamw", "fsdp", "pmap",
                     "skip", "train[:10%]", "test", "nope"]),
    text)


small_value = st.one_of(st.integers(-2, 130).map(str),
                        st.floats(-1.0, 3.0, allow_nan=False).map(repr),
                        st.sampled_from(["true", "abc", "()", "[8]", "None", "nan", "1e400"]))


unknown_key = st.one_of(
    st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,8}){0,2}", fullmatch=True),
    st.sampled_from(["optimizer", "model", "dataset.nme", "optimizer.lrr", "batchsize",
                     "model.kwargs", "stages.0.steps", ".", "..", "a..b", "seed.x"]))


@st.composite
def override(draw):
    kind = draw(st.sampled_from(["known", "known", "known", "unknown", "kwargs", "raw"]))
    if kind == "known":
        key = draw(st.sampled_from(KNOWN_KEYS))
        value = draw(small_value if key in SIZE_KEYS else any_value)
        if key in SIZE_KEYS and value == "1e400":
            value = "3"
        return f"--config.{key}={value}"
    if kind == "unknown":
        return f"--config.{draw(unknown_key)}={draw(any_value)}"
    if kind == "kwargs":  # free-form model fields, checked by the model
        field = draw(st.sampled_from(["hidden", "features", "padding", "use_bn", "bogus"]))
        return f"--config.model.kwargs.{field}={draw(small_value)}"
    return draw(st.sampled_from(["--config.num_steps", "--config.=3", "--config", "--bogus=1",
                                 "--cpu-devices=x", "--cpu-devices=3", "--overwrite",
                                 "--num-processes=2", "--process-id=7"]))


def run(experiment, workdir, args, capsys):
    """`jaxaccel train ...` in this process: (exit status, stderr)."""
    try:
        status = cli.main(["train", "--config", experiment, "--workdir", workdir, *args])
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    return status, capsys.readouterr().err


def check(status, err, workdir):
    assert "Traceback" not in err, err
    if status == 0:
        assert os.path.isfile(os.path.join(workdir, "results.json"))
        return
    assert status == 2, (status, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ("error:" in lines[-1]), err
    if lines[-1].startswith("jaxaccel: error:"):  # ours: exactly one line
        assert len([l for l in lines if "error" in l]) == 1, err
    else:  # argparse: usage line(s) then "jaxaccel train: error: ..."
        assert lines[0].startswith("usage:"), err
    if "non-finite loss or gradient at step" in lines[-1]:
        return  # the run started and diverged (e.g. lr=4e7): it stopped, naming the step
    assert not os.path.exists(workdir), f"failed run touched {workdir}: {os.listdir(workdir)}"


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=st.lists(override(), min_size=1, max_size=4))
def test_random_overrides_run_or_fail_in_one_line(experiment, capsys, args):
    root = tempfile.mkdtemp(prefix="jaxaccel-fuzz-")
    workdir = os.path.join(root, "wd")
    try:
        status, err = run(experiment, workdir, args, capsys)
        event(f"exit status {status}")
        check(status, err, workdir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("args", [
    ["--config.seed=99999999999"],  # >= 2**32
    ["--config.seed=-1"],
    ["--config.model.kwargs.hidden=abc"],
    ["--config.model.kwargs.hidden=(0, 0)"],
    ["--config.batch_size=4096"],
    ["--config.stages=(1, 2)"],
    ["--config.optimizer.lr=1e400"],
    ["--config.optimizer.schedule=piecewise", "--config.optimizer.boundaries=('a',)"],
    ["--config.dataset.train_split=nope"],
    ["--config.imp.rounds=2", "--config.imp.rewind=sideways"],
])
def test_known_bad_values(experiment, capsys, tmp_path, args):
    workdir = str(tmp_path / "wd")
    status, err = run(experiment, workdir, args, capsys)
    check(status, err, workdir)
    assert status == 2


def test_a_failed_run_leaves_an_existing_workdir_as_it_was(experiment, capsys, tmp_path):
    workdir = str(tmp_path / "wd")
    assert run(experiment, workdir, [], capsys)[0] == 0
    before = {os.path.join(d, p): os.stat(os.path.join(d, p)).st_mtime_ns
              for d, _, files in os.walk(workdir) for p in files}
    status, err = run(experiment, workdir, ["--config.batch_size=4096"], capsys)
    assert status == 2 and "batch" in err
    after = {os.path.join(d, p): os.stat(os.path.join(d, p)).st_mtime_ns
             for d, _, files in os.walk(workdir) for p in files}
    assert after == before
