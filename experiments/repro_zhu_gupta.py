r"""Reproduction: Zhu & Gupta 2017 — gradual (cubic) vs one-shot pruning, same total steps.

LeNet-300-100 on mnist5k. Every point trains the dense network for DENSE_STEPS, then
spends PRUNE_STEPS either
  * `gradual`: pruning with s_t = s_f (1 - (t - t0)/(nΔt))^3 (masks every FREQUENCY steps,
    reaching s_f at 3/4 of the phase, then training on at s_f), or
  * `one_shot`: pruning to s_f at once, then fine-tuning,
with the same optimizer, so both see DENSE_STEPS + PRUNE_STEPS steps. Layer-wise magnitude
pruning at s_f ∈ {0.90, 0.95, 0.98} on every kernel.

Run the default point (gradual, 0.95):
  jaxaccel train --config experiments/repro_zhu_gupta.py --workdir runs/repro_zhu_gupta/x
The reproduction (2 methods × 3 sparsities × 3 seeds, table):
  scripts/reproduce_zhu_gupta.sh
The swept variable lives inside the stages, so each point overrides `stages` as a whole
(`pipeline(method, sparsity)`); such points run in-process (not with `--workers`).
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1.2e-3
DENSE_STEPS = 1000
PRUNE_STEPS = 1000
FREQUENCY = 50
METHODS = ("gradual", "one_shot")
SPARSITIES = (0.90, 0.95, 0.98)


def pipeline(method: str, sparsity: float) -> tuple:
    """The stages of one point: dense training, then `method` pruning to `sparsity`."""
    dense = stage("dense", "train", steps=DENSE_STEPS)
    tag = f"{method}_{sparsity:.2f}"
    if method == "gradual":
        return (dense,
                stage(f"{tag}/prune_train", "train", steps=PRUNE_STEPS,
                      prune={"method": "gradual", "sparsity": sparsity, "initial": 0.0,
                             "begin_step": 0, "end_step": (3 * PRUNE_STEPS) // 4,
                             "frequency": FREQUENCY}))
    if method == "one_shot":
        return (dense,
                stage(f"{tag}/prune", "prune", prune={"method": "one_shot", "sparsity": sparsity}),
                stage(f"{tag}/finetune", "train", steps=PRUNE_STEPS))
    raise ValueError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.log_every = 200
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = pipeline("gradual", 0.95)
    return config


def get_sweep():
    variants = [{"stages": pipeline(m, s)} for s in SPARSITIES for m in METHODS]
    return sweep.product(variants, sweep.seeds(3))
