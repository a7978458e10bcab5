"""jaxaccel.compress.saliency and the `snip` / `random` prune methods: SNIP's connection
sensitivities against a direct computation, exact global top-k masks that respect skipped
layers and carried masks, random masks (exact counts, deterministic per seed), the config's
refusals, and a prune-at-initialization pipeline whose sparsity survives training."""
import os
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli, config as config_lib, pipeline, stages
from jaxaccel.compress import prune, saliency, sections

SIZES = {"fc1": (12, 16), "fc2": (16, 8), "fc3": (8, 3)}


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)
    return {name: {"kernel": rng.standard_normal(shape).astype(np.float32),
                   "bias": rng.standard_normal(shape[1]).astype(np.float32) * 0.1}
            for name, shape in SIZES.items()}


def tiny_loss(params, batch):
    h = batch["image"]
    for name in ("fc1", "fc2"):
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
    logits = h @ params["fc3"]["kernel"] + params["fc3"]["bias"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))


def tiny_batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal((10, 12)).astype(np.float32),
             "label": rng.integers(0, 3, 10).astype(np.int32)} for _ in range(n)]


def kernels_of(tree):
    return {p: np.asarray(x) for p, x in prune.named_leaves(tree) if p.endswith("/kernel")}


def test_snip_scores_are_grad_times_weight_summed_over_batches():
    params, batches = tiny_params(), tiny_batches(3)
    scores = saliency.snip_scores(tiny_loss, params, iter(batches))  # any iterable
    expected = jax.tree.map(np.zeros_like, params)
    for b in batches:
        grads = jax.grad(tiny_loss)(params, b)
        expected = jax.tree.map(lambda e, g, w: e + np.abs(np.asarray(g) * w),
                                expected, grads, params)
    assert jax.tree.structure(scores) == jax.tree.structure(params)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, scores), expected, rtol=1e-5, atol=1e-7)
    one = saliency.snip_scores(tiny_loss, params, batches[:1])
    assert not np.allclose(one["fc1"]["kernel"], scores["fc1"]["kernel"])
    with pytest.raises(ValueError, match="at least one batch"):
        saliency.snip_scores(tiny_loss, params, [])


def test_a_snip_section_prunes_the_lowest_scores_globally_to_the_exact_sparsity():
    params = tiny_params()
    scores = saliency.snip_scores(tiny_loss, params, tiny_batches(2))
    dense = prune.mask_tree_like(params)
    p = stages.stage("snip", "prune", prune={"method": "snip", "sparsity": 0.7}).prune
    pruned_params, masks = sections.prune_once(params, dense, p, scores=scores)
    k_masks, k_scores = kernels_of(masks), kernels_of(scores)
    total = sum(m.size for m in k_masks.values())
    assert sum(int((~m).sum()) for m in k_masks.values()) == round(0.7 * total)
    kept = np.concatenate([k_scores[k][k_masks[k]] for k in k_masks])
    dropped = np.concatenate([k_scores[k][~k_masks[k]] for k in k_masks])
    assert kept.min() >= dropped.max()  # one global top-k of the scores
    per_layer = {k: 1 - m.mean() for k, m in k_masks.items()}
    assert len({round(v, 3) for v in per_layer.values()}) > 1  # not the same in every layer
    assert all(np.asarray(m).all() for path, m in prune.named_leaves(masks) if "bias" in path)
    for k, w in kernels_of(pruned_params).items():
        keep = k_masks[k]
        assert np.all(w[~keep] == 0) and np.all(w[keep] == kernels_of(params)[k][keep])

    # skip_last leaves fc3 dense; carried masks stay pruned and count towards the sparsity.
    prior = jax.tree.map(np.asarray, dense)
    prior["fc2"]["kernel"] = np.zeros(SIZES["fc2"], bool)
    q = stages.stage("snip", "prune", prune={"method": "snip", "sparsity": 0.7,
                                             "skip_last": True}).prune
    _, masks = sections.prune_once(params, prior, q, scores=scores)
    k_masks = kernels_of(masks)
    assert k_masks["fc3/kernel"].all() and not k_masks["fc2/kernel"].any()
    size = k_masks["fc1/kernel"].size + k_masks["fc2/kernel"].size
    assert int((~k_masks["fc1/kernel"]).sum() + (~k_masks["fc2/kernel"]).sum()) == round(0.7 * size)
    fc1 = k_scores["fc1/kernel"]
    assert fc1[k_masks["fc1/kernel"]].min() >= fc1[~k_masks["fc1/kernel"]].max()


