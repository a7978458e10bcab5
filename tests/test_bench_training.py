"""jaxaccel.bench.training: what a train-step benchmark counts (end to end through the
command: tests/test_cli_bench.py)."""
from jaxaccel.bench import workload

def test_step_flops_counts_model_flops_not_winograds_fewer():
    """MFU counts the model's FLOPs (the plain-Flax step); cnn3's Winograd convs on CPU execute fewer."""
    from jaxaccel.bench import training

    config = workload.bench_config("cnn3", 8, (16, 16, 3), conv_impl="winograd", strategy="data")
    setup = workload.bench_setup(config, (16, 16, 3))
    model_flops = training.step_flops(setup, 8, conv_impl="xla")
    executed = training.step_flops(setup, 8)
    # conv2 + conv3 forward MACs alone (3x3, 8x8x32->64 and 4x4x64->128), times 2 FLOPs
    assert model_flops > 2 * 8 * (8 * 8 * 9 * 32 * 64 + 4 * 4 * 9 * 64 * 128)
    assert executed < model_flops  # (XLA counts the transforms as dense 16x16 matmuls)
