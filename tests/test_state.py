"""jaxaccel.state: optimizers and schedules (also fed traced hyperparameters), the loss,
train and eval steps, `build` and the abstract target a checkpoint restores into."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import config as config_lib, stages
from jaxaccel import state as state_lib
from jaxaccel.compress import prune
from tiny_runs import tiny_config


@pytest.mark.parametrize("name,schedule", [("sgd", "piecewise"), ("adam", "cosine"),
                                           ("adamw", "warmup_cosine"), ("sgd", "constant")])
def test_optimizers_and_schedules(name, schedule):
    import jax.numpy as jnp
    import optax
    from jaxaccel import state as state_lib
    opt = config_lib.default_config().optimizer
    opt.name, opt.schedule, opt.lr = name, schedule, 0.1
    opt.boundaries, opt.warmup_steps, opt.weight_decay, opt.grad_clip_norm = (10, 20), 5, 1e-4, 1.0
    tx, sched = state_lib.make_optimizer(opt, 40)
    if schedule == "piecewise":
        assert [float(sched(s)) for s in (0, 10, 20)] == pytest.approx([0.1, 0.01, 0.001])
    if schedule == "warmup_cosine":
        assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.1)
    if schedule == "cosine":
        assert float(sched(40)) == pytest.approx(0.0, abs=1e-7)
    params = {"w": jnp.ones((3,))}
    updates, _ = tx.update({"w": jnp.full((3,), 100.0)}, tx.init(params), params)
    # clipping to global norm 1: no update is larger than lr * (clipped grad + decay) allows
    assert float(optax.tree.norm(updates)) < 1.0


def test_label_smoothing_changes_loss():
    import jax.numpy as jnp
    from jaxaccel import state as state_lib
    logits = jnp.array([[10.0, 0.0, 0.0]])
    plain = state_lib.cross_entropy(logits, jnp.array([0]), 3)
    smooth = state_lib.cross_entropy(logits, jnp.array([0]), 3, label_smoothing=0.1)
    assert float(smooth[0]) > float(plain[0])


@pytest.mark.parametrize("name,schedule,decay", [
    ("adam", "cosine", 0.0), ("adamw", "constant", 1e-2), ("sgd", "piecewise", 1e-3),
    ("adamw", "warmup_cosine", 1e-2),
])
def test_traced_hyperparameters_give_the_plain_optimizers_updates(name, schedule, decay):
    """`make_optimizer(opt, n, values)` with the values as traced arrays (one compiled step
    for many sweep points) updates exactly like the optimizer built from the numbers."""
    opt = config_lib.default_config().optimizer
    opt.name, opt.schedule, opt.lr, opt.weight_decay = name, schedule, 0.05, decay
    opt.warmup_steps, opt.boundaries, opt.momentum, opt.b1 = 2, (3,), 0.8, 0.7
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    grads = {"w": jnp.linspace(0.5, -0.3, 6)}
    plain_tx, plain_schedule = state_lib.make_optimizer(opt, 10)

    @jax.jit
    def traced(values):
        tx, schedule_fn = state_lib.make_optimizer(opt, 10, values)
        s, p, out = tx.init(params), params, []
        for _ in range(4):
            u, s = tx.update(grads, s, p)
            p = optax.apply_updates(p, u)
            out.append(p["w"])
        return jnp.stack(out), jnp.stack([schedule_fn(t) for t in range(5)])

    values = {k: jnp.float32(getattr(opt, k)) for k in state_lib.HYPERPARAMETERS}
    got, got_lr = traced(values)
    s, p = plain_tx.init(params), params
    for i in range(4):
        u, s = plain_tx.update(grads, s, p)
        p = optax.apply_updates(p, u)
        np.testing.assert_allclose(got[i], p["w"], rtol=1e-5, atol=1e-6)  # fused vs eager
    np.testing.assert_allclose(got_lr, [plain_schedule(t) for t in range(5)], rtol=1e-6)
    other, _ = traced({**values, "lr": jnp.float32(0.5)})
    assert not np.allclose(other, got)  # the traced lr is really used


def test_make_schedule_shapes_and_bad_name():
    opt = config_lib.default_config().optimizer
    opt.lr = 0.1
    assert float(state_lib.make_schedule(opt, 100)(57)) == pytest.approx(0.1)  # constant
    opt.schedule = "cosine"
    assert float(state_lib.make_schedule(opt, 100)(50)) == pytest.approx(0.05)
    assert float(state_lib.make_schedule(opt, 100, lr=1.0)(0)) == pytest.approx(1.0)
    opt.schedule = "linear"
    with pytest.raises(ValueError, match="schedule='linear'.*constant, cosine"):
        state_lib.make_schedule(opt, 100)


def test_cross_entropy_is_the_negative_log_likelihood():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    labels = jnp.array([0, 2])
    want = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(state_lib.cross_entropy(logits, labels, 3), want, rtol=1e-6)
    # smoothing eps: targets (1 - eps) one-hot + eps / classes
    smooth = state_lib.cross_entropy(logits, labels, 3, label_smoothing=0.3)
    targets = 0.7 * jax.nn.one_hot(labels, 3) + 0.1
    np.testing.assert_allclose(smooth, -(targets * jax.nn.log_softmax(logits)).sum(-1),
                               rtol=1e-6)


def test_build_wraps_the_optimizer_in_masks_and_steps_learn():
    setup = state_lib.build(tiny_config(batch_size=8))
    assert setup.input_shape == (1, 8, 8, 1) and setup.spec.name == "digits"
    state = jax.jit(setup.init_state)(jax.random.PRNGKey(0))
    masks = prune.get_masks(state.opt_state)  # all True until something prunes
    assert all(np.asarray(m).all() for m in jax.tree.leaves(masks))
    assert int(state.step) == 0 and state.qat == {}
    step = jax.jit(state_lib.make_train_step(setup.model, setup.tx, setup.schedule,
                                             num_classes=10))
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 8, 8, 1)).astype(np.float32),
             "label": np.arange(8, dtype=np.int32)}
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert int(state.step) == 5 and losses[-1] < losses[0]
    assert set(m) == {"loss", "accuracy", "grad_norm", "lr", "nonfinite"} and int(m["nonfinite"]) == 0
    sums = jax.jit(state_lib.make_eval_step(setup.model, num_classes=10))(
        state, {**batch, "mask": np.arange(8) < 6})
    assert float(sums["count"]) == 6 and 0 <= float(sums["correct"]) <= 6


def test_a_skipped_nonfinite_update_keeps_the_state_but_advances_the_step():
    setup = state_lib.build(tiny_config(batch_size=8))
    state = jax.jit(setup.init_state)(jax.random.PRNGKey(0))
    bad = {"image": np.full((8, 8, 8, 1), np.nan, np.float32), "label": np.zeros(8, np.int32)}
    step = jax.jit(state_lib.make_train_step(setup.model, setup.tx, setup.schedule,
                                             num_classes=10, skip_nonfinite=True))
    new, m = step(state, bad)
    assert int(m["nonfinite"]) == 1 and int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)


def test_checkpoint_target_of_train_stages():
    c = tiny_config()
    setup, target = state_lib.checkpoint_target(c, 0)
    assert set(target) == {"state"}
    assert jax.tree.structure(target["state"]) == jax.tree.structure(
        jax.eval_shape(setup.init_state, jax.random.PRNGKey(0)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target["state"]))
    c.stages = (stages.stage("train", "train", steps=4),
                stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.5}),
                stages.stage("rewind", "rewind"), stages.stage("retrain", "train", steps=4))
    _, target = state_lib.checkpoint_target(c, 3)
    assert set(target) == {"state", "snapshot"}  # a rewind to the snapshot needs it back
    assert jax.tree.structure(target["snapshot"]) == jax.tree.structure(target["state"].params)
    for index in (1, 4):
        with pytest.raises(ValueError, match=f"stage {index}, which is not a train stage"):
            state_lib.checkpoint_target(c, index)


def test_check_structure_refuses_another_state():
    setup = state_lib.build(tiny_config())
    abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    state_lib.check_structure(abstract, abstract)
    with pytest.raises(ValueError, match="does not match"):
        state_lib.check_structure(abstract, abstract.replace(params={}))
