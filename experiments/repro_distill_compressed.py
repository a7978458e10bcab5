r"""Reproduction: the combined pipeline — a cnn3 teacher distilled into a 90%-sparse int8 student
(gradual pruning + 8-bit QAT + distillation in one resumable pipeline), against the same
student and pipeline trained on labels alone.

The student is cnn3 at width 1/4 (conv 8-16-32, hidden 32) on mnist5k (10% of the training
images held out for validation). Stages (one run; `results.json` holds a row per stage):
  1. `dense` — DENSE_STEPS of dense training;
  2. `prune` — PRUNE_STEPS of gradual (cubic, Zhu & Gupta 2017) magnitude pruning to 90%
     of every kernel's weights;
  3. `qat` — QAT_STEPS of 8-bit per-channel quantization-aware training, masks kept, at lr/10;
  4. `int8` — post-training quantization (BN folded, activations calibrated) deployed as real
     int8 inference.
Each train stage distils from the teacher_cnn3 run (T = 4, teacher logits precomputed once per
training example: the input pipeline has no augmentation). Two arms set the three stages'
`distill.alpha` together: 0.0 (labels only: the student alone) and 0.9; 3 seeds each. Nothing
is selected: T, alpha and the steps are fixed in advance.

The script trains the teacher and passes it to the three train stages:
  scripts/reproduce_distill_compressed.sh
One point:
  jaxaccel train --config experiments/repro_distill_compressed.py --workdir runs/x \
      --config.stages.0.distill.teacher=runs/teacher_cnn3 \
      --config.stages.1.distill.teacher=runs/teacher_cnn3 \
      --config.stages.2.distill.teacher=runs/teacher_cnn3
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

WIDTH = 1 / 4
LR = 2e-3
DENSE_STEPS = 800
PRUNE_STEPS = 800
QAT_STEPS = 300
SPARSITY = 0.9
TEMPERATURE = 4.0
ALPHA = 0.9
TRAIN_STAGES = 3  # stages 0..2 distil


def distill() -> dict:
    return {"temperature": TEMPERATURE, "alpha": ALPHA, "precompute": True}


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = 0.1
    config.model.name = "cnn3"
    config.model.width = WIDTH
    config.batch_size = 64
    config.eval_batch_size = 500
    config.optimizer.lr = LR
    config.log_every = 400
    config.checkpoint_every = 400
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = (
        stage("dense", "train", steps=DENSE_STEPS, distill=distill()),
        stage("prune", "train", steps=PRUNE_STEPS, distill=distill(),
              prune={"method": "gradual", "sparsity": SPARSITY, "frequency": 50}),
        stage("qat", "train", steps=QAT_STEPS, distill=distill(), optimizer={"lr": LR / 10},
              quant={"mode": "qat", "weight_bits": 8, "act_bits": 8, "per_channel": True,
                     "observer": "ema"}),
        stage("int8", "quantize", quant={"mode": "ptq", "weight_bits": 8, "act_bits": 8,
                                         "per_channel": True, "int8": True}),
    )
    return config


def get_sweep():
    arms = sweep.zipit(*[sweep.grid(f"stages.{k}.distill.alpha", [0.0, ALPHA])
                         for k in range(TRAIN_STAGES)])
    return sweep.product(arms, sweep.seeds(3))
