r"""cnn3 on mnist5k (4,000 real MNIST training images): the `make demo` experiment.

Run:
  jaxaccel train --config experiments/mnist5k_cnn3.py --workdir runs/mnist5k_cnn3
Override anything, e.g.:
  jaxaccel train --config experiments/mnist5k_cnn3.py --workdir runs/x \
      --config.optimizer.lr=0.003 --config.parallel.strategy=fsdp
"""
from jaxaccel.config import default_config


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "cnn3"
    config.batch_size = 128
    config.num_steps = 400
    config.optimizer.name = "adam"
    config.optimizer.lr = 2e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_steps = 50
    config.parallel.strategy = "data"
    config.parallel.cpu_devices = 2  # on CPU, one simulated device per core is fastest (measured)
    config.log_every = 50
    config.checkpoint_every = 200
    return config
