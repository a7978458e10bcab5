r"""Reproduction: Krishnamoorthi 2018 / Jacob et al. 2018 — W8A8 and W4A8, per-tensor vs
per-channel, post-training and quantization-aware, on LeNet-300-100, a BatchNorm CNN and a
depthwise-separable (MobileNet-v1-style) BatchNorm CNN.

One run per (model, seed): train in float, then post-training quantization (BatchNorm
folded, activations calibrated per tensor, asymmetric; weights symmetric) at
  W8A8 per-channel, W8A8 per-tensor, W4A8 per-channel, W4A8 per-tensor (and W3A8, W2A8
  both ways, past the paper: where per-tensor gives way),
each evaluated with fake-quant (and W8A8 also with real int8 inference), and finally
4-bit per-tensor QAT fine-tuning from the float weights (fake-quant in the forward pass,
straight-through gradients, EMA activation ranges). The quantize stages leave the float
weights untouched, so every PTQ row quantizes the same trained model.

Run one point:
  jaxaccel train --config experiments/repro_int8.py --workdir runs/repro_int8/x \
      --config.model.name=dscnn_bn
The reproduction (3 models × 3 seeds, table):
  scripts/reproduce_int8.sh
"""
from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1e-3
FLOAT_STEPS = 600       # 9.6 epochs of mnist5k at batch 64
QAT_STEPS = 200
MODELS = ("lenet300_100", "cnn_bn", "dscnn_bn")
PTQ = (  # (stage name, weight bits, per-channel)
    ("ptq_w8a8_per_channel", 8, True),
    ("ptq_w8a8_per_tensor", 8, False),
    ("ptq_w4a8_per_channel", 4, True),
    ("ptq_w4a8_per_tensor", 4, False),
    ("ptq_w3a8_per_channel", 3, True),    # beyond the paper
    ("ptq_w3a8_per_tensor", 3, False),
    ("ptq_w2a8_per_channel", 2, True),
    ("ptq_w2a8_per_tensor", 2, False),
)


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.model.name = "cnn_bn"
    config.batch_size = 64
    config.eval_batch_size = 1000
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.log_every = 100
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = (
        stage("float", "train", steps=FLOAT_STEPS),
        *[stage(name, "quantize", quant={"mode": "ptq", "weight_bits": bits, "act_bits": 8,
                                         "per_channel": per_channel, "calibration_batches": 8})
          for name, bits, per_channel in PTQ],
        stage("qat_w4a8_per_tensor", "train", steps=QAT_STEPS, optimizer={"lr": LR / 10},
              quant={"mode": "qat", "weight_bits": 4, "act_bits": 8, "per_channel": False}),
    )
    return config


def get_sweep():
    return sweep.product(sweep.grid("model.name", MODELS), sweep.seeds(3))
