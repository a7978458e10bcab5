r"""Reproduction: deep ensembles (Lakshminarayanan et al. 2017) — 5 members of LeNet-300-100.

Each point trains an ensemble of 5 members (seeds s..s+4) as one compiled program on mnist5k
with 10% of the training images held out; the members are combined by averaging their
probabilities and by stacking (per-member weights fit on the validation split only). Points
use seeds 0, 5 and 10, so no member is shared between points. Reported per point: every
member's and each combination's test accuracy, NLL and expected calibration error.

  scripts/reproduce_ensemble.sh
One point:
  jaxaccel train --config experiments/repro_ensemble.py --workdir runs/repro_ensemble/x
"""
from jaxaccel import sweep
from jaxaccel.config import default_config

MEMBERS = 5
STEPS = 1500


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = 0.1
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 500
    config.num_steps = STEPS
    config.optimizer.lr = 1.2e-3
    config.log_every = 500
    config.checkpoint_every = STEPS
    config.progress = False
    config.parallel.num_devices = 1
    config.ensemble.members = MEMBERS
    config.ensemble.combine = "stack"
    return config


def get_sweep():
    return sweep.grid("seed", [0, MEMBERS, 2 * MEMBERS])
