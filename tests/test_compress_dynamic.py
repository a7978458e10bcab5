"""jaxaccel.compress.dynamic: dynamic sparse training (SET, RigL) — the mask-update math as
pure functions, the update inside the jitted train step, and `set` / `rigl` train stages in a
pipeline (exact sparsity, masks changing only at update steps, 8 devices = 1, exact resume,
bad values refused in one line)."""
import math
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxaccel
from jaxaccel import checkpoint, cli, config as config_lib, stages
from jaxaccel import state as state_lib
from jaxaccel.compress import dynamic, prune
from tiny_runs import ALL_DEVICES, steps_in, tiny_config

KERNELS = {"fc1/kernel": 64 * 300, "fc2/kernel": 300 * 100, "fc3/kernel": 100 * 10}


# ----------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------
def test_drop_fraction_decays_as_a_cosine_and_updates_stop_at_end_step():
    f = lambda t: float(dynamic.drop_fraction(t, initial=0.3, end_step=100))  # noqa: E731
    assert f(0) == pytest.approx(0.3)
    assert f(50) == pytest.approx(0.15)
    assert f(25) == pytest.approx(0.3 * (1 + math.cos(math.pi / 4)) / 2)
    assert f(100) == pytest.approx(0.0, abs=1e-8) and f(250) == pytest.approx(0.0, abs=1e-8)
    values = [f(t) for t in range(0, 120, 10)]
    assert values == sorted(values, reverse=True)
    jitted = jax.jit(lambda t: dynamic.drop_fraction(t, initial=0.3, end_step=100))
    assert float(jitted(jnp.int32(50))) == pytest.approx(0.15)
    updates = [t for t in range(0, 60) if dynamic.is_update_step(t, update_every=10, end_step=40)]
    assert updates == [10, 20, 30]
    with pytest.raises(ValueError, match="update_every=0"):
        dynamic.is_update_step(5, update_every=0, end_step=40)
    with pytest.raises(ValueError, match="drop_fraction=1.0"):
        dynamic.drop_fraction(5, initial=1.0, end_step=40)


def test_one_rigl_update_drops_the_smallest_kept_and_grows_the_largest_gradients():
    w = np.array([[0.5, -0.1, 0.0, 0.9],
                  [0.0, 0.3, -0.05, 0.0],
                  [2.0, 0.0, 0.0, -0.7]], np.float32)
    mask = w != 0                                   # 7 kept, 5 pruned
    g = np.array([[9.0, 9.0, -0.2, 1.0],            # kept entries' gradients do not matter
                  [3.0, 0.1, 9.0, -4.0],
                  [9.0, 0.5, 2.5, 9.0]], np.float32)
    params = {"fc1": {"kernel": w, "bias": np.zeros(4, np.float32)}}
    masks = {"fc1": {"kernel": mask, "bias": np.ones(4, bool)}}
    grads = {"fc1": {"kernel": g, "bias": np.ones(4, np.float32)}}
    # k = round(0.3 * 7) = 2: drop -0.05 and -0.1; grow |g| = 4.0 and 3.0 among the pruned
    new = jax.jit(dynamic.rigl_update)(params, masks, grads, 0.3)
    expected = mask.copy()
    expected[1, 2] = expected[0, 1] = False
    expected[1, 3] = expected[1, 0] = True
    np.testing.assert_array_equal(new["fc1"]["kernel"], expected)
    assert np.asarray(new["fc1"]["bias"]).all()    # not prunable: unchanged
    # k is capped by the pruned count (5): a fraction of 0.99 swaps 5, not round(6.93) = 7
    many = dynamic.rigl_update(params, masks, grads, 0.99)
    assert int(np.sum(many["fc1"]["kernel"])) == 7
    assert int(np.sum(np.asarray(many["fc1"]["kernel"]) & ~mask)) == 5
    # fraction 0 changes nothing
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, dynamic.rigl_update(
        params, masks, grads, 0.0)), masks)


def test_set_update_keeps_every_layers_count_and_grows_only_among_the_pruned():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 30)).astype(np.float32)
    mask = rng.random((40, 30)) > 0.8
    params = {"fc1": {"kernel": w, "bias": np.zeros(30, np.float32)}}
    masks = {"fc1": {"kernel": mask, "bias": np.ones(30, bool)}}
    update = jax.jit(dynamic.set_update)
    news = [np.asarray(update(jax.random.PRNGKey(s), params, masks, 0.25)["fc1"]["kernel"])
            for s in (0, 0, 1)]
    np.testing.assert_array_equal(news[0], news[1])          # deterministic in the key
    assert not np.array_equal(news[0], news[2])             # another key, other growth
    kept = int(mask.sum())
    k = round(0.25 * kept)
    for new in news:
        assert int(new.sum()) == kept
        dropped, grown = mask & ~new, new & ~mask
        assert int(dropped.sum()) == int(grown.sum()) == k
        # the dropped are the k kept weights of smallest magnitude (the same for every key)
        smallest = np.sort(np.abs(w[mask]))[:k]
        np.testing.assert_array_equal(np.sort(np.abs(w[dropped])), smallest)
    np.testing.assert_array_equal(mask & ~news[0], mask & ~news[2])


