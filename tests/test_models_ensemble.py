"""models.ensemble: the average of the members' probabilities, weighted or not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.models import get_model, init_variables
from jaxaccel.models.ensemble import Ensemble, average_logits


def test_average_logits_is_the_log_of_the_mean_probability():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    p = jax.nn.softmax(logits)
    np.testing.assert_allclose(jnp.exp(average_logits(logits)), p.mean(0), rtol=1e-5)
    w = jnp.array([0.2, 0.0, 0.8])
    np.testing.assert_allclose(jnp.exp(average_logits(logits, w)),
                               0.2 * p[0] + 0.8 * p[2], rtol=1e-5, atol=1e-7)


def test_ensemble_applies_every_member_and_clones():
    model = get_model("lenet300_100", 10, width=0.1)
    members = [init_variables(model, jax.random.key(k), (8, 8, 1)) for k in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    x = jax.random.normal(jax.random.key(9), (2, 8, 8, 1))
    ensemble = Ensemble(model)
    single = jax.jit(lambda v: model.apply(v, x, train=False))  # one compile, not one per op
    singles = jnp.stack([single(v) for v in members])
    np.testing.assert_allclose(jax.jit(ensemble.member_logits)(stacked, x), singles, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(jax.jit(ensemble.apply)(stacked, x), average_logits(singles),
                               rtol=1e-5)
    assert ensemble.clone(conv_impl="xla").model.conv_impl == "xla"
    with pytest.raises(ValueError, match="inference"):
        ensemble.apply(stacked, x, train=True)


def test_an_ensemble_with_a_logistic_stacker_applies_it():
    model = get_model("lenet300_100", 4, width=0.1)
    members = [init_variables(model, jax.random.key(k), (8, 8, 1)) for k in range(2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    x = jax.random.normal(jax.random.key(9), (3, 8, 8, 1))
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(8, 4)), rng.normal(size=4)
    ensemble = Ensemble(model, logistic=(tuple(map(tuple, kernel)), tuple(bias)))
    single = jax.jit(lambda v: model.apply(v, x, train=False))  # one compile, not one per op
    singles = np.stack([np.asarray(single(v)) for v in members])
    want = np.concatenate([singles[0], singles[1]], axis=1) @ kernel + bias
    np.testing.assert_allclose(jax.jit(ensemble.apply)(stacked, x), want, rtol=1e-4, atol=1e-5)
    assert ensemble.clone(conv_impl="xla").logistic == ensemble.logistic
