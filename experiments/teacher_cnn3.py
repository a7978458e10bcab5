r"""The teacher of the distillation reproductions: cnn3 on mnist5k, 10% held out for validation.

Trained once by the scripts (scripts/reproduce_hinton.sh, reproduce_polino.sh,
reproduce_distill_compressed.sh) before their students:
  jaxaccel train --config experiments/teacher_cnn3.py --workdir runs/teacher_cnn3
"""
from jaxaccel.config import default_config

STEPS = 600


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = 0.1
    config.model.name = "cnn3"
    config.batch_size = 64
    config.eval_batch_size = 500
    config.num_steps = STEPS
    config.optimizer.lr = 2e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_steps = 50
    config.log_every = 100
    config.checkpoint_every = STEPS
    config.progress = False
    config.parallel.num_devices = 1
    return config
