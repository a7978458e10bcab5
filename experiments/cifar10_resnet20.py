r"""ResNet-20 on CIFAR-10, He et al. 2016 recipe (91.25% test accuracy published).

Needs CIFAR-10 prepared as a TFDS array_record dataset in the data dir (see README,
"Catalog datasets"); nothing is downloaded at run time. Run on a GPU/TPU machine:
  jaxaccel train --config experiments/cifar10_resnet20.py --workdir runs/cifar10_resnet20 \
      --config.dataset.data_dir=gs://YOUR_BUCKET/tfds
Recipe: SGD lr 0.1 momentum 0.9, weight decay 1e-4, batch 128, lr /10 at 32k and 48k,
stop at 64k steps; pad-4 random crop + horizontal flip.
"""
from jaxaccel.config import default_config


def get_config():
    config = default_config()
    config.dataset.name = "cifar10"
    config.dataset.crop_padding = 4
    config.dataset.flip = True
    config.model.name = "resnet20"
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_steps = 64_000
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
    return config