def test_random_masks_hit_the_sparsity_and_depend_only_on_the_key():
    params = tiny_params()
    key = jax.random.PRNGKey(3)
    layer = saliency.random_masks(key, params, 0.6, scope="layer")
    for k, m in kernels_of(layer).items():
        assert int((~m).sum()) == round(0.6 * m.size)
    glob = kernels_of(saliency.random_masks(key, params, 0.6, scope="global"))
    total = sum(m.size for m in glob.values())
    assert sum(int((~m).sum()) for m in glob.values()) == round(0.6 * total)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, layer),
                                jax.tree.map(np.asarray, saliency.random_masks(key, params, 0.6)))
    other = saliency.random_masks(jax.random.PRNGKey(4), params, 0.6)
    assert not np.array_equal(other["fc1"]["kernel"], layer["fc1"]["kernel"])
    # Not a magnitude mask: about as many large weights pruned as small ones.
    w, m = np.abs(params["fc1"]["kernel"]), np.asarray(layer["fc1"]["kernel"])
    assert 0.3 < np.mean(w[~m] > np.median(w)) < 0.7
    # Carried masks are respected and count as pruned.
    prior = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    prior["fc1"]["kernel"][:6] = False
    masks = saliency.random_masks(key, params, 0.6, prior_masks=prior)
    fc1 = np.asarray(masks["fc1"]["kernel"])
    assert not fc1[:6].any() and int((~fc1).sum()) == round(0.6 * fc1.size)


def test_the_pipeline_draws_random_masks_from_the_seed_and_the_stage():
    params, dense = tiny_params(), prune.mask_tree_like(tiny_params())
    p = stages.stage("r", "prune", prune={"method": "random", "sparsity": 0.5,
                                          "scope": "global"}).prune
    carry = {"params": params, "masks": dense}

    def draw(seed, i):
        ctx = types.SimpleNamespace(config=types.SimpleNamespace(seed=seed))
        return np.concatenate([m.ravel() for m in kernels_of(
            pipeline._prune_once(ctx, i, p, carry)[1]).values()])

    first = draw(0, 1)
    assert np.mean(~first) == pytest.approx(0.5, abs=1e-3)
    assert np.array_equal(first, draw(0, 1))  # a resumed run draws the same
    assert not np.array_equal(first, draw(1, 1)) and not np.array_equal(first, draw(0, 2))


@pytest.mark.parametrize("prune_section,needle", [
    ({"method": "snip", "sparsity": 0.5, "batches": 0}, "prune.batches=0 must be an int >= 1"),
    ({"method": "snip", "granularity": "channel"}, "granularity must be unstructured"),
    ({"method": "snipp"}, "prune.method='snipp' is not valid; choose one of: none, one_shot, "
                          "gradual, imp, snip, random"),
])
def test_bad_snip_sections_are_one_line_errors(prune_section, needle):
    c = config_lib.default_config()
    c.stages = (stages.stage("s", "prune", prune=prune_section),)
    with pytest.raises(ValueError, match=needle) as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)


def snip_config(**changes):
    """lenet300_100 on digits: SNIP at initialization to 90%, then a short training."""
    c = config_lib.default_config()
    c.dataset.name, c.model.name = "digits", "lenet300_100"
    c.batch_size, c.eval_batch_size = 64, 120
    c.log_every = c.checkpoint_every = 10
    c.progress, c.parallel.num_devices = False, 1
    c.stages = (stages.stage("snip", "prune", prune={"method": "snip", "sparsity": 0.9,
                                                     "batches": 2}),
                stages.stage("train", "train", steps=10),
                stages.stage("random", "evaluate", prune={"method": "random", "sparsity": 0.95,
                                                          "scope": "global"}))
    for k, v in changes.items():
        config_lib.set_value(c, k, v)
    return c


def test_the_command_refuses_bad_snip_overrides_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXACCEL_DEBUG", raising=False)
    path = tmp_path / "snip_experiment.py"
    path.write_text("from jaxaccel.config import from_json\n\n\ndef get_config():\n"
                    f"    return from_json({config_lib.to_json(snip_config())!r})\n")
    argv = ["train", "--config", str(path), "--workdir", str(tmp_path / "run")]
    for override, needle in (("stages.0.prune.method=snipp", "choose one of: none, one_shot, "
                              "gradual, imp, snip, random"),
                             ("stages.0.prune.batches=0", "prune.batches=0 must be an int >= 1")):
        assert cli.main(argv + [f"--config.{override}"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "run")


def test_snip_at_initialization_then_training_keeps_the_sparsity(tmp_path):
    results = jaxaccel.train(snip_config(), str(tmp_path))
    rows = {r["name"]: r for r in results["stages"]}
    assert rows["snip"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rows["train"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rows["random"]["sparsity"] == pytest.approx(0.95, abs=1e-4)  # on top of snip's
    assert rows["train"]["test_accuracy"] > rows["snip"]["test_accuracy"]
    params = jaxaccel.load(str(tmp_path)).variables["params"]
    k = kernels_of(params)
    size = sum(v.size for v in k.values())
    assert sum(int((v == 0).sum()) for v in k.values()) == round(0.9 * size)
    # SNIP is not magnitude pruning: its layers end up with different sparsities.
    assert len({round(float(np.mean(v == 0)), 2) for v in k.values()}) == len(k)
