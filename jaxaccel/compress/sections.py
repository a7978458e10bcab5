"""What a stage's `prune` and `quant` config sections mean, as calls to the compress functions.

The stage schema (`jaxaccel.stages`) says which fields a section has; this module turns a
section into masks, a gradual-pruning mask update, QAT / PTQ configs and the post-training
quantization evaluation. Sections are read by attribute (ml_collections ConfigDicts).

Owns `prune_once`, `gradual_mask_update`, `dynamic_mask_update`, `qat_config`, `ptq_configs`
and `ptq_evaluate`. Imports the other compress modules (prune, saliency, schedules, dynamic,
quant, fold, int8); never the config schema (config, stages), state, the loop or the pipeline.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.compress import dynamic, fold, int8, prune, quant, saliency, schedules


def _mask_kwargs(p: Any) -> dict[str, Any]:
    return dict(scope=p.scope, granularity=p.granularity, n=p.n, m=p.m, norm=p.norm,
                distribution=p.distribution, per_layer=dict(p.per_layer) or None,
                filter_fn=prune.default_filter(skip_first=p.skip_first, skip_last=p.skip_last))


def gradual_mask_update(p: Any, steps: int) -> Callable:
    """`(params, masks, step) -> masks` for Zhu & Gupta's cubic schedule inside a train step."""
    end = p.end_step or max(p.begin_step + p.frequency, (3 * steps) // 4)
    kwargs = _mask_kwargs(p)
    if p.granularity == "n:m":
        raise ValueError("prune.granularity='n:m' has a fixed sparsity; use a one_shot prune stage")

    def update(params, masks, step, grads=None, rng=None):
        # Masks are recomputed on the weights after the update at steps t0, t0+Δt, …, end.
        target = schedules.polynomial(step, initial=p.initial, final=p.sparsity,
                                      begin_step=p.begin_step, end_step=end,
                                      frequency=p.frequency)
        return jax.lax.cond(
            schedules.should_update(step, p.begin_step, end, p.frequency),
            # straight-through (p.ste): ranked on the dense weights afresh, so pruned
            # weights can come back; otherwise the masks only shrink
            lambda: prune.magnitude_masks(params, target,
                                          prior_masks=None if p.ste else masks, **kwargs),
            lambda: masks)

    return update


def dynamic_mask_update(p: Any, steps: int) -> Callable:
    """`(params, masks, step, grads, rng) -> masks` for dynamic sparse training (`p.method`
    "set" or "rigl") inside a train step of a stage of `steps` steps.

    Step 0 of the stage: masks at `p.sparsity` as the section's magnitude masks would have
    them (distribution, scope, skip_first/skip_last, per_layer), applied only where the
    carried masks are denser (a sparser carried layer stays as it is): `set` prunes uniformly
    at random among the kept weights (as Mocanu et al.), `rigl` by magnitude (the weights
    after the step's update). Then at the update steps `p.update_every`, 2 * … < end_step
    (`p.end_step`, 0 = 3/4 of the stage): `dynamic.set_update` (random growth from `rng`) or
    `dynamic.rigl_update` (growth by |grads|, the dense gradient of the step) with the
    cosine-decayed `dynamic.drop_fraction`. Other steps return `masks` unchanged.
    """
    if p.method not in ("set", "rigl"):
        raise ValueError(f"prune.method={p.method!r}: dynamic sparse training is set or rigl")
    if p.granularity != "unstructured":
        raise ValueError(f"prune.method={p.method!r} drops and grows single weights; "
                         f"granularity must be unstructured, got {p.granularity!r}")
    end = p.end_step or max(1, (3 * steps) // 4)
    kwargs = _mask_kwargs(p)

    def update(params, masks, step, grads=None, rng=None):
        if p.method == "rigl" and grads is None:
            raise ValueError("prune.method='rigl' needs the step's dense gradients (grads)")
        if rng is None:
            raise ValueError(f"prune.method={p.method!r} needs a PRNG key (rng)")
        key = jax.random.fold_in(rng, 0x5E7)  # apart from the step's dropout key

        def initial():
            if p.method == "set":
                return saliency.random_masks(key, params, p.sparsity, prior_masks=masks,
                                             **kwargs)
            return prune.magnitude_masks(params, p.sparsity, prior_masks=masks, **kwargs)

        def regrow():
            fraction = dynamic.drop_fraction(step, initial=p.drop_fraction, end_step=end)
            if p.method == "set":
                return dynamic.set_update(key, params, masks, fraction,
                                          filter_fn=kwargs["filter_fn"])
            return dynamic.rigl_update(params, masks, grads, fraction,
                                       filter_fn=kwargs["filter_fn"])

        branch = jnp.where(step == 0, 1, jnp.where(
            dynamic.is_update_step(step, update_every=p.update_every, end_step=end), 2, 0))
        return jax.lax.switch(branch, [lambda: masks, initial, regrow])

    update.grows = True  # the step zeroes the optimizer moments of grown weights
    return update


def prune_once(params, masks, p: Any, *, scores: Any = None, key: Any = None):
    """One-shot, IMP-round, SNIP or random masks (subsets of `masks`), and the params they zero.

    `snip` needs `scores` (`saliency.snip_scores` of `params`) and ranks them in one global
    top-k (`prune.scope` does not apply); `random` needs a PRNG `key` and draws a uniformly
    random mask at the counts a magnitude mask of the section would have (`saliency`).
    """
    kwargs = _mask_kwargs(p)
    if p.method == "snip":
        if scores is None:
            raise ValueError("prune.method='snip' needs the weights' scores (snip_scores)")
        new = saliency.score_masks(scores, p.sparsity, scope="global",
                                   filter_fn=kwargs["filter_fn"], prior_masks=masks)
        return prune.apply_masks(params, new), new
    if p.method == "random":
        if key is None:
            raise ValueError("prune.method='random' needs a PRNG key")
        sparsity = None if p.granularity == "n:m" else p.sparsity
        new = saliency.random_masks(key, params, sparsity, prior_masks=masks, **kwargs)
        return prune.apply_masks(params, new), new
    if p.method == "imp":
        kwargs.pop("per_layer")
        new = schedules.imp_masks(params, masks, p.round, rate=p.rate,
                                  per_layer_rates=dict(p.per_layer_rates) or None, **kwargs)
    else:
        sparsity = None if p.granularity == "n:m" else p.sparsity
        new = prune.magnitude_masks(params, sparsity, prior_masks=masks, **kwargs)
    return prune.apply_masks(params, new), new


def qat_config(q: Any):
    """The `quant.QATConfig` of a stage's `quant` section."""
    return quant.QATConfig(
        weights=quant.QuantConfig(bits=q.weight_bits, symmetric=q.symmetric,
                                  per_channel=q.per_channel, narrow_range=q.symmetric),
        activations=quant.QuantConfig(bits=q.act_bits, symmetric=False, per_channel=False,
                                      observer="ema"),
        delay=q.delay)


def ptq_configs(q: Any):
    """(weight, activation) QuantConfigs for post-training quantization."""
    weights = quant.QuantConfig(bits=q.weight_bits, symmetric=q.symmetric,
                                per_channel=q.per_channel, narrow_range=q.symmetric)
    acts = quant.QuantConfig(bits=q.act_bits, symmetric=False, per_channel=False,
                             observer=q.observer)
    return weights, acts


def ptq_evaluate(model, variables: dict, q: Any, *, input_shape,
                 calibration_images: list, eval_batches: Callable[[str], Iterable[dict]],
                 splits: Sequence[str] = ("test",)) -> dict[str, Any]:
    """Fold BN, calibrate activations, then evaluate fake-quant and real int8 inference.

    `eval_batches(split)` yields dicts with normalised `image`, `label`, `mask`. Returns
    `{"fake_quant": {split: {"accuracy", "loss", "count"}}, "int8": {...} (8-bit symmetric
    weights only), "int8_runtime_bytes", "act_qparams", "weight_config"}`; the qparams are
    those of the BN-folded model.
    """
    folded_model, folded = fold.fold_bn(model, variables, input_shape=input_shape)
    w_cfg, a_cfg = ptq_configs(q)
    act_qparams = quant.calibrate(folded_model, folded, calibration_images, a_cfg)
    fake = jax.jit(lambda v, x: quant.apply_fake_quant(folded_model, v, x, act_qparams,
                                                       weight_config=w_cfg))
    out: dict[str, Any] = {"act_qparams": act_qparams, "weight_config": w_cfg}
    out["fake_quant"] = {s: _accuracy(lambda x: fake(folded, x), eval_batches(s)) for s in splits}
    if q.int8 and q.weight_bits == 8 and q.act_bits == 8 and q.symmetric:
        int8_model = int8.convert_int8(folded, act_qparams, weight_config=w_cfg)
        run = jax.jit(lambda m, x: int8.int8_apply(folded_model, m, x))
        out["int8"] = {s: _accuracy(lambda x: run(int8_model, x), eval_batches(s))
                       for s in splits}
        out["int8_runtime_bytes"] = int8.int8_size_bytes(int8_model)
    return out


def _accuracy(logits_fn: Callable, batches: Iterable[dict]) -> dict[str, float]:
    correct = count = loss = 0.0
    for b in batches:
        logits = np.asarray(logits_fn(jnp.asarray(b["image"])), np.float64)
        mask = np.asarray(b["mask"], np.float64)
        labels = np.asarray(b["label"])
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        loss += float(np.sum(-logp[np.arange(len(labels)), labels] * mask))
        correct += float(np.sum((logits.argmax(-1) == labels) * mask))
        count += float(mask.sum())
    return {"accuracy": correct / max(count, 1.0), "loss": loss / max(count, 1.0),
            "count": int(count)}
