r"""Reproduction: Han et al. 2015, LeNet-5 (Caffe 20-50-500) on mnist5k — prune to ~8% of the
weights, retrain.

Pipeline (one run): dense training → one-shot magnitude pruning with Han's per-layer
keep ratios (Table 3: conv1 66%, conv2 12%, fc1 8%, fc2 19% kept; 8.4% of all weights) →
evaluate ("no retraining") → retraining at 1/10 of the learning rate. `results.json` holds
a row per stage. Differences from the paper: mnist5k (4,000 training images) instead of
MNIST, Adam with L2 instead of SGD, one prune/retrain iteration instead of several.

Run one seed:
  jaxaccel train --config experiments/repro_han_lenet5.py --workdir runs/repro_han_lenet5/x
The reproduction (3 seeds, with LeNet-300-100; table with the published numbers):
  scripts/reproduce_han.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1e-3
WEIGHT_DECAY = 1e-4
DENSE_STEPS = 800       # 12 epochs of mnist5k at batch 60
RETRAIN_STEPS = 3200    # lr/10 recovers slowly: ~4x the dense steps (plateau on a dev seed)
# Fraction of each layer's weights removed (1 - Han et al. 2015, Table 3 "weights kept").
PER_LAYER_SPARSITY = {"conv1/kernel": 0.34, "conv2/kernel": 0.88, "fc1/kernel": 0.92,
                      "fc2/kernel": 0.81}


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet5"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.optimizer.weight_decay = WEIGHT_DECAY  # L2, as Han et al. (best after retraining)
    config.log_every = 100
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
