"""compress.sharing and the `cluster` stage kind: gradients summed per cluster (against a
direct computation), shared weights that stay shared and masks that stay intact through
fine-tuning (at most 2^bits distinct values per layer), 8 devices = 1 device, exact resume,
and one-line errors for bad cluster sections."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxaccel
from jaxaccel import artifacts, cli, preemption
from jaxaccel.compress import package, prune, sharing
from jaxaccel.preemption import Preempted
from jaxaccel.stages import stage
from tiny_runs import tiny_config


def test_tie_gradients_sums_each_cluster():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6, 5)).astype(np.float32)
    a = rng.integers(-1, 4, (6, 5)).astype(np.int32)
    tied = sharing.tie_gradients({"k": jnp.asarray(g), "b": jnp.ones(3)},
                                 {"k": jnp.asarray(a), "b": jnp.full((), -1, jnp.int32)})
    expected = np.zeros_like(g)
    for c in range(4):
        expected[a == c] = g[a == c].sum()
    np.testing.assert_allclose(np.asarray(tied["k"]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(tied["b"]), np.ones(3))  # not clustered


def test_snap_ignores_pruned_weights():
    w = jnp.asarray([[-0.5, -0.5000001, 0.0, 0.3]])
    a = jnp.asarray([[0, 0, 0, 1]], jnp.int32)  # the pruned zero still carries index 0
    m = jnp.asarray([[True, True, False, True]])
    out = np.asarray(sharing.snap({"k": w}, {"k": a}, {"k": m})["k"])
    np.testing.assert_array_equal(out, np.float32([[-0.5, -0.5, 0.0, 0.3]]))


def test_tied_adam_keeps_weights_shared_and_masks_intact():
    rng = np.random.default_rng(1)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((40, 30)), jnp.float32),
                        "bias": jnp.zeros(30)}}
    masks = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) > 0.7), params)
    params = prune.apply_masks(params, masks)
    shared, assignments, codebooks = sharing.share_weights(params, masks,
                                                           {"dense/kernel": 3})
    assert sharing.distinct_values(shared, masks) == {"dense/kernel": 8}
    tx = prune.masked(sharing.tied(optax.adam(1e-2)))
    state = sharing.set_assignments(prune.set_masks(tx.init(shared), masks), assignments)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return sharing.snap(p, sharing.get_assignments(s), prune.get_masks(s)), s

    p = shared
    for k in range(5):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), p)
        p, state = step(p, state, g)
    kernel = np.asarray(p["dense"]["kernel"])
    keep = np.asarray(masks["dense"]["kernel"])
    assert np.all(kernel[~keep] == 0.0)
    assert np.unique(kernel[keep]).size <= 8
    # every cluster moved as one value, away from its k-means centroid
    a = np.asarray(assignments["dense"]["kernel"])
    for c in range(8):
        values = np.unique(kernel[a == c])
        assert values.size <= 1
        if values.size:
            assert values[0] != codebooks["dense/kernel"][c]


def _clustered(**changes):
    c = tiny_config(**changes)
    c.stages = (stage("dense", "train", steps=30),
                stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.95}),
                stage("retrain", "train", steps=30, optimizer={"lr": 3e-3}),
                stage("cluster", "cluster", cluster={"bits": 3,
                                                     "per_layer": {"fc3/kernel": 4}}),
                stage("finetune", "train", steps=20, optimizer={"lr": 3e-3}))
    return c


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("clustered"))
    return wd, jaxaccel.train(_clustered(), wd)


def _kernels(workdir):
    params = jaxaccel.load(workdir).variables["params"]
    return {k: np.asarray(v["kernel"]) for k, v in params.items()}


def test_fine_tuned_centroids_stay_shared_with_masks_intact(clustered):
    wd, results = clustered
    rows = {r["name"]: r for r in results["stages"]}
    assert rows["cluster"]["cluster_bits"] == {"fc1/kernel": 3, "fc2/kernel": 3,
                                               "fc3/kernel": 4}
    assert rows["cluster"]["max_shared_values"] <= 16
    assert rows["finetune"]["sparsity"] == pytest.approx(rows["prune"]["sparsity"])
    assert rows["retrain"]["sparsity"] == pytest.approx(rows["prune"]["sparsity"])
    bits = {"fc1": 3, "fc2": 3, "fc3": 4}
    for name, kernel in _kernels(wd).items():
        kept = kernel[kernel != 0]
        assert 1 < np.unique(kept).size <= 2 ** bits[name], name
        assert (kernel == 0).mean() == pytest.approx(0.95, abs=0.01)
    # fine-tuning the shared values recovers accuracy the pruning and clustering lost
    assert rows["finetune"]["test_accuracy"] > rows["cluster"]["test_accuracy"] + 0.02


def test_shared_weights_on_8_devices_equal_one_device(clustered, tmp_path):
    wd = str(tmp_path / "fsdp")
    jaxaccel.train(_clustered(**{"parallel.num_devices": 0, "parallel.strategy": "fsdp"}), wd)
    for name, kernel in _kernels(wd).items():
        np.testing.assert_allclose(kernel, _kernels(clustered[0])[name], rtol=1e-5, atol=1e-5)


def test_a_killed_fine_tuning_resumes_exactly(clustered, tmp_path, monkeypatch):
    wd = str(tmp_path / "resumed")
    calls = {"n": 0}

    def should_stop(self):
        calls["n"] += 1
        return calls["n"] >= 70  # inside the fine-tuning stage (steps 60..80)

    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", should_stop)
    with pytest.raises(Preempted):
        jaxaccel.train(_clustered(), wd)
    monkeypatch.undo()
    jaxaccel.train(_clustered(), wd)
    for name, kernel in _kernels(wd).items():
        np.testing.assert_array_equal(kernel, _kernels(clustered[0])[name])


EXPERIMENT = """
from jaxaccel.config import default_config
from jaxaccel.stages import stage

