r"""Reproduction: Frankle & Carbin 2019 — lottery tickets in LeNet-300-100 on mnist5k.

Iterative magnitude pruning (IMP): train, prune 20% of the remaining weights of each
layer (10% of the output layer fc3), reset the survivors to their initial values, train
again; ROUNDS rounds (0.8^12 ≈ 6.9% of fc1/fc2 left). In every round the same mask is
also trained from a fresh random initialization (the paper's control), so both arms of
a round share one mask:

  round0/train → for r in 1..ROUNDS:
      round{r}/prune (IMP) → round{r}/reinit (random weights, masked) → round{r}/reinit_train
                           → round{r}/rewind (initial weights, masked) → round{r}/train

The IMP prune of round r+1 reads the weights of round{r}/train (the ticket), as in the
paper. Validation and test loss are evaluated every EVAL_EVERY steps; the early-stopping
iteration of each round is the one of minimum validation loss (VALIDATION_SPLIT of the
training images held out, as the paper holds out 5K of MNIST's 60K), and the test accuracy
reported beside it is read at that iteration. Adam 1.2e-3, batch 60 as in the paper;
ROUND_STEPS per round instead of 50K.

Run one seed:
  jaxaccel train --config experiments/repro_lottery.py --workdir runs/repro_lottery/x
The reproduction (3 seeds, table):
  scripts/reproduce_lottery.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

ROUNDS = 12
ROUND_STEPS = 1000      # 15 epochs of mnist5k at batch 60
EVAL_EVERY = 100
VALIDATION_SPLIT = 0.1  # 400 of mnist5k's 4,000 training images
RATE = 0.2
PER_LAYER_RATES = {"fc3/kernel": 0.1}


def lottery_stages(rounds: int = ROUNDS, steps: int = ROUND_STEPS) -> tuple:
    """IMP with reset to init, plus the random-reinit control on each round's mask."""
    out = [stage("round0/train", "train", steps=steps)]
    for r in range(1, rounds + 1):
        out += [
            stage(f"round{r}/prune", "prune",
                  prune={"method": "imp", "rate": RATE, "round": r,
                         "per_layer_rates": PER_LAYER_RATES}),
            stage(f"round{r}/reinit", "rewind", rewind="random"),
            stage(f"round{r}/reinit_train", "train", steps=steps),
            stage(f"round{r}/rewind", "rewind", rewind="snapshot"),
            stage(f"round{r}/train", "train", steps=steps),
        ]
    return tuple(out)


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = VALIDATION_SPLIT
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = 1.2e-3
    config.rewind_step = 0          # reset to the initial weights
    config.eval_every = EVAL_EVERY
    config.log_every = 500
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = lottery_stages()
    return config


def get_sweep():
    return sweep.seeds(3)
