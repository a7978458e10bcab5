"""jaxaccel.stacked: K states as one program — the plan (mode, layout, scan), steps per
dispatch, each point's batches (exactly TrainBatches'), where stacked states live, and blocks
of steps that give the same states in every mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import config as config_lib, parallel, stacked

@pytest.mark.parametrize("augment", [False, True])
def test_blocks_are_train_batches(augment):
    """Point k's batches in a block are exactly TrainBatches(seed_k).batch(step); without
    augmentation they are gathered and normalised on the device from indices."""
    from jaxaccel import data
    configs = []
    for seed in (0, 1, 0):
        c = config_lib.default_config()
        c.dataset.name, c.batch_size, c.seed = "digits", 16, seed
        c.dataset.crop_padding, c.dataset.flip = (2, True) if augment else (0, False)
        configs.append(c)
    source, spec = data.get_source("digits", "train"), data.dataset_spec("digits")
    batches = stacked.StackedBatches(source, spec, [c.seed for c in configs], batch_size=16,
                                     crop_padding=configs[0].dataset.crop_padding,
                                     flip=configs[0].dataset.flip)
    assert batches.on_device == (not augment)
    arrays = jax.device_put(batches.arrays())
    ref = {s: data.TrainBatches(source, spec, global_batch_size=16, seed=s,
                                crop_padding=configs[0].dataset.crop_padding,
                                flip=configs[0].dataset.flip) for s in (0, 1)}
    start = batches.steps_per_epoch - 1  # crosses an epoch boundary
    by_point = batches.block(start, 3, points_first=True)
    by_step = batches.block(start, 3, points_first=False)
    for k, c in enumerate(configs):
        for t in range(3):
            want = ref[c.seed].batch(start + t)
            for got in (stacked.materialize(arrays, jax.tree.map(lambda x: x[k, t], by_point)),
                        stacked.materialize(arrays, jax.tree.map(lambda x: x[t, k], by_step))):
                for key in ("image", "label"):
                    np.testing.assert_array_equal(np.asarray(got[key]), want[key])


def test_block_steps_divide_every_stop():
    stops = (100, 1000, 0, 2000)  # log_every, checkpoint_every, eval_every, num_steps
    assert stacked.block_steps(stops, 8, 60, 4 * 784) == 25  # 64 MB of input at most
    assert stacked.block_steps(stops, 8, 60, 4) == 100  # indices only
    assert stacked.block_steps(stops, 1, 60, 4 * 64) == 100
    assert stacked.block_steps(stops, 1, 60, 4 * 64, start=730) == 10  # resumed at step 730
    assert stacked.block_steps((100, 1000, 30, 2000), 1, 60, 4 * 64) == 10
    assert stacked.choose_plan(8, 1, "auto", backend="cpu") == ("loop", "batch", True)
    assert stacked.choose_plan(8, 1, "auto", backend="cpu", convolutional=True) == ("vmap", "batch", False)
    assert stacked.choose_plan(8, 4, "auto", backend="gpu", convolutional=True) == ("vmap", "points", True)
    assert stacked.choose_plan(6, 4, "vmap", backend="cpu") == ("vmap", "batch", True)
    with pytest.raises(ValueError, match="mode='fast'"):
        stacked.choose_plan(2, 1, "fast")


def test_state_shardings_of_the_two_layouts():
    mesh = parallel.make_mesh()
    states = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32)}
    points = stacked.state_shardings(states, mesh, "points")
    assert points["w"].spec == jax.sharding.PartitionSpec(parallel.AXIS)  # K over devices
    assert stacked.state_shardings(states, mesh, "batch")["w"].is_fully_replicated


def test_a_block_gives_the_same_states_in_every_mode():
    """S steps of K points: "loop" (K, S, ...), "vmap" scanned (S, K, ...) and one unscanned
    vmapped step agree with the steps taken one by one."""
    def step_fn(state, batch, h):
        new = state * h["decay"] + batch["x"].sum()
        return new, {"loss": new}

    k_points, steps = 3, 4
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((k_points, steps, 2)).astype(np.float32)  # (K, S, B)
    hp = {"decay": np.float32([0.5, 0.9, 1.0])}
    states = np.float32([1.0, 2.0, 3.0])
    want, losses = states.copy(), []
    for t in range(steps):
        want = want * hp["decay"] + xs[:, t].sum(-1)
        losses.append(want.copy())
    loop = jax.jit(stacked.make_block_fn(step_fn, "loop"))
    got, m = loop(states, {"x": xs}, hp, {})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(m["loss"], np.stack(losses), rtol=1e-6)  # (S, K)
    vmap = jax.jit(stacked.make_block_fn(step_fn, "vmap"))
    got, m = vmap(states, {"x": np.swapaxes(xs, 0, 1)}, hp, {})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert m["loss"].shape == (steps, k_points)
    one = jax.jit(stacked.make_block_fn(step_fn, "vmap", scan=False))
    got, m = one(states, {"x": np.swapaxes(xs, 0, 1)[:1]}, hp, {})
    np.testing.assert_allclose(got, states * hp["decay"] + xs[:, 0].sum(-1), rtol=1e-6)
    assert m["loss"].shape == (1, k_points)
