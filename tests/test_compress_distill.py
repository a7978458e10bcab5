"""compress.distill: Hinton et al.'s loss against an independent numpy implementation and its
analytic gradient; renormalisation between dataset specs; calibration error; stacking weights;
the logistic stacker against scikit-learn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxaccel import data
from jaxaccel.compress import distill
from jaxaccel.models import ensemble as ensemble_lib


def _reference(s, t, y, temperature, alpha):
    """The loss written out in numpy, in float64, from its definition."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)
    ce = -np.log(softmax(s)[np.arange(len(y)), y])
    return float(np.mean(alpha * temperature ** 2 * kl + (1 - alpha) * ce))


# jitted once, with the temperature and alpha as traced arguments (as in a train step): each
# example compiles one program for its (batch, classes) shape instead of every op eagerly
_kd_loss = jax.jit(lambda s, t, y, temperature, alpha: distill.kd_loss(
    s, t, y, temperature=temperature, alpha=alpha))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), classes=st.integers(2, 7), temperature=st.floats(0.5, 30.0),
       alpha=st.sampled_from([0.0, 0.3, 0.9, 1.0]), seed=st.integers(0, 1000))
def test_kd_loss_matches_the_definition(batch, classes, temperature, alpha, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 3, (batch, classes)).astype(np.float32)
    t = rng.normal(0, 3, (batch, classes)).astype(np.float32)
    y = rng.integers(0, classes, batch)
    got = float(_kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature, alpha))
    # the soft term is scaled by T^2, so is float32's rounding of its log-probabilities: the
    # KL of two near-uniform distributions (large T) is a difference of O(1) terms, exact to a
    # few float32 ulps (eps = 1.2e-7) before the T^2 (e.g. T=24.5, 3 classes: 9e-5 after it)
    tolerance = 1e-5 + 4 * 1.2e-7 * temperature ** 2
    assert got == pytest.approx(_reference(s, t, y, temperature, alpha), rel=1e-5, abs=tolerance)


def test_edge_cases_alpha_zero_is_cross_entropy_and_equal_logits_cost_nothing_soft():
    s = jnp.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    y = jnp.array([0, 2])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], -1))
    for t in (s, -s):  # alpha 0: the teacher does not matter
        assert float(distill.kd_loss(s, t, y, temperature=3.0, alpha=0.0)) == pytest.approx(
            float(ce), rel=1e-6)
    # alpha 1, the student equal to the teacher: KL is zero whatever the labels
    assert float(distill.kd_loss(s, s, y, temperature=5.0, alpha=1.0)) == pytest.approx(
        0.0, abs=1e-6)


def test_gradient_is_the_analytic_one():
    """d/ds of alpha T^2 KL(p_t || p_s) + (1-alpha) CE = alpha T (p_s - p_t) + (1-alpha)(q - onehot),
    averaged over the batch; the teacher gets no gradient."""
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    y = jnp.array([0, 4, 2, 2])
    temperature, alpha = 6.0, 0.7
    gs, gt = jax.grad(lambda a, b: distill.kd_loss(a, b, y, temperature=temperature,
                                                   alpha=alpha), argnums=(0, 1))(s, t)
    p_s, p_t = jax.nn.softmax(s / temperature), jax.nn.softmax(t / temperature)
    want = (alpha * temperature * (p_s - p_t)
            + (1 - alpha) * (jax.nn.softmax(s) - jax.nn.one_hot(y, 5))) / 4
    np.testing.assert_allclose(gs, want, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(gt))


def test_weighted_examples():
    s, t = jnp.zeros((3, 2)), jnp.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    y = jnp.array([0, 1, 1])
    per = distill.kd_loss_per_example(s, t, y, temperature=2.0, alpha=0.5)
    got = distill.kd_loss(s, t, y, temperature=2.0, alpha=0.5, weights=jnp.array([1, 0, 1]))
    assert float(got) == pytest.approx(float((per[0] + per[2]) / 2), rel=1e-6)


def test_renormalize_maps_one_specs_normalisation_to_anothers():
    raw = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    a = data.DatasetSpec("a", 10, (4, 4, 3), (0.1, 0.2, 0.3), (0.2, 0.3, 0.4), "builtin")
    b = data.DatasetSpec("b", 10, (4, 4, 3), (0.5, 0.4, 0.3), (0.1, 0.25, 0.5), "builtin")
    got = distill.renormalize(jnp.asarray(data.normalize(raw, a)), a, b)
    np.testing.assert_allclose(got, data.normalize(raw, b), rtol=1e-5, atol=1e-5)
    same = jnp.asarray(data.normalize(raw, a))
    assert distill.renormalize(same, a, a) is same


def test_expected_calibration_error():
    labels = np.array([0, 1, 0, 1])
    sure_right = np.array([[9.0, -9], [-9, 9], [9, -9], [-9, 9]])
    assert distill.expected_calibration_error(sure_right, labels) == pytest.approx(0, abs=1e-6)
    sure_wrong = -sure_right
    assert distill.expected_calibration_error(sure_wrong, labels) == pytest.approx(1, abs=1e-6)
    half = np.zeros((4, 2))  # 50% confident, 50% right (argmax picks class 0)
    assert distill.expected_calibration_error(half, labels) == pytest.approx(0, abs=1e-6)


def test_stack_weights_favour_the_member_that_is_right():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    good = np.eye(3)[labels] * 4.0
    noise = rng.normal(0, 2, (200, 3))
    weights = distill.stack_weights(np.stack([noise, good, noise]), labels)
    assert weights.shape == (3,) and weights.sum() == pytest.approx(1, abs=1e-5)
    assert weights[1] > 0.9


def test_logistic_stacker_matches_sklearn():
    """The same L2-regularised multinomial logistic regression as scikit-learn's (whose
    objective is ours times 1 / (N * l2)): the same predictions and the same validation NLL."""
    LogisticRegression = pytest.importorskip("sklearn.linear_model").LogisticRegression
    rng = np.random.default_rng(0)
    k, n, c, l2 = 3, 300, 5, 1e-2
    labels = rng.integers(0, c, n)
    logits = (rng.normal(0, 2, (k, n, c))
              + np.eye(c)[labels][None] * np.array([1.0, 3.0, 0.2])[:, None, None])
    kernel, bias = distill.fit_logistic_stacker(logits, labels, l2=l2)
    assert kernel.shape == (k * c, c) and bias.shape == (c,)
    x = logits.transpose(1, 0, 2).reshape(n, k * c)  # member-major, written out independently
    np.testing.assert_allclose(ensemble_lib.logistic_features(logits), x)
    ref = LogisticRegression(C=1 / (n * l2), tol=1e-12, max_iter=10000).fit(x, labels)

    def centred(z):  # logits are defined up to a constant per example
        return z - z.mean(-1, keepdims=True)

    ours, theirs = x @ kernel + bias, ref.decision_function(x)
    np.testing.assert_allclose(centred(ours), centred(theirs), atol=2e-3)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    z = np.asarray(ensemble_lib.logistic_logits(jnp.asarray(logits), kernel, bias))
    np.testing.assert_allclose(z, ours, rtol=1e-4, atol=1e-4)
    again = distill.fit_logistic_stacker(logits, labels, l2=l2)  # deterministic
    np.testing.assert_array_equal(again[0], kernel)
    np.testing.assert_array_equal(again[1], bias)
