r"""Reproduction: Han et al. 2016 (Deep Compression), Table 1 — LeNet-5 (Caffe 20-50-500) on
mnist5k pruned, weight-shared and Huffman-coded: 39x smaller (1,720 KB -> 44 KB) at no accuracy
loss.

Pipeline (`jaxaccel.stages.deep_compression`): Han et al. 2015's pruning as reproduction 1
(`dense` 800 steps, then 3 prune/retrain rounds towards the Table 3 ratios — conv1 66%, conv2
12%, fc1 8%, fc2 19% kept — with 3,200 retraining steps at lr/10 in all) → `cluster` (the paper's 8 bits for the convs, 5 for the fully connected layers) →
`finetune` 400 steps at lr/10. The table packages every run with `--entropy huffman`.
Nothing is selected; steps and bits are fixed in advance.

Run one seed:
  jaxaccel train --config experiments/repro_deep_compression_lenet5.py --workdir runs/dc5/x
The reproduction (3 seeds, both models, table):
  scripts/reproduce_deep_compression.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import deep_compression

LR = 1e-3
PER_LAYER_SPARSITY = {"conv1/kernel": 0.34, "conv2/kernel": 0.88, "fc1/kernel": 0.92,
                      "fc2/kernel": 0.81}
BITS = {"conv1/kernel": 8, "conv2/kernel": 8, "fc1/kernel": 5, "fc2/kernel": 5}


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet5"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.optimizer.weight_decay = 1e-4
    config.log_every = 400
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = deep_compression(PER_LAYER_SPARSITY, BITS, dense_steps=800,
                                     retrain_steps=3200, finetune_steps=400, rounds=3,
                                     retrain_optimizer={"lr": LR / 10})
    return config


def get_sweep():
    return sweep.seeds(3)
