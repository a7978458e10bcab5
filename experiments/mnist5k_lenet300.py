r"""LeNet-300-100 on mnist5k, the Han et al. 2015 / Frankle & Carbin 2019 MLP.

Run:
  jaxaccel train --config experiments/mnist5k_lenet300.py --workdir runs/mnist5k_lenet300
Recipe after Frankle & Carbin 2019: Adam 1.2e-3, batch 60.
"""
from jaxaccel.config import default_config


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.num_steps = 2000
    config.optimizer.name = "adam"
    config.optimizer.lr = 1.2e-3
    config.log_every = 100
    config.checkpoint_every = 1000
    return config