def test_zero_moments_clears_only_the_grown_entries():
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = prune.masked(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)))
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(lambda p: p + 1.0, params), opt_state, params)
    old = {"w": jnp.array([[True, False, True], [False, True, True]]), "b": jnp.ones(3, bool)}
    new = {"w": jnp.array([[True, True, False], [False, True, True]]), "b": jnp.ones(3, bool)}
    opt_state = prune.set_masks(opt_state, new)
    grown = dynamic.grown(old, new)
    np.testing.assert_array_equal(grown["w"], [[False, True, False], [False, False, False]])
    out = jax.jit(dynamic.zero_moments)(opt_state, grown)
    adam = out.inner_state[1][0]
    before = opt_state.inner_state[1][0]
    for moment in ("mu", "nu"):
        got, was = np.asarray(getattr(adam, moment)["w"]), np.asarray(getattr(before, moment)["w"])
        assert was[0, 1] != 0 and got[0, 1] == 0
        keep = ~np.asarray(grown["w"])
        np.testing.assert_array_equal(got[keep], was[keep])
        np.testing.assert_array_equal(getattr(adam, moment)["b"], getattr(before, moment)["b"])
    assert int(adam.count) == int(before.count)
    chex.assert_trees_all_equal(prune.get_masks(out), new)


# ----------------------------------------------------------------------------------------
# Inside the jitted train step
# ----------------------------------------------------------------------------------------
def _moments(opt_state):
    """The per-parameter float buffers (Adam mu / nu, SGD trace) of an optax state."""
    kernel_shape = prune.get_masks(opt_state)["fc1"]["kernel"].shape
    found = []
    for node in jax.tree.leaves(opt_state.inner_state, is_leaf=lambda x: isinstance(x, dict)):
        if isinstance(node, dict) and node["fc1"]["kernel"].shape == kernel_shape:
            found.append(node)
    return found


@pytest.mark.parametrize("method,optimizer", [("rigl", "adam"), ("set", "sgd")])
def test_grown_weights_start_at_zero_with_zero_moments(method, optimizer):
    c = tiny_config(**{"optimizer.name": optimizer, "optimizer.momentum": 0.9,
                       "optimizer.lr": 0.05 if optimizer == "sgd" else 1e-3})
    st = stages.stage("dst", "train", steps=28, prune={
        "method": method, "sparsity": 0.9, "update_every": 5, "drop_fraction": 0.5})
    c.stages = (st,)
    setup = state_lib.build(c, stages.expand(c)[0])
    step = jax.jit(state_lib.make_train_step(setup.model, setup.tx, setup.schedule,
                                             num_classes=10, mask_update=setup.mask_update))
    state = setup.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    changed = []
    for t in range(22):
        batch = {"image": rng.standard_normal((32, 8, 8, 1)).astype(np.float32),
                 "label": rng.integers(0, 10, 32).astype(np.int32)}
        old = prune.get_masks(state.opt_state)
        state, _ = step(state, batch)
        new = prune.get_masks(state.opt_state)
        for path, size in KERNELS.items():
            leaf = dict(prune.named_leaves(new))[path]
            assert int(np.sum(~np.asarray(leaf))) == round(0.9 * size), (t, path)
        grown = jax.tree.map(np.asarray, dynamic.grown(old, new))
        if any(g.any() for g in jax.tree.leaves(grown)):
            changed.append(t)
            for path, g in prune.named_leaves(grown):
                p = np.asarray(dict(prune.named_leaves(state.params))[path])
                assert np.all(p[g] == 0), (t, path)
                for moment in _moments(state.opt_state):
                    m = np.asarray(dict(prune.named_leaves(moment))[path])
                    assert np.all(m[g] == 0), (t, path)
        elif t:  # between updates the masks stay as they are
            chex.assert_trees_all_equal(jax.tree.map(np.asarray, old),
                                        jax.tree.map(np.asarray, new))
        pruned = jax.tree.map(lambda p, mk: np.asarray(p)[~np.asarray(mk)], state.params, new)
        assert all(np.all(x == 0) for x in jax.tree.leaves(pruned))
    assert changed == [5, 10, 15, 20]  # end_step = 3/4 * 28 = 21
    assert len(_moments(state.opt_state)) == (2 if optimizer == "adam" else 1)


# ----------------------------------------------------------------------------------------
# In a pipeline
# ----------------------------------------------------------------------------------------
def dst_config(method, **changes):
    c = tiny_config(checkpoint_every=5, keep_checkpoints=20, log_every=10, **changes)
    c.stages = (stages.stage(method, "train", steps=40, prune={
        "method": method, "sparsity": 0.9, "update_every": 10}),)
    return c


def state_at(config, workdir, step):
    _, target = state_lib.checkpoint_target(config, 0)
    with checkpoint.Checkpointer(workdir, read_only=True) as ck:
        payload, _ = ck.restore(step, target)
    return jax.device_get(payload["state"])


