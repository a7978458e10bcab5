"""jaxaccel.sweep.space: building sweeps — grid, seeds, product, zipit, concat, sample."""
import numpy as np
import pytest

from jaxaccel import sweep

def test_grid_product_zip_concat_seeds():
    g = sweep.product(sweep.grid("optimizer.lr", [1e-3, 3e-3]), sweep.grid("model.width", [0.5, 1.0]),
                      sweep.seeds(2))
    assert len(g) == 8
    assert g[0] == {"optimizer.lr": 1e-3, "model.width": 0.5, "seed": 0}
    assert g[-1] == {"optimizer.lr": 3e-3, "model.width": 1.0, "seed": 1}
    z = sweep.zipit(sweep.grid("optimizer.lr", [1, 2]), sweep.grid("seed", [5, 6]))
    assert z == [{"optimizer.lr": 1, "seed": 5}, {"optimizer.lr": 2, "seed": 6}]
    assert sweep.concat(z, [{}]) == z + [{}]
    with pytest.raises(ValueError, match="different lengths"):
        sweep.zipit(sweep.grid("a", [1, 2]), sweep.grid("b", [1]))
    with pytest.raises(ValueError, match="'seed' is set twice"):
        sweep.product(sweep.seeds(2), sweep.seeds(2))
    with pytest.raises(ValueError, match="no values"):
        sweep.grid("optimizer.lr", [])


def test_sample_is_deterministic_and_in_range():
    space = {"optimizer.lr": sweep.loguniform(1e-4, 1e-1), "label_smoothing": sweep.uniform(0, 0.2),
             "optimizer.name": ["adam", "sgd"]}
    a, b = sweep.sample(space, 20, seed=3), sweep.sample(space, 20, seed=3)
    assert a == b and a != sweep.sample(space, 20, seed=4)
    for p in a:
        assert 1e-4 <= p["optimizer.lr"] <= 1e-1 and 0 <= p["label_smoothing"] <= 0.2
        assert p["optimizer.name"] in ("adam", "sgd")
    with pytest.raises(ValueError, match="0 < low < high"):
        sweep.loguniform(0, 1)


def test_distributions_draw_short_values_in_range():
    rng = np.random.default_rng(0)
    u = sweep.uniform(0.1, 0.2, digits=2)
    values = [u.draw(rng) for _ in range(50)]
    assert all(0.1 <= v <= 0.2 and v == float(f"{v:.2g}") for v in values)
    assert sweep.choice(["a", "b"]).draw(rng) in ("a", "b")
    assert sweep.sample({"k": [3]}, 2) == [{"k": 3}, {"k": 3}]  # a list is a choice
    assert sweep.seeds(3, start=5) == [{"seed": 5}, {"seed": 6}, {"seed": 7}]
    assert sweep.seeds(1, key="dataset.validation_seed") == [{"dataset.validation_seed": 0}]
    for bad, match in ((lambda: sweep.uniform(1, 1), "low < high"),
                       (lambda: sweep.choice([]), "no values"),
                       (lambda: sweep.seeds(0), "n must be positive"),
                       (lambda: sweep.sample({"k": [1]}, 0), "n must be positive")):
        with pytest.raises(ValueError, match=match):
            bad()
