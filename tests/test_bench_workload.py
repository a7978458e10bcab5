"""jaxaccel.bench.workload: input shapes and the conv_impl a benchmark times."""
import pytest

from jaxaccel.bench import workload

def test_parse_input_shape():
    assert workload.parse_input_shape("32, 32,3") == (32, 32, 3)
    assert workload.parse_input_shape((28, 28, 1)) == (28, 28, 1)
    for bad in ("32,32", "a,b,c", "1,2,3,4", "-1,2,3", ""):
        with pytest.raises(ValueError, match="input shape"):
            workload.parse_input_shape(bad)


def test_resolved_conv_impl_is_the_models_own_auto_choice():
    import jax

    on_cpu = jax.default_backend() == "cpu"
    from jaxaccel.kernels import winograd

    cnn3_cpu = "cpu_kernel" if winograd.available() else "winograd"
    assert workload.resolved_conv_impl("auto", "cnn3") == (cnn3_cpu if on_cpu else "xla")
    assert workload.resolved_conv_impl("auto", "resnet20") == ("cpu" if on_cpu else "xla")
    assert workload.resolved_conv_impl("cpu", "cnn3") == "cpu"
