r"""LeNet-300-100 on mnist5k with 10% of the train split held out for validation: the space a
hyperparameter search selects on (learning rate, weight decay, width), by validation only.

Run:
  jaxaccel sweep --config experiments/search_lenet300.py --workdir runs/search_lenet300 \
      --search tpe --trials 30 --pruner asha
  optuna-dashboard sqlite:///runs/search_lenet300/study.db   # if installed; optional
Otherwise the recipe of experiments/mnist5k_lenet300.py (Adam, batch 60, 2000 steps) with
decoupled weight decay (adamw) and an evaluation every 250 steps, which the pruner reads.
"""
from jaxaccel import sweep
from jaxaccel.config import default_config


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = 0.1
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.num_steps = 2000
    config.optimizer.name = "adamw"
    config.optimizer.lr = 1.2e-3
    config.optimizer.weight_decay = 1e-4
    config.eval_every = 250
    config.log_every = 250
    config.checkpoint_every = 1000
    return config


def get_search():
    return {"optimizer.lr": sweep.loguniform(1e-4, 1e-2),
            "optimizer.weight_decay": sweep.loguniform(1e-6, 1e-2),
            "model.width": sweep.choice([0.25, 0.5, 1.0])}
