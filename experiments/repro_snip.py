r"""Reproduction: Lee et al. 2019 (SNIP) — LeNet-300-100 on mnist5k pruned at initialization to
90 / 95 / 98% by connection sensitivity, against random pruning at initialization (the
control) and magnitude pruning after training, with the same total steps.

Variants (each a whole `stages` override; 3 seeds each):
  * `snip`:      `snip/prune` at initialization (|dL/dw * w| summed over 1 training batch, one
                 global ranking) -> `snip/train` TOTAL_STEPS;
  * `random`:    `random/prune` at initialization, uniformly at random per layer -> train;
  * `magnitude`: `magnitude/dense` DENSE_STEPS -> one-shot global magnitude pruning ->
                 `magnitude/finetune` TOTAL_STEPS - DENSE_STEPS (the usual after-training
                 baseline, same total steps).
Nothing is selected: steps, lr and sparsities are fixed in advance.

Run one point:
  jaxaccel train --config experiments/repro_snip.py --workdir runs/repro_snip/x
The reproduction (table with the published numbers):
  scripts/reproduce_snip.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1.2e-3
TOTAL_STEPS = 1500
DENSE_STEPS = 1000
METHODS = ("snip", "random", "magnitude")
SPARSITIES = (0.90, 0.95, 0.98)


def pipeline(method: str, sparsity: float) -> tuple:
    """The stages of one point: `method` pruning to `sparsity` with TOTAL_STEPS of training."""
    tag = f"{method}_{sparsity:.2f}"
    if method in ("snip", "random"):
        scope = "global" if method == "snip" else "layer"
        return (stage(f"{tag}/prune", "prune",
                      prune={"method": method, "sparsity": sparsity, "scope": scope}),
                stage(f"{tag}/train", "train", steps=TOTAL_STEPS))
    if method == "magnitude":
        return (stage(f"{tag}/dense", "train", steps=DENSE_STEPS),
                stage(f"{tag}/prune", "prune",
                      prune={"method": "one_shot", "sparsity": sparsity, "scope": "global"}),
                stage(f"{tag}/finetune", "train", steps=TOTAL_STEPS - DENSE_STEPS))
    raise ValueError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.log_every = 500
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = pipeline("snip", 0.95)
    return config


def get_sweep():
    variants = [{"stages": pipeline(m, s)} for s in SPARSITIES for m in METHODS]
    return sweep.product(variants, sweep.seeds(3))
