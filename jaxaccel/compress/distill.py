"""Knowledge distillation (Hinton et al. 2015) and the ensemble combinations a teacher can be.

`kd_loss(student_logits, teacher_logits, labels, *, temperature, alpha)` is the batch mean of

    alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

(the T**2 keeps the soft term's gradient scale comparable across temperatures). A teacher that
is an ensemble gives the log of its members' mean probabilities as its logits
(`models.ensemble.average_logits`),
or, stacked by `fit_logistic_stacker`, a logistic regression over all their logits,
so its soft targets at temperature T are those of the averaged model. `renormalize` maps images
normalised for one dataset spec to another's, so a teacher trained with its own normalisation
sees what it was trained on.

Pure functions of arrays (jit-, vmap- and grad-able; specs are read by attribute). Imports
`models.ensemble` only; never config, state, the loop or anything above.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.models.ensemble import average_logits, logistic_features


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
            temperature: float, alpha: float, weights: jax.Array | None = None) -> jax.Array:
    """Batch mean of Hinton et al.'s distillation loss (see the module docstring).

    `temperature` > 0, `alpha` in [0, 1] (alpha = 1: soft targets only; 0: plain
    cross-entropy). `weights` (B,), if given, weights the examples (mean over their sum).
    The teacher's logits are a constant target: no gradient flows into them.
    """
    per_example = kd_loss_per_example(student_logits, teacher_logits, labels,
                                      temperature=temperature, alpha=alpha)
    if weights is None:
        return jnp.mean(per_example)
    weights = weights.astype(per_example.dtype)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kd_loss_per_example(student_logits: jax.Array, teacher_logits: jax.Array,
                        labels: jax.Array, *, temperature: float, alpha: float) -> jax.Array:
    """`kd_loss` of every example, (B,)."""
    s = student_logits.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), labels[:, None].astype(jnp.int32),
                              axis=-1)[:, 0]
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce


def renormalize(images: jax.Array, source: Any, target: Any) -> jax.Array:
    """Images normalised with `source`'s per-channel mean/std (0..1 units, as
    `data.DatasetSpec`) re-expressed with `target`'s: the same pixels, normalised for the
    model trained on `target`. The identity (returned as is) when the two agree."""
    if tuple(source.mean) == tuple(target.mean) and tuple(source.std) == tuple(target.std):
        return images
    s_mean, s_std = np.asarray(source.mean, np.float32), np.asarray(source.std, np.float32)
    t_mean, t_std = np.asarray(target.mean, np.float32), np.asarray(target.std, np.float32)
    scale = s_std / t_std
    shift = (s_mean - t_mean) / t_std
    return images * scale + shift


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
                               *, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): the confidence-weighted gap between
    accuracy and mean top-1 confidence over `bins` equal-width confidence bins."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    keep = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    logits, labels = logits[keep], labels[keep]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    confidence, prediction = p.max(-1), p.argmax(-1)
    correct = prediction == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def stack_weights(member_logits: np.ndarray, labels: np.ndarray, *, steps: int = 500,
                  lr: float = 0.1) -> np.ndarray:
    """Per-member weights (non-negative, summing to 1) that minimise the validation NLL of the
    weighted average of the members' probabilities (stacking, Wolpert 1992; fit on validation
    examples only). `member_logits` (K, N, C), `labels` (N,)."""
    logits = jnp.asarray(member_logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)

    def nll(theta):
        combined = average_logits(logits, jax.nn.softmax(theta))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(combined), labels[:, None],
                                             axis=-1))

    grad = jax.jit(jax.value_and_grad(nll))
    theta = jnp.zeros(logits.shape[0])
    m = v = jnp.zeros_like(theta)
    for i in range(1, steps + 1):  # Adam on K numbers: deterministic, no extra dependency
        _, g = grad(theta)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        theta = theta - lr * (m / (1 - 0.9 ** i)) / (jnp.sqrt(v / (1 - 0.999 ** i)) + 1e-8)
    return np.asarray(jax.nn.softmax(theta))


def fit_logistic_stacker(member_logits: np.ndarray, labels: np.ndarray, *, l2: float = 1e-2,
                         max_iter: int = 1000, tol: float = 1e-10
                         ) -> tuple[np.ndarray, np.ndarray]:
    """A logistic-regression stacker (Wolpert 1992): the multinomial logistic regression
    `logits = features @ W + b` over the members' concatenated logits
    (`logistic_features`, K*C features -> C classes) that minimises

        mean_n CE(features_n @ W + b, labels_n) + l2 / 2 * ||W||^2

    (the bias is not penalised), fit by L-BFGS in float64 from the plain average of the
    members' logits (W = [I; ...; I] / K, b = 0). Deterministic; fit it on validation
    examples only. `member_logits` (K, N, C), `labels` (N,) -> (W (K*C, C), b (C,)), float32.
    The objective is strictly convex for l2 > 0, so the optimum is unique.
    """
    from scipy import optimize  # jax's own dependency; only this fit needs it

    x = logistic_features(np.asarray(member_logits, np.float64))
    y = np.asarray(labels, np.int64)
    k, n, c = np.shape(member_logits)
    onehot = np.eye(c)[y]

    def objective(theta):
        w, b = theta[:-c].reshape(k * c, c), theta[-c:]
        z = x @ w + b
        z = z - z.max(-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        loss = -np.mean(np.sum(onehot * log_p, -1)) + 0.5 * l2 * np.sum(w * w)
        dz = (np.exp(log_p) - onehot) / n
        return loss, np.concatenate([(x.T @ dz + l2 * w).ravel(), dz.sum(0)])

    theta0 = np.concatenate([np.tile(np.eye(c), (k, 1)).ravel() / k, np.zeros(c)])
    fit = optimize.minimize(objective, theta0, jac=True, method="L-BFGS-B",
                            options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-8})
    return (fit.x[:-c].reshape(k * c, c).astype(np.float32), fit.x[-c:].astype(np.float32))