@pytest.fixture(scope="module", params=["rigl", "set"])
def dst_run(request, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp(request.param))
    return request.param, wd, jaxaccel.train(dst_config(request.param), wd)


def test_sparsity_is_exact_and_masks_change_only_at_update_steps(dst_run):
    method, wd, results = dst_run
    row = results["stages"][0]
    assert row["name"] == method and row["sparsity"] == pytest.approx(0.9, abs=1e-3)
    config = dst_config(method)
    steps = steps_in(wd)
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    masks = {}
    for s in steps:
        st = state_at(config, wd, s)
        masks[s] = dict(prune.named_leaves(prune.get_masks(st.opt_state)))
        for path, size in KERNELS.items():
            assert int(np.sum(~masks[s][path])) == round(0.9 * size), (s, path)
            w = dict(prune.named_leaves(st.params))[path]
            assert np.all(w[~masks[s][path]] == 0)
    # updates at stage steps 10 and 20 (30 = end_step: masks fixed from there on); checkpoint
    # s holds the state after steps 0 .. s-1
    differs = [s for a, s in zip(steps, steps[1:])
               if any(not np.array_equal(masks[a][p], masks[s][p]) for p in KERNELS)]
    assert differs == [15, 25]
    final = prune.sparsity_summary(jaxaccel.load(wd).variables["params"])["leaves"]
    for path, size in KERNELS.items():
        assert final[path]["nonzeros"] <= size - round(0.9 * size)


def test_resume_in_a_dynamic_sparse_stage_is_exact(dst_run, tmp_path):
    method, ref_wd, ref = dst_run
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd)
    for s in steps_in(wd):  # "killed" after step 15: between the two mask updates
        if s > 15:
            shutil.rmtree(os.path.join(wd, "checkpoints", str(s)))
    os.remove(os.path.join(wd, "results.json"))
    results = jaxaccel.train(dst_config(method), wd)
    config = dst_config(method)
    a, b = state_at(config, wd, 40), state_at(config, ref_wd, 40)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(prune.get_masks(a.opt_state), prune.get_masks(b.opt_state))
    assert results["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.parametrize("strategy", ["data", "fsdp"])
def test_eight_devices_match_one_device(strategy, dst_run, tmp_path):
    method, ref_wd, _ = dst_run
    # one case per algorithm and per strategy: rigl-data and set-fsdp (rigl-fsdp would repeat
    # fsdp's sharded leaves, which set-fsdp covers; set-data, data's replicated ones)
    if method == "set" and strategy == "data":
        pytest.skip("set's random growth is covered with sharded (fsdp) leaves")
    if method == "rigl" and strategy == "fsdp":
        pytest.skip("fsdp's sharded leaves are covered by set; rigl's growth by rigl-data")
    config = dst_config(method, **ALL_DEVICES, **{"parallel.strategy": strategy})
    results = jaxaccel.train(config, str(tmp_path))
    assert results["num_devices"] == 8 and results["strategy"] == strategy
    a, b = state_at(config, str(tmp_path), 40), state_at(dst_config(method), ref_wd, 40)
    chex.assert_trees_all_equal(prune.get_masks(a.opt_state), prune.get_masks(b.opt_state))
    chex.assert_trees_all_close(a.params, b.params, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,needle", [
    ("update_every=0", "stages[0] (rigl).prune.update_every=0 must be an int > 0"),
    ("drop_fraction=1.0", "stages[0] (rigl).prune.drop_fraction=1.0 must be in [0, 1)"),
])
def test_bad_values_fail_in_one_line_and_write_nothing(override, needle, tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text("from jaxaccel.config import from_json\n\n\ndef get_config():\n"
                          f"    return from_json({config_lib.to_json(dst_config('rigl'))!r})\n")
    workdir = str(tmp_path / "wd")
    status = cli.main(["train", "--config", str(experiment), "--workdir", workdir,
                       f"--config.stages.0.prune.{override}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1 and err[0].startswith("jaxaccel: error:"), err
    assert needle in err[0]
    assert not os.path.exists(workdir)


def test_set_and_rigl_belong_to_unstructured_train_stages():
    def expand(*stage_list):
        c = tiny_config()
        c.stages = stage_list
        return stages.expand(c)

    assert expand(stages.stage("r", "train", steps=4, prune={"method": "rigl"}))
    with pytest.raises(ValueError, match=r"prune.method='set': a prune stage"):
        expand(stages.stage("p", "prune", prune={"method": "set"}))
    with pytest.raises(ValueError, match=r"prune.method='rigl' is not valid for an evaluate"):
        expand(stages.stage("e", "evaluate", prune={"method": "rigl"}))
    with pytest.raises(ValueError, match=r"granularity='channel': rigl drops and grows"):
        expand(stages.stage("r", "train", steps=4, prune={"method": "rigl",
                                                          "granularity": "channel"}))
    with pytest.raises(ValueError, match=r"update_every=True must be an int > 0"):
        expand(stages.stage("r", "train", steps=4, prune={"method": "set",
                                                          "update_every": True}))
    for key in ("prune.update_every", "prune.drop_fraction"):
        assert key in stages.KEY_HELP
