r"""Reproduction: Evci et al. 2020 (RigL) — dynamic sparse training at 90 / 95 / 98% sparsity with
equal steps: RigL ≥ SET (Mocanu et al. 2018) ≥ static sparse, on LeNet-300-100 and cnn3 (width
1/2) on mnist5k (10% of the training images held out for validation).

Variants (each a whole `stages` override; 3 seeds each; ERK per-layer sparsities throughout):
  * `static`: `static_S/prune` — a random ERK mask at initialization — then STEPS of training
    with the mask fixed;
  * `set`:  one train stage of STEPS, masks initialised at random and updated every
    UPDATE_EVERY steps (drop the smallest kept weights, grow as many at random), cosine-decayed
    drop fraction DROP_FRACTION until 3/4 of the stage;
  * `rigl`: the same, growing where the dense gradient is largest.
Nothing is selected: steps, lr, update_every and drop_fraction are fixed in advance.

Run one point:
  jaxaccel train --config experiments/repro_rigl.py --workdir runs/repro_rigl/x
The reproduction (table with the published ordering):
  scripts/reproduce_rigl.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1.2e-3
STEPS = 1500
UPDATE_EVERY = 100
DROP_FRACTION = 0.3
METHODS = ("static", "set", "rigl")
SPARSITIES = (0.90, 0.95, 0.98)
MODELS = ({"model.name": "lenet300_100"}, {"model.name": "cnn3", "model.width": 0.5})


def pipeline(method: str, sparsity: float) -> tuple:
    """The stages of one point: `method` sparse training at `sparsity` for STEPS steps."""
    tag = f"{method}_{sparsity:.2f}"
    if method == "static":
        return (stage(f"{tag}/prune", "prune", prune={"method": "random", "sparsity": sparsity,
                                                       "distribution": "erk"}),
                stage(f"{tag}/train", "train", steps=STEPS))
    if method in ("set", "rigl"):
        return (stage(f"{tag}/train", "train", steps=STEPS,
                      prune={"method": method, "sparsity": sparsity, "distribution": "erk",
                             "update_every": UPDATE_EVERY, "drop_fraction": DROP_FRACTION}),)
    raise ValueError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = 0.1
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 500
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.log_every = 500
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = pipeline("rigl", 0.95)
    return config


def get_sweep():
    variants = [{"stages": pipeline(m, s)} for s in SPARSITIES for m in METHODS]
    return sweep.product(MODELS, variants, sweep.seeds(3))
