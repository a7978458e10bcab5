"""Tests for jaxaccel.compress.schedules: Zhu & Gupta gradual schedule, IMP rounds, rewinding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxaccel.compress import prune, schedules

SETTINGS = settings(max_examples=25, deadline=None)


def zhu_gupta(step, initial, final, begin, end, freq, power=3):
    """Reference: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at t = last update <= step."""
    if step < begin:
        return initial
    if step >= end:
        return final
    t = begin + (step - begin) // freq * freq
    return final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power


@SETTINGS
@given(begin=st.integers(0, 50), n=st.integers(1, 10), freq=st.integers(1, 20),
       initial=st.floats(0, 0.5), final=st.floats(0.5, 0.99), step=st.integers(0, 400))
def test_polynomial_matches_zhu_gupta(begin, n, freq, initial, final, step):
    end = begin + n * freq
    got = schedules.polynomial(step, initial=initial, final=final, begin_step=begin, end_step=end,
                               frequency=freq)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), zhu_gupta(step, initial, final, begin, end, freq),
                               rtol=1e-5, atol=1e-6)


def test_polynomial_is_piecewise_constant_monotone_and_jittable():
    kw = dict(initial=0.0, final=0.9, begin_step=10, end_step=110, frequency=20)
    steps = jnp.arange(0, 140)
    values = np.asarray(jax.jit(jax.vmap(lambda t: schedules.polynomial(t, **kw)))(steps))
    assert (values[:10] == 0.0).all() and (values[110:] == np.float32(0.9)).all()
    assert (np.diff(values) >= 0).all()
    changes = set(np.nonzero(np.diff(values))[0] + 1)
    assert changes == {30, 50, 70, 90, 110}  # only at update steps (t0 itself gives s_i = 0)
    np.testing.assert_allclose(values[30], 0.9 * (1 - (1 - 20 / 100) ** 3), rtol=1e-6)
    np.testing.assert_allclose(
        schedules.polynomial(30, **kw, power=1), 0.9 * 0.2, rtol=1e-6)


def test_should_update_marks_exactly_the_update_steps():
    steps = jnp.arange(0, 100)
    got = np.asarray(jax.jit(lambda t: schedules.should_update(t, 10, 50, 10))(steps))
    assert set(np.nonzero(got)[0]) == {10, 20, 30, 40, 50}


def test_one_shot():
    got = jax.jit(lambda t: schedules.one_shot(t, 0.8, 5))(jnp.arange(8))
    np.testing.assert_allclose(np.asarray(got), [0] * 5 + [0.8] * 3, rtol=1e-7)


@pytest.mark.parametrize("call, match", [
    (lambda: schedules.polynomial(0, initial=0, final=1.0, begin_step=0, end_step=10, frequency=1),
     r"final=1.0 outside \[0, 1\)"),
    (lambda: schedules.polynomial(0, initial=-0.1, final=0.5, begin_step=0, end_step=10, frequency=1),
     r"initial=-0.1"),
    (lambda: schedules.polynomial(0, initial=0, final=0.5, begin_step=10, end_step=10, frequency=1),
     r"end_step=10 must be > begin_step=10"),
    (lambda: schedules.should_update(0, 0, 10, 0), r"frequency=0"),
    (lambda: schedules.one_shot(0, 1.5, 0), r"target=1.5"),
    (lambda: schedules.imp_sparsity(-1), r"round=-1"),
    (lambda: schedules.imp_sparsity(2, rate=1.0), r"rate=1.0"),
])
def test_bad_schedule_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gradual_pruning_inside_jitted_step_reaches_final_sparsity():
    params = {"fc1": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32),
                      "bias": jnp.zeros(16)}}
    tx = prune.masked(optax.sgd(0.01))
    kw = dict(initial=0.0, final=0.75, begin_step=2, end_step=12, frequency=2)

    @jax.jit
    def step(params, opt_state, t):
        opt_state = jax.lax.cond(
            schedules.should_update(t, kw["begin_step"], kw["end_step"], kw["frequency"]),
            lambda s: prune.set_masks(s, prune.magnitude_masks(params, schedules.polynomial(t, **kw),
                                                               prior_masks=prune.get_masks(s))),
            lambda s: s, opt_state)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    history = []
    for t in range(16):
        params, opt_state = step(params, opt_state, t)
        history.append(int(jnp.sum(params["fc1"]["kernel"] == 0)))
    assert history[-1] == round(0.75 * 32 * 16)
    assert history == sorted(history) and history[1] == 0


# ----------------------------------------------------------------------------- IMP


def mlp(seed):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {"fc1": {"kernel": f32(40, 30), "bias": jnp.zeros(30)},
            "fc2": {"kernel": f32(30, 20), "bias": jnp.zeros(20)},
            "fc3": {"kernel": f32(20, 10), "bias": jnp.zeros(10)}}


def test_imp_sparsity_formula():
    assert schedules.imp_sparsity(0) == 0.0
    assert schedules.imp_sparsity(1) == pytest.approx(0.2)
    assert schedules.imp_sparsity(3, rate=0.2) == pytest.approx(1 - 0.8 ** 3)
    assert schedules.imp_sparsities(2, {"fc3/kernel": 0.1}) == {"fc3/kernel": pytest.approx(0.19)}


def test_imp_rounds_prune_remaining_weights_and_nest():
    masks = prune.mask_tree_like(mlp(0))
    for r in range(1, 6):
        params = mlp(r)  # "trained" weights differ every round
        trained = prune.apply_masks(params, masks)
        new = schedules.imp_masks(trained, masks, r, rate=0.2, per_layer_rates={"fc3/kernel": 0.1})
        for path, w in prune.named_leaves(params):
            a, b = np.asarray(dict(prune.named_leaves(new))[path]), np.asarray(dict(prune.named_leaves(masks))[path])
            assert not np.any(a & ~b), f"round {r}: {path} not a subset of the previous mask"
            if path.endswith("kernel"):
                rate = 0.1 if path == "fc3/kernel" else 0.2
                want = int(np.round(np.float32(1 - (1 - rate) ** r) * np.float32(w.size)))
                assert a.size - a.sum() == want
                # this round removed ~rate of what was left
                assert abs((b.sum() - a.sum()) - rate * b.sum()) <= 1.5
            else:
                assert a.all()
        masks = new


def test_rewind_and_random_reinit():
    init, trained = mlp(0), mlp(1)
    masks = prune.magnitude_masks(trained, 0.5)
    rewound = schedules.rewind(trained, init, masks)
    for r, i, mk in zip(jax.tree.leaves(rewound), jax.tree.leaves(init), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(r), np.where(np.asarray(mk), np.asarray(i), 0))
    bad = dict(init, fc3={"kernel": jnp.zeros((20, 11)), "bias": jnp.zeros(10)})
    with pytest.raises(ValueError, match=r"rewind_params\['fc3/kernel'\] has shape \(20, 11\)"):
        schedules.rewind(trained, bad, masks)

    fresh = schedules.random_reinit(mlp, 7, masks)
    reference = mlp(7)
    for f, ref, i, mk in zip(jax.tree.leaves(fresh), jax.tree.leaves(reference), jax.tree.leaves(init),
                             jax.tree.leaves(masks)):
        mk = np.asarray(mk)
        np.testing.assert_array_equal(np.asarray(f), np.where(mk, np.asarray(ref), 0))
    assert not np.allclose(np.asarray(fresh["fc1"]["kernel"]), np.asarray(rewound["fc1"]["kernel"]))
