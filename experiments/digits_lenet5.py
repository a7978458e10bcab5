r"""LeNet-5 (Caffe 20-50-500) on scikit-learn digits (8x8), SAME padding for the tiny images.

Run:
  jaxaccel train --config experiments/digits_lenet5.py --workdir runs/digits_lenet5
"""
from jaxaccel.config import default_config


def get_config():
    config = default_config()
    config.dataset.name = "digits"
    config.model.name = "lenet5"
    config.model.kwargs.padding = "SAME"
    config.batch_size = 64
    config.eval_batch_size = 360
    config.num_steps = 400
    config.optimizer.name = "adam"
    config.optimizer.lr = 1e-3
    config.log_every = 50
    config.checkpoint_every = 200
    return config