def get_config():
    c = default_config()
    c.dataset.name, c.model.name, c.parallel.num_devices = "digits", "lenet300_100", 1
    c.stages = (stage("dense", "train", steps=2),
                stage("cluster", "cluster", cluster={"bits": 3}),
                stage("finetune", "train", steps=2))
    return c
"""


@pytest.mark.parametrize("override,needle", [
    ("--config.stages.1.cluster.bits=9", "cluster.bits=9"),
    ("--config.stages.1.cluster.init=kmeans++", "kmeans++"),
    ("--config.stages.0.cluster.bits=4", "only cluster stages cluster"),
    ("--config.stages.1.cluster.bitz=4", "cluster.bits"),
])
def test_bad_cluster_sections_are_one_line_errors(override, needle, tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENT)
    wd = tmp_path / "w"
    rc = cli.main(["train", "--config", str(experiment), "--workdir", str(wd), override])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == cli.EXIT_BAD_INPUT and len(err) == 1 and needle in err[0], err
    assert not wd.exists()


def test_a_per_layer_key_that_names_no_layer_is_refused_before_anything_runs(tmp_path):
    c = _clustered()
    next(st for st in c.stages if st.kind == "cluster").cluster.per_layer = {"fc9/kernel": 4}
    with pytest.raises(ValueError, match="fc9/kernel.*matches no clustered layer"):
        jaxaccel.train(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("entropy", ["none", "huffman"])
def test_a_clustered_run_packages_as_codebook_and_indices_exactly(clustered, entropy, tmp_path):
    out = str(tmp_path / "m.npz")
    info = artifacts.package_run(clustered[0], out, entropy=entropy)
    assert info["shared"] and info["shared_kernels"] == 3 and info["entropy"] == entropy
    meta, _ = package.read_package(out)
    assert {r["encoding"] for r in meta["leaves"] if r["path"].endswith("kernel")} == {"shared"}
    loaded = package.load_compressed(out)
    for name, kernel in _kernels(clustered[0]).items():  # the shared weights, bit for bit
        np.testing.assert_array_equal(np.asarray(loaded.variables["params"][name]["kernel"]),
                                      kernel)
    sizes = info["deep_compression_bytes"]  # Deep Compression's Table 1 columns, shrinking
    assert sizes["dense_float32"] > sizes["pruned"] > sizes["quantized"] > sizes["coded"]
    assert sizes["dense_float32"] / sizes["coded"] >= 40  # 95% sparse, 3-4 bit, Huffman


def test_a_damaged_huffman_stream_is_refused_never_decoded(clustered, tmp_path):
    out = tmp_path / "m.npz"
    artifacts.package_run(clustered[0], str(out), entropy="huffman")
    with np.load(out, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    i = next(k for k, r in enumerate(meta["leaves"]) if r["encoding"] == "shared")
    stream = arrays[f"{i}.values"].copy()
    stream[len(stream) // 2] ^= 0x10  # one flipped bit inside the coded indices
    arrays[f"{i}.values"] = stream
    damaged = tmp_path / "damaged.npz"
    np.savez_compressed(damaged, **arrays)
    with pytest.raises(ValueError, match="damaged package.*corrupted"):
        package.load_compressed(damaged)
