"""BatchNorm folding: turn conv -> BN (eval mode) into one conv with a bias.

For a conv kernel k (HWIO, output channel last) followed by BatchNorm with scale g, bias b,
running mean m, running var v and epsilon eps:  f = g / sqrt(v + eps),
folded kernel = k * f (per output channel), folded bias = (conv_bias - m) * f + b.
The folded model is the same model built with `use_bn=False` (the convs that were followed
by BN then carry biases, the BN layers are gone), the project's contract for BN models.

Which BN belongs to which conv is found by tracing the model once (abstractly, no FLOPs) with
`flax.linen.intercept_methods`: a BN is paired with the conv whose output it receives directly.

Owns `fold_bn`, `fold_conv_bn` and `find_conv_bn_pairs`. Imports only `compress.quant`
(`layer_kind`) of jaxaccel; never config, stages, state, the loop or anything above.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.compress.quant import layer_kind


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _pop(tree: dict, path: tuple[str, ...]) -> None:
    """Remove the subtree at `path` and any dicts left empty above it."""
    parents = [tree]
    for p in path[:-1]:
        parents.append(parents[-1][p])
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if not parents[depth]:
            parents[depth - 1].pop(path[depth - 1])


def find_conv_bn_pairs(model: nn.Module, input_shape: Sequence[int] = (1, 32, 32, 3)) -> list[dict]:
    """[{conv: path tuple, bn: path tuple, epsilon, use_scale, use_bias}] for each BN fed by a conv.

    Traces `model.init` abstractly on zeros of `input_shape` (NHWC; any shape the model accepts).
    Raises ValueError if a BatchNorm does not directly follow a conv (it could not be folded).
    """
    conv_out: dict[int, tuple[tuple[str, ...], Any]] = {}
    pairs: list[dict] = []
    unpaired: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if layer_kind(module) == "conv" and not isinstance(out, tuple):  # kernel exists after the call
            conv_out[id(out)] = (tuple(module.path), out)  # keep `out` alive so ids stay unique
        elif isinstance(module, nn.BatchNorm):
            src = conv_out.get(id(args[0]))
            axis = module.axis if isinstance(module.axis, int) else None
            if src is None or src[1] is not args[0] or axis not in (-1, args[0].ndim - 1):
                unpaired.append("/".join(module.path))
            else:
                pairs.append(dict(conv=src[0], bn=tuple(module.path), epsilon=float(module.epsilon),
                                  use_scale=bool(module.use_scale), use_bias=bool(module.use_bias)))
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    if unpaired:
        raise ValueError(f"BatchNorm layer(s) {', '.join(unpaired)} do not directly follow a conv "
                         "(over the channel axis); cannot fold them")
    return pairs


def fold_conv_bn(kernel: jax.Array, conv_bias: jax.Array | None, scale: jax.Array | None,
                 bias: jax.Array | None, mean: jax.Array, var: jax.Array,
                 epsilon: float) -> tuple[jax.Array, jax.Array]:
    """(folded kernel, folded bias) for one conv (output channel last) followed by eval-mode BN."""
    factor = jax.lax.rsqrt(var.astype(jnp.float32) + epsilon)
    if scale is not None:
        factor = factor * scale
    new_kernel = (kernel * factor).astype(kernel.dtype)
    b0 = jnp.zeros_like(mean) if conv_bias is None else conv_bias
    new_bias = (b0 - mean) * factor
    if bias is not None:
        new_bias = new_bias + bias
    return new_kernel, new_bias.astype(kernel.dtype)


def fold_bn(model: nn.Module, variables: Mapping, *,
            input_shape: Sequence[int] = (1, 32, 32, 3)) -> tuple[nn.Module, dict]:
    """Fold every BatchNorm into the conv before it: returns (model.clone(use_bn=False), variables).

    The folded model in eval mode computes the same function as `model` in eval mode (up to float
    rounding). A model without BatchNorm is returned unchanged. `input_shape` is only used for an
    abstract trace that discovers the conv -> BN pairs. Works on sharded params (the folded leaves
    keep the sharding of the kernels they come from).
    """
    pairs = find_conv_bn_pairs(model, input_shape)
    if not pairs:
        return model, dict(variables)
    if "use_bn" not in getattr(model, "__dataclass_fields__", {}):
        raise ValueError(f"model {type(model).__name__} has BatchNorm but no `use_bn` field; "
                         "cannot build its folded form")
    params = _to_dict(variables["params"])
    stats = _to_dict(variables.get("batch_stats", {}))
    for pair in pairs:
        conv = _get(params, pair["conv"])
        bn_params = _get(params, pair["bn"]) if (pair["use_scale"] or pair["use_bias"]) else {}
        bn_stats = _get(stats, pair["bn"])
        kernel, bias = fold_conv_bn(
            conv["kernel"], conv.get("bias"), bn_params.get("scale") if pair["use_scale"] else None,
            bn_params.get("bias") if pair["use_bias"] else None, bn_stats["mean"], bn_stats["var"],
            pair["epsilon"])
        conv["kernel"], conv["bias"] = kernel, bias
        if bn_params:
            _pop(params, pair["bn"])
        _pop(stats, pair["bn"])
    folded_model = model.clone(use_bn=False)
    expected = jax.eval_shape(lambda x: folded_model.init(jax.random.key(0), x, train=False),
                              jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))["params"]
    want = sorted(map(jax.tree_util.keystr, (p for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0])))
    got = sorted(map(jax.tree_util.keystr, (p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])))
    if want != got:
        diff = sorted(set(want) ^ set(got))
        raise ValueError(f"folded params do not match {type(model).__name__}(use_bn=False): differing leaves {diff}")
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out.update(params=params, batch_stats=stats)
    return folded_model, out
