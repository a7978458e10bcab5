"""jaxaccel.sweep.vectorized: K points as one compiled program — the same results as
sequential runs (loop and vmap modes, per-point and shared data orders, 1/2/8 devices),
per-point failures, resume after preemption, sub-workdirs like `jaxaccel train`'s."""
import json
import os
import textwrap

import chex
import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli, config as config_lib, metrics, sweep
from jaxaccel.state import make_optimizer
from jaxaccel.sweep import vectorized as vsweep
from jaxaccel.preemption import Preempted

EXPERIMENT = '''
from jaxaccel import sweep
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 32
    c.eval_batch_size = 360
    c.num_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.progress = False
    c.parallel.num_devices = 1
    return c

def get_sweep():
    # A 4-point learning-rate sweep; two data orders (seeds) so each point gets its own batches.
    return sweep.zipit(sweep.grid("optimizer.lr", [1e-3, 2e-3, 4e-3, 8e-3]),
                       sweep.grid("seed", [0, 0, 1, 1]))
'''


POINTS = [{"optimizer.lr": lr, "seed": s} for lr, s in ((1e-3, 0), (2e-3, 0), (4e-3, 1), (8e-3, 1))]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("exp") / "exp.py"
    path.write_text(textwrap.dedent(EXPERIMENT))
    return str(path)


@pytest.fixture(scope="module")
def sequential(experiment, tmp_path_factory):
    """The reference: every point trained on its own with `jaxaccel train`'s code."""
    wd = str(tmp_path_factory.mktemp("seq"))
    assert cli.main(["sweep", "--config", experiment, "--workdir", wd, "--no-report"]) == 0
    return wd


def read_results(wd, point):
    with open(os.path.join(wd, sweep.point_name(point), "results.json")) as f:
        return json.load(f)


def assert_same_run(wd, ref_wd, point, exact=False):
    """Same results, checkpoint and metrics as the sequential run: bit for bit (`exact`, the
    loop mode runs the very same step computation) or to float tolerance (vmap)."""
    got, ref = read_results(wd, point), read_results(ref_wd, point)
    if exact:
        assert (got["test_accuracy"], got["test_loss"]) == (ref["test_accuracy"], ref["test_loss"])
    assert abs(got["test_accuracy"] - ref["test_accuracy"]) <= 1 / 360 + 1e-9
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=2e-3)
    assert got["steps"] == ref["steps"] and got["num_params"] == ref["num_params"]
    assert got["stages"][0]["sparsity"] == ref["stages"][0]["sparsity"] == 0.0
    name = sweep.point_name(point)
    loaded = jaxaccel.load(os.path.join(wd, name))  # a normal, loadable workdir
    ref_loaded = jaxaccel.load(os.path.join(ref_wd, name))
    assert loaded.step == ref_loaded.step == 20
    chex.assert_trees_all_close(loaded.variables["params"], ref_loaded.variables["params"],
                                atol=0 if exact else 5e-4, rtol=0)
    rows = [r for r in metrics.read_metrics(os.path.join(wd, name)) if r["split"] == "train"]
    ref_rows = [r for r in metrics.read_metrics(os.path.join(ref_wd, name)) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [5, 10, 15, 20]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows],
                               rtol=0 if exact else 1e-3)
    np.testing.assert_allclose([r["lr"] for r in rows], [r["lr"] for r in ref_rows], rtol=1e-6)


def test_vectorized_matches_sequential_and_isolates_a_diverging_point(experiment, sequential,
                                                                      tmp_path, capsys):
    """4 lr points with per-point data orders ("auto" = loop on CPU); then vmap on 8
    devices (each point's batch split over them) with one point whose loss blows up."""
    wd = tmp_path / "vec"
    exit_code = cli.main(["sweep", "--config", experiment, "--workdir", str(wd), "--vectorize"])
    assert exit_code == 0, capsys.readouterr().err
    for p in POINTS:
        assert_same_run(str(wd), sequential, p, exact=True)
        info = read_results(str(wd), p)["vectorized"]
        assert info["points"] == 4 and info["mode"] == "loop" and info["steps_per_dispatch"] == 5
    assert (wd / "results.md").exists() and not (wd / vsweep.GROUP_DIR).exists()

    diverging = {"optimizer.lr": 1e30, "seed": 0}
    config = config_lib.load_experiment(experiment, ["parallel.num_devices=8"])
    out = vsweep.run_vectorized(config, POINTS[:1] + [diverging], str(tmp_path / "div"),
                                mode="vmap")
    assert out[0]["vectorized"]["layout"] == "batch" and out[0]["num_devices"] == 8
    assert abs(out[0]["test_accuracy"] - read_results(sequential, POINTS[0])["test_accuracy"]) <= 1 / 360
    assert out[1]["error"].startswith("FloatingPointError: non-finite loss")
    assert not (tmp_path / "div" / sweep.point_name(diverging) / "results.json").exists()


class StopAtStep10:
    """Stands in for PreemptionGuard: asks to stop at its 2nd check (blocks of 5 steps)."""
    signal_name = "SIGTERM"

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def should_stop(self):
        self.calls += 1
        return self.calls == 2


