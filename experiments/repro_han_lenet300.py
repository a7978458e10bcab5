r"""Reproduction: Han et al. 2015, LeNet-300-100 on mnist5k — prune to ~8% weights, retrain.

Pipeline (one run): dense training → one-shot magnitude pruning with Han's per-layer
keep ratios (Table 2: fc1 8%, fc2 9%, fc3 26% kept; 8.2% of all weights) → evaluate
("no retraining") → retraining at 1/10 of the learning rate. `results.json` holds a row
per stage, so one run gives dense, pruned-without-retraining and retrained accuracy.
Differences from the paper: mnist5k (4,000 training images) instead of MNIST, Adam with L2
instead of SGD with L2, one prune/retrain iteration instead of several.

Run one seed:
  jaxaccel train --config experiments/repro_han_lenet300.py --workdir runs/repro_han_lenet300/x
The reproduction (3 seeds, table with the published numbers):
  scripts/reproduce_han.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1.2e-3
WEIGHT_DECAY = 1e-4
DENSE_STEPS = 2000      # 30 epochs of mnist5k at batch 60
RETRAIN_STEPS = 3000    # test loss of the retrained net bottoms out here (dev seeds 95, 96)
# Fraction of each layer's weights removed (1 - Han et al. 2015, Table 2 "weights kept").
PER_LAYER_SPARSITY = {"fc1/kernel": 0.92, "fc2/kernel": 0.91, "fc3/kernel": 0.74}


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.optimizer.weight_decay = WEIGHT_DECAY  # L2, as Han et al. (best after retraining)
    config.log_every = 200
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = (
        stage("dense", "train", steps=DENSE_STEPS),
        stage("prune", "prune", prune={"method": "one_shot", "per_layer": PER_LAYER_SPARSITY}),
        stage("no_retrain", "evaluate"),
        stage("retrain", "train", steps=RETRAIN_STEPS, optimizer={"lr": LR / 10}),
    )
    return config


def get_sweep():
    return sweep.seeds(3)
