r"""Reproduction (documented, not run in CI): ResNet-20 on CIFAR-10 — dense (He et al. 2016:
91.25%), int8, and 50% channel pruning of every block's inner width.

Needs CIFAR-10 prepared as a TFDS array_record dataset in the data dir (README, "Catalog
datasets"); nothing is downloaded at run time. Meant for a GPU or TPU machine: one seed is
80K SGD steps of batch 128 (≈ 2 h on one GPU; days on 2 CPU cores).

Pipeline (one run):
  dense      64K steps, He et al. recipe: SGD 0.1, momentum 0.9, wd 1e-4, ÷10 at 32K and 48K,
             pad-4 crop + flip
  int8_dense W8A8 per-channel PTQ of the dense model (BN folded; fake-quant and real int8)
  prune      50% of the output channels of each block's conv1 (L1 norm) — the widths
             `jaxaccel.compress.shrink` can remove (`ResNet20.inner_widths`)
  finetune   16K steps, SGD 0.01 cosine
  int8       W8A8 per-channel PTQ of the pruned model

Run one seed:
  jaxaccel train --config experiments/repro_resnet20_cifar10.py --workdir runs/repro_resnet20 \
      --config.dataset.data_dir=/path/to/tfds
The reproduction (3 seeds, table; `--dry-run` only validates and prints the commands):
  DATA_DIR=/path/to/tfds scripts/reproduce_resnet20_cifar10.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

DENSE_STEPS = 64_000
FINETUNE_STEPS = 16_000
CHANNEL_SPARSITY = 0.5
INNER_CONVS = tuple(f"stage{s}_block{b}/conv1/kernel" for s in (1, 2, 3) for b in (1, 2, 3))
INT8 = {"mode": "ptq", "weight_bits": 8, "act_bits": 8, "per_channel": True,
        "calibration_batches": 16}


def get_config():
    config = default_config()
    config.dataset.name = "cifar10"
    config.dataset.crop_padding = 4
    config.dataset.flip = True
    config.model.name = "resnet20"
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.optimizer.name = "sgd"
    config.optimizer.lr = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "piecewise"
    config.optimizer.boundaries = (32_000, 48_000)
    config.optimizer.decay_factor = 0.1
    config.log_every = 200
    config.eval_every = 4000
    config.checkpoint_every = 2000
    config.progress = False
    config.stages = (
        stage("dense", "train", steps=DENSE_STEPS),
        stage("int8_dense", "quantize", quant=INT8),
        stage("prune", "prune",
              prune={"method": "one_shot", "granularity": "channel", "norm": 1,
                     "sparsity": 0.0,
                     "per_layer": {k: CHANNEL_SPARSITY for k in INNER_CONVS}}),
        stage("finetune", "train", steps=FINETUNE_STEPS,
              optimizer={"lr": 0.01, "schedule": "cosine"}),
        stage("int8", "quantize", quant=INT8),
    )
    return config


def get_sweep():
    return sweep.seeds(3)