def test_vmap_whole_points_per_device_resume_after_preemption(experiment, sequential, tmp_path,
                                                               monkeypatch):
    """2 points (one seed: one data order) on 2 devices, one point each; the stacked state
    resumes where the preempted run stopped."""
    config = config_lib.load_experiment(experiment, ["parallel.num_devices=2"])
    same_seed = POINTS[:2]
    wd = str(tmp_path / "vec")
    monkeypatch.setattr(vsweep, "PreemptionGuard", StopAtStep10)
    with pytest.raises(Preempted) as stopped:
        vsweep.run_vectorized(config, same_seed, wd, mode="vmap")
    assert stopped.value.step == 10
    assert os.path.isdir(os.path.join(wd, vsweep.GROUP_DIR))
    assert not any(os.path.exists(os.path.join(wd, sweep.point_name(p), "results.json"))
                   for p in same_seed)
    monkeypatch.undo()
    out = vsweep.run_vectorized(config, same_seed, wd, mode="vmap")
    assert [(r["num_devices"], r["vectorized"]["layout"]) for r in out] == [(2, "points")] * 2
    for p in same_seed:
        assert_same_run(wd, sequential, p)
    # Finished points are not trained again.
    before = [os.path.getmtime(os.path.join(wd, sweep.point_name(p), "results.json"))
              for p in same_seed]
    assert vsweep.run_vectorized(config, same_seed, wd, mode="vmap") == out
    assert before == [os.path.getmtime(os.path.join(wd, sweep.point_name(p), "results.json"))
                      for p in same_seed]


def test_shape_changing_sweeps_are_refused_up_front(experiment, tmp_path, capsys):
    bad = textwrap.dedent(EXPERIMENT).replace(
        'sweep.grid("seed", [0, 0, 1, 1])', 'sweep.grid("model.width", [1.0, 1.0, 0.5, 0.5])')
    path = tmp_path / "bad.py"
    path.write_text(bad)
    wd = tmp_path / "wd"
    assert cli.main(["sweep", "--config", str(path), "--workdir", str(wd), "--vectorize"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.width" in err[0] and "optimizer.lr" in err[0]
    assert not any((wd / d / "results.json").exists() for d in os.listdir(wd))
    assert "--workers or --vectorize" in _error_of(
        ["sweep", "--config", experiment, "--workdir", str(wd), "--vectorize", "--workers", "2"],
        capsys)


def _error_of(argv, capsys):
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_hyperparameters_enter_the_step_as_arrays():
    """The shared optimizer fed each point's hyperparameters reproduces the updates of the
    point's own `state.make_optimizer`."""
    base = config_lib.default_config()
    configs = []
    for name, wd, mom in (("sgd", 0.0, 0.9), ("sgd", 1e-2, 0.5)):
        c = config_lib.default_config()
        c.optimizer.name, c.optimizer.weight_decay, c.optimizer.momentum = name, wd, mom
        c.optimizer.schedule, c.optimizer.lr = "cosine", 0.1
        configs.append(c)
    shared = vsweep.shared_optimizer(configs)
    hp = vsweep.hyper_values(configs)
    params = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}
    grads = {"w": np.linspace(0.5, -0.3, 6, dtype=np.float32)}
    for i, c in enumerate(configs):
        ref_tx, _ = make_optimizer(c.optimizer, base.num_steps)
        tx, _ = make_optimizer(shared, base.num_steps, {k: v[i] for k, v in hp.items()})
        ref_state, state = ref_tx.init(params), tx.init(params)
        for _ in range(3):
            ref_u, ref_state = ref_tx.update(grads, ref_state, params)
            u, state = tx.update(grads, state, params)
            np.testing.assert_allclose(u["w"], ref_u["w"], rtol=1e-6, atol=1e-8)
        assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(ref_state))
    with pytest.raises(ValueError, match="momentum"):
        configs[1].optimizer.momentum = 0.0
        vsweep.check_vectorizable(configs)


def test_only_the_hyperparameters_that_differ_enter_the_step():
    configs = []
    for lr, wd in ((0.1, 0.0), (0.2, 0.0), (0.2, 1e-3)):
        c = config_lib.default_config()
        c.optimizer.lr, c.optimizer.weight_decay = lr, wd
        configs.append(c)
    hp = vsweep.hyper_values(configs)
    assert set(hp) == {"lr", "weight_decay"}  # b1, b2, momentum... are shared constants
    np.testing.assert_array_equal(hp["lr"], np.float32([0.1, 0.2, 0.2]))
    assert hp["lr"].dtype == np.float32
    assert vsweep.shared_optimizer(configs).weight_decay == 1e-3  # a decay term for all
    vsweep.check_vectorizable(configs)
    other = config_lib.default_config()
    other.batch_size = 64
    with pytest.raises(ValueError, match="points differ in batch_size"):
        vsweep.check_vectorizable(configs + [other])
    with pytest.raises(ValueError, match="no points"):
        vsweep.check_vectorizable([])


def test_group_id_names_the_points_and_their_configs():
    a, b = config_lib.default_config(), config_lib.default_config()
    assert vsweep.group_id(["p", "q"], [a, b]) == vsweep.group_id(["p", "q"], [a, b])
    assert len(vsweep.group_id(["p", "q"], [a, b])) == 12
    assert vsweep.group_id(["p", "r"], [a, b]) != vsweep.group_id(["p", "q"], [a, b])
    b.num_steps = 7
    assert vsweep.group_id(["p", "q"], [a, b]) != vsweep.group_id(["p", "q"], [a, a])
