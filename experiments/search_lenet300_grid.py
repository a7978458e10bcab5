r"""The space of experiments/search_lenet300.py as choices only (3 learning rates × 3 weight
decays × 3 widths = 27 points), so that a full grid of the same space exists: what
`jaxaccel bench sweep --search` compares TPE + ASHA against (see BENCHMARKS.md).

LeNet-300-100 on mnist5k with 10% of the train split held out for validation (selection reads
validation only), Adam with decoupled weight decay (adamw), batch 60, 2000 steps, an
evaluation every 250 steps (what the pruner reads). The training seed is the config's
(`seed`, 0) for every trial: two trials with the same parameters train the same network.

Run:
  jaxaccel sweep --config experiments/search_lenet300_grid.py --workdir runs/grid \
      --search grid --trials 27
  jaxaccel sweep --config experiments/search_lenet300_grid.py --workdir runs/tpe \
      --search tpe --trials 15 --pruner asha
  jaxaccel bench sweep --search        # both, TPE + ASHA over 3 study seeds
"""
import importlib.util
import os

from jaxaccel import sweep

_spec = importlib.util.spec_from_file_location(
    "search_lenet300", os.path.join(os.path.dirname(os.path.abspath(__file__)), "search_lenet300.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    """experiments/search_lenet300.py's config (searched keys aside: lr 1e-3)."""
    config = _base.get_config()
    config.optimizer.lr = 1e-3
    return config


def get_search():
    return {"optimizer.lr": sweep.choice([3e-4, 1e-3, 3e-3]),
            "optimizer.weight_decay": sweep.choice([1e-5, 1e-3, 1e-1]),
            "model.width": sweep.choice([0.25, 0.5, 1.0])}
