"""jaxaccel.trees: the names of parameter leaves ("conv1/kernel") and which are kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccel import trees


def test_path_str_and_named_leaves_in_jax_order():
    tree = {"fc2": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)},
            "conv1": {"kernel": np.ones((3, 3, 1, 4))}, "blocks": [{"w": 1.0}, {"w": 2.0}]}
    named = trees.named_leaves(tree)
    assert [p for p, _ in named] == ["blocks/0/w", "blocks/1/w", "conv1/kernel", "fc2/bias",
                                     "fc2/kernel"]  # dict keys sorted, as JAX flattens
    assert [leaf for _, leaf in named][:2] == [1.0, 2.0]
    path, _ = jax.tree_util.tree_flatten_with_path(tree)[0][2]
    assert trees.path_str(path) == "conv1/kernel"
    assert trees.path_str(()) == ""
    # attribute keys (dataclass-like pytrees, e.g. optimizer states) are named too
    state = optax.adam(0.1).init({"w": jnp.ones(2)})
    names = [p for p, _ in trees.named_leaves(state)]
    assert "0/mu/w" in names and "0/count" in names


def test_is_kernel_means_a_kernel_of_two_or_more_dims():
    assert trees.is_kernel("conv1/kernel", np.ones((3, 3, 1, 4)))
    assert trees.is_kernel("fc/kernel", jax.ShapeDtypeStruct((4, 2), jnp.float32))
    assert not trees.is_kernel("fc/bias", np.ones((4, 2)))
    assert not trees.is_kernel("scale/kernel", np.ones(4))  # 1-D: not a conv/dense kernel
    assert not trees.is_kernel("kernel_norm", np.ones((4, 2)))
    assert trees.is_kernel("block/proj/kernel", [[1.0, 2.0]])  # anything with an ndim
