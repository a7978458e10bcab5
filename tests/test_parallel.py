"""jaxaccel.parallel: meshes, where every strategy puts the state and the batch, pmap's
replicas; and the strategies trained end to end on the 8 simulated devices."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxaccel
from jaxaccel import parallel
from tiny_runs import ALL_DEVICES, tiny_config


def final_params(workdir):
    return jaxaccel.load(workdir).variables["params"]


def test_make_mesh_over_all_or_the_first_devices():
    assert jax.device_count() == 8
    mesh = parallel.make_mesh()
    assert mesh.axis_names == (parallel.AXIS,) and mesh.devices.size == 8
    two = parallel.make_mesh(2)
    assert list(two.devices.flat) == jax.devices()[:2]
    with pytest.raises(ValueError, match="num_devices=9 but only 8 devices"):
        parallel.make_mesh(9)


def test_set_cpu_devices_after_start_only_if_it_matches():
    assert jax.device_count() == 8  # the backend has started
    parallel.set_cpu_devices(8)  # already so: nothing to do
    parallel.set_cpu_devices(0)  # 0: leave as is
    with pytest.raises(ValueError, match="cpu_devices=4: JAX already started with 8 devices"):
        parallel.set_cpu_devices(4)


def test_no_distributed_job_unless_one_is_described(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "JAXACCEL_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        parallel.initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"\(got 2, -1\)"):
        parallel.initialize_distributed()


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((64, 300), 8) == P(parallel.AXIS, None)  # 300 % 8 != 0
    assert parallel.fsdp_spec((16, 64), 8) == P(None, parallel.AXIS)
    assert parallel.fsdp_spec((3, 3, 16, 16), 8) == P(None, None, None, parallel.AXIS)  # tie: later
    assert parallel.fsdp_spec((300,), 8) == P()  # nothing divisible: replicated
    assert parallel.fsdp_spec((4,), 8) == P()  # smaller than the mesh
    assert parallel.fsdp_spec((), 8) == P()
    assert parallel.fsdp_spec((64, 64), 1) == P()


def test_state_shardings_of_data_and_fsdp():
    mesh = parallel.make_mesh()
    tree = {"kernel": jax.ShapeDtypeStruct((64, 300), jnp.float32), "bias": jnp.zeros(300),
            "step": jnp.int32(0)}
    data = parallel.state_shardings(tree, mesh, "data")
    assert all(s.is_fully_replicated for s in jax.tree.leaves(data))
    fsdp = parallel.state_shardings(tree, mesh, "fsdp")
    assert fsdp["kernel"].spec == P(parallel.AXIS, None)
    assert fsdp["bias"].spec == P() and fsdp["step"].spec == P()
    placed = jax.device_put(jnp.ones((64, 300)), fsdp["kernel"])
    assert {s.data.shape for s in placed.addressable_shards} == {(8, 300)}  # 1/8 each
    with pytest.raises(ValueError, match="strategy='pmap' has no jit shardings"):
        parallel.state_shardings(tree, mesh, "pmap")


def test_shard_batch_splits_rows_over_the_mesh():
    mesh = parallel.make_mesh()
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "label": np.arange(16, dtype=np.int32)}
    out = parallel.shard_batch(batch, mesh)
    assert out["image"].sharding.spec == P(parallel.AXIS)
    assert sorted(s.index[0].start for s in out["label"].addressable_shards) == list(range(0, 16, 2))
    np.testing.assert_array_equal(out["image"], batch["image"])
    np.testing.assert_array_equal(out["label"], batch["label"])


def test_split_replicate_unreplicate_round_trips():
    batch = {"x": np.arange(16 * 2).reshape(16, 2)}
    split = parallel.split_for_pmap(batch, 8)
    assert split["x"].shape == (8, 2, 2)
    np.testing.assert_array_equal(split["x"].reshape(16, 2), batch["x"])
    assert parallel.split_for_pmap(batch)["x"].shape == (8, 2, 2)  # all local devices
    tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(4)}
    rep = parallel.replicate(tree)
    assert rep["w"].shape == (8, 2, 3) and rep["step"].shape == (8,)
    assert len({s.device for s in rep["w"].addressable_shards}) == 8
    for i in range(8):
        np.testing.assert_array_equal(rep["w"][i], tree["w"])
    back = parallel.unreplicate(rep)
    chex.assert_trees_all_equal(jax.device_get(back), tree)
    two = parallel.replicate(tree, jax.devices()[:2])
    assert two["w"].shape == (2, 2, 3)
    # a pmapped function sees one copy per device
    total = jax.pmap(lambda t: t["w"].sum() + t["step"])(rep)
    np.testing.assert_array_equal(total, np.full(8, 15.0 + 4))


# ----------------------------------------------------------------------------------------
# The strategies trained end to end
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["data", "fsdp", "pmap"])
def test_strategies_on_8_devices_match_one_device(strategy, reference, tmp_path):
    ref_wd, _ = reference
    results = jaxaccel.train(tiny_config(**ALL_DEVICES, **{"parallel.strategy": strategy}), str(tmp_path))
    assert results["num_devices"] == 8 and results["strategy"] == strategy
    chex.assert_trees_all_close(final_params(str(tmp_path)), final_params(ref_wd), atol=1e-5, rtol=0)


def test_fsdp_shards_params(tmp_path):
    from jaxaccel import parallel
    from jaxaccel.state import build
    setup = build(tiny_config())
    abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    sh = parallel.state_shardings(abstract, parallel.make_mesh(), "fsdp")
    kernel = sh.params["fc1"]["kernel"]
    assert kernel.spec != jax.sharding.PartitionSpec()  # (64, 300): 300 % 8 != 0, 64 % 8 == 0
    # Adam moments are sharded like their parameters.
    specs = {str(s.spec) for s in jax.tree.leaves(sh.opt_state)}
    assert str(kernel.spec) in specs
