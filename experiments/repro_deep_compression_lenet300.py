r"""Reproduction: Han et al. 2016 (Deep Compression), Table 1 — LeNet-300-100 on mnist5k pruned,
weight-shared and Huffman-coded: 40x smaller (1,070 KB -> 27 KB) at no accuracy loss.

Pipeline (`jaxaccel.stages.deep_compression`; one run, a row per stage in results.json):
  1. Han et al. 2015's pruning, as reproduction 1 (experiments/repro_han_lenet300.py):
     `dense` 2,000 steps (Adam + L2), then 3 rounds of per-layer magnitude pruning towards the
     Table 2 ratios (fc1 8%, fc2 9%, fc3 26% kept: 8.2% of the weights) each followed by
     1,000 steps of retraining at lr/10 (the last one is `retrain`);
  2. `cluster` — each layer's kept weights shared among 2^6 k-means centroids (the paper's
     6 bits for LeNet-300-100; linear initialisation);
  3. `finetune` — 500 steps at lr/10 training the shared values only.
The table packages every run with `jaxaccel compress package W --entropy huffman` and reports
the paper's columns (dense, pruned, shared, Huffman-coded). Nothing is selected; steps and
bits are fixed in advance.

Run one seed:
  jaxaccel train --config experiments/repro_deep_compression_lenet300.py --workdir runs/dc300/x
The reproduction (3 seeds, both models, table):
  scripts/reproduce_deep_compression.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import deep_compression

LR = 1.2e-3
PER_LAYER_SPARSITY = {"fc1/kernel": 0.92, "fc2/kernel": 0.91, "fc3/kernel": 0.74}
BITS = 6


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.optimizer.weight_decay = 1e-4
    config.log_every = 500
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = deep_compression(PER_LAYER_SPARSITY, BITS, dense_steps=2000,
                                     retrain_steps=3000, finetune_steps=500, rounds=3,
                                     retrain_optimizer={"lr": LR / 10})
    return config


def get_sweep():
    return sweep.seeds(3)
