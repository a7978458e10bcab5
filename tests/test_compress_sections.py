"""jaxaccel.compress.sections: what a stage's prune and quant sections mean as masks, QAT and
PTQ configs."""
import chex
import jax
import numpy as np
import pytest

from jaxaccel import stages
from jaxaccel.compress import prune, quant, sections


def test_iterated_prune_stages_shrink_masks_to_the_one_shot_masks():
    """Prune stages start from the carried masks: each is a subset of the last, and on fixed
    weights the iterates land exactly on the one-shot masks of the final sparsity."""
    rng = np.random.default_rng(0)
    params = {"fc1": {"kernel": rng.standard_normal((64, 32)).astype(np.float32),
                      "bias": np.zeros(32, np.float32)},
              "fc2": {"kernel": rng.standard_normal((32, 10)).astype(np.float32),
                      "bias": np.zeros(10, np.float32)}}
    dense = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    final = {"fc1/kernel": 0.92, "fc2/kernel": 0.74}
    masks, p, previous = dense, params, None
    for r in (1, 2, 3):
        per_layer = {k: 1 - (1 - s) ** (r / 3) for k, s in final.items()}
        s = stages.stage("p", "prune", prune={"method": "one_shot", "per_layer": per_layer})
        p, masks = sections.prune_once(p, masks, s.prune)
        for path, m in prune.named_leaves(masks):
            if path in final:
                keep = (1 - final[path]) ** (r / 3)
                assert np.mean(np.asarray(m)) == pytest.approx(keep, abs=1.0 / m.size)
        if previous is not None:
            assert all(np.all(np.asarray(new) <= np.asarray(old)) for new, old in
                       zip(jax.tree.leaves(masks), jax.tree.leaves(previous)))
        previous = masks
    s = stages.stage("e", "evaluate", prune={"method": "one_shot", "per_layer": final})
    _, once = sections.prune_once(params, dense, s.prune)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, masks), jax.tree.map(np.asarray, once))


def test_quant_sections_become_quant_configs():
    q = stages.stage("q", "quantize", quant={"mode": "ptq", "weight_bits": 4, "act_bits": 6,
                                             "symmetric": True, "per_channel": False,
                                             "observer": "percentile"}).quant
    weights, acts = sections.ptq_configs(q)
    assert (weights.bits, weights.symmetric, weights.per_channel, weights.narrow_range) == (
        4, True, False, True)
    assert (acts.bits, acts.symmetric, acts.per_channel, acts.observer) == (
        6, False, False, "percentile")
    qat = sections.qat_config(stages.stage("t", "train", steps=1, quant={
        "mode": "qat", "weight_bits": 4, "delay": 7}).quant)
    assert isinstance(qat, quant.QATConfig) and qat.delay == 7
    assert qat.weights.bits == 4 and qat.activations.observer == "ema"
    assert not qat.activations.symmetric and not qat.activations.per_channel


def test_gradual_mask_update_follows_the_cubic_schedule():
    rng = np.random.default_rng(0)
    params = {"fc1": {"kernel": rng.standard_normal((40, 20)).astype(np.float32),
                      "bias": np.zeros(20, np.float32)}}
    p = stages.stage("g", "train", steps=40, prune={"method": "gradual", "sparsity": 0.8,
                                                   "begin_step": 0, "end_step": 30,
                                                   "frequency": 10}).prune
    update = jax.jit(sections.gradual_mask_update(p, 40))
    masks = prune.mask_tree_like(params)
    pruned = []
    for step in range(40):
        masks = update(params, masks, step)
        pruned.append(int(np.sum(~np.asarray(masks["fc1"]["kernel"]))))
    assert pruned[0] == 0 and pruned[-1] == round(0.8 * 800)  # 0 at begin_step, final at end
    assert pruned == sorted(pruned)  # masks only shrink
    assert sorted(set(pruned)) == [pruned[s] for s in (0, 10, 20, 30)]  # only at update steps
    assert np.asarray(masks["fc1"]["bias"]).all()
    n_m = stages.stage("g", "train", steps=4, prune={"method": "gradual",
                                                     "granularity": "n:m"}).prune
    with pytest.raises(ValueError, match="n:m"):
        sections.gradual_mask_update(n_m, 4)


def _ste_config(ste):
    from tiny_runs import tiny_config
    from jaxaccel.stages import stage
    c = tiny_config(**{"checkpoint_every": 10, "optimizer.lr": 3e-3})
    c.stages = (stage("sparse", "train", steps=40,
                      prune={"method": "gradual", "sparsity": 0.8, "begin_step": 0,
                             "end_step": 30, "frequency": 10, "ste": ste}),)
    return c


@pytest.fixture(scope="module")
def ste_runs(tmp_path_factory):
    import jaxaccel
    out = {}
    for ste in (False, True):
        wd = str(tmp_path_factory.mktemp(f"ste{ste}"))
        out[ste] = (wd, jaxaccel.train(_ste_config(ste), wd))
    return out


def _state_at(config, wd, step):
    from jaxaccel.checkpoint import Checkpointer
    from jaxaccel.state import checkpoint_target
    _, target = checkpoint_target(config, 0)
    with Checkpointer(wd, read_only=True) as ckpt:
        payload, _ = ckpt.restore(step, target)
    return payload["state"]


def test_straight_through_masks_keep_dense_weights_and_let_pruned_ones_return(ste_runs):
    """prune.ste (jaxpruner's magnitude_ste): the dense weights keep training under the
    masks, a weight pruned at one update can be kept at a later one, and everything that reads
    the model (rows, load, predict) sees params ⊙ masks at the target sparsity."""
    import jaxaccel
    from jaxaccel.compress import prune as prune_lib
    for ste, (wd, results) in ste_runs.items():
        config = _ste_config(ste)
        early, late = _state_at(config, wd, 20), _state_at(config, wd, 40)
        m_early = [np.asarray(m) for m in jax.tree.leaves(prune_lib.get_masks(early.opt_state))]
        m_late = [np.asarray(m) for m in jax.tree.leaves(prune_lib.get_masks(late.opt_state))]
        returned = sum(int((~a & b).sum()) for a, b in zip(m_early, m_late))
        dense_pruned = sum(int((np.asarray(p)[~m] != 0).sum()) for p, m in
                           zip(jax.tree.leaves(late.params), m_late))
        assert (returned > 0) is ste and (dense_pruned > 0) is ste
        assert results["sparsity"] == pytest.approx(0.8, abs=0.01)
        loaded = jaxaccel.load(wd).variables["params"]
        for p, m in zip(jax.tree.leaves(loaded), m_late):
            assert np.all(np.asarray(p)[~m] == 0)
    bad = _ste_config(True)
    bad.stages[0].prune.method = "none"
    from jaxaccel import config as config_lib
    with pytest.raises((ValueError, config_lib.ConfigError), match="prune.ste=True"):
        jaxaccel.train(bad, "/nonexistent/never-written")
