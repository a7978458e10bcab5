"""`conv_impl="auto"` measured on first use and cached (jaxaccel.autotune): the first choice
times every candidate, the next reuses the cache without timing; a forced implementation, no
convs, or JAXACCEL_AUTOTUNE=off skip tuning; a run records its choice and keeps it on resume."""
import json
import os

import pytest

import jaxaccel
from jaxaccel import autotune, pipeline
from tiny_runs import tiny_config


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXACCEL_AUTOTUNE", "on")
    monkeypatch.setenv("JAXACCEL_AUTOTUNE_CACHE", str(tmp_path / "cache" / "autotune.json"))
    return tmp_path / "cache" / "autotune.json"


def conv_config(**changes):
    return tiny_config(**{"model.name": "cnn_bn", "model.width": 0.25, **changes})


def test_first_use_measures_every_candidate_then_the_cache_answers(tuning, monkeypatch):
    first = autotune.choose(conv_config(), mode="infer", batch=8)
    assert first.reason.startswith("measured now") and first.impl in autotune.candidates()
    assert set(first.timings_ms) == set(autotune.candidates())
    assert first.impl == min(first.timings_ms, key=first.timings_ms.get)
    body = json.load(open(tuning))
    assert body[first.key]["choice"] == first.impl
    key = json.loads(first.key)
    assert key["mode"] == "infer" and key["batch"] == 8 and key["backend"] == "cpu"
    assert key["cpu"] == autotune.vector_features() and key["kernel_isa"] == autotune.host_isa(autotune.ISA_ORDER)
    assert key["kernels"] == autotune.sources_digest()  # a changed kernel is measured again

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune, "measure", no_timing)
    again = autotune.choose(conv_config(), mode="infer", batch=8)
    assert (again.impl, again.key) == (first.impl, first.key) and "cached" in again.reason
    with pytest.raises(AssertionError, match="measured again"):  # another key: measured
        autotune.choose(conv_config(), mode="infer", batch=16)
    # kernels built for another ISA (another CPU, or capped by JAXACCEL_KERNEL_ISA) run at
    # another speed: another key, measured again
    monkeypatch.setattr(autotune, "host_isa", lambda isas: "avx512_vnni")
    with pytest.raises(AssertionError, match="measured again"):
        autotune.choose(conv_config(), mode="infer", batch=8)


@pytest.mark.parametrize("changes,env,reason", [
    ({"model.conv_impl": "xla"}, "on", "forced by model.conv_impl"),
    ({}, "off", "JAXACCEL_AUTOTUNE=off"),
    ({"model.name": "lenet300_100"}, "on", "no convs to tune"),
])
def test_forced_off_and_convless_models_are_not_timed(tuning, monkeypatch, changes, env,
                                                      reason):
    monkeypatch.setenv("JAXACCEL_AUTOTUNE", env)
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("timed"))
    choice = autotune.choose(conv_config(**changes))
    assert reason in choice.reason and not tuning.exists()


def test_a_run_records_its_choice_and_keeps_it_when_resumed(tuning, monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: {"xla": 1.0, "cpu": 2.0,
                                                              "winograd": 3.0})
    config = conv_config(num_steps=4, checkpoint_every=4, log_every=2)
    wd = str(tmp_path / "run")
    results = pipeline.train(config, wd)
    assert results["conv_impl"]["impl"] == "xla"
    assert json.load(open(os.path.join(wd, "conv_impl.json")))["impl"] == "xla"
    # The cache now prefers another implementation: the run's own choice still holds.
    body = json.load(open(tuning))
    body[results["conv_impl"]["key"]]["choice"] = "cpu"
    json.dump(body, open(tuning, "w"))
    kept = pipeline.conv_impl_choice(config, wd)
    assert kept.impl == "xla" and kept.reason.startswith("chosen when this run started")
    assert autotune.choose(config).impl == "cpu"  # a new run would take the cached choice
    # Inference (jaxaccel.load) is tuned under its own key (mode infer, the eval batch).
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: {"xla": 2.0, "winograd": 1.0})
    loaded = jaxaccel.load(wd)
    assert loaded.model.conv_impl == "winograd"
    assert json.loads(autotune.choose(config, mode="infer").key)["batch"] == config.eval_batch_size


def test_the_int8_lowering_is_measured_then_cached_and_every_lowering_agrees(tuning,
                                                                            monkeypatch):
    import jax
    import numpy as np

    from jaxaccel import models
    from jaxaccel.compress import int8, quant

    net = models.get_model("cnn_bn", 10, width=0.25)
    variables = models.init_variables(net, jax.random.PRNGKey(0), (8, 8, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 1))
    int8_model = int8.convert_int8(variables, quant.calibrate(net, variables, [x]))
    choice = autotune.choose_int8_lowering(net, int8_model, x, model_key={"model": "cnn_bn"})
    assert choice.reason.startswith("measured now") and choice.impl in choice.timings_ms
    outputs = [np.asarray(int8.int8_apply(net, int8_model, x, conv_lowering=lo))
               for lo in choice.timings_ms]
    for other in outputs[1:]:  # the choice changes speed only
        np.testing.assert_array_equal(other, outputs[0])
    monkeypatch.setattr(autotune, "TIMED_STEPS", None)  # measuring again would fail
    again = autotune.choose_int8_lowering(net, int8_model, x, model_key={"model": "cnn_bn"})
    assert again.impl == choice.impl and "cached" in again.reason
