"""Training end to end: strategies agree with one device, resume is exact, results/metrics."""
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import checkpoint, config as config_lib, metrics


def tiny_config(**changes):
    """lenet300_100 on digits: small enough to train 20 steps in a second or two."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_steps = 20
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.log_every = 5
    c.checkpoint_every = 10
    c.keep_checkpoints = 5
    c.progress = False
    for k, v in changes.items():
        config_lib.set_value(c, k, v)
    return c


def final_params(workdir):
    return jaxaccel.load(workdir).variables["params"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 1-device run of the tiny config."""
    wd = str(tmp_path_factory.mktemp("ref"))
    results = jaxaccel.train(tiny_config(**{"parallel.num_devices": 1}), wd)
    return wd, results


@pytest.mark.parametrize("strategy", ["data", "fsdp", "pmap"])
def test_strategies_on_8_devices_match_one_device(strategy, reference, tmp_path):
    ref_wd, _ = reference
    results = jaxaccel.train(tiny_config(**{"parallel.strategy": strategy}), str(tmp_path))
    assert results["num_devices"] == 8 and results["strategy"] == strategy
    chex.assert_trees_all_close(final_params(str(tmp_path)), final_params(ref_wd), atol=1e-5, rtol=0)


def test_fsdp_shards_params(tmp_path):
    from jaxaccel import parallel
    from jaxaccel.state import build
    setup = build(tiny_config())
    abstract = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
    sh = parallel.state_shardings(abstract, parallel.make_mesh(), "fsdp")
    kernel = sh.params["fc1"]["kernel"]
    assert kernel.spec != jax.sharding.PartitionSpec()  # (64, 300): 300 % 8 != 0, 64 % 8 == 0
    # Adam moments are sharded like their parameters.
    specs = {str(s.spec) for s in jax.tree.leaves(sh.opt_state)}
    assert str(kernel.spec) in specs


def test_resume_after_interruption_is_exact(reference, tmp_path):
    ref_wd, ref_results = reference
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd)
    # "Interrupt" after step 10: drop everything written later.
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))
    os.remove(os.path.join(wd, "results.json"))
    results = jaxaccel.train(tiny_config(**{"parallel.num_devices": 1}), wd)
    chex.assert_trees_all_equal(final_params(wd), final_params(ref_wd))
    assert results["test_accuracy"] == ref_results["test_accuracy"]


def test_results_and_metrics_files(reference):
    wd, results = reference
    with open(os.path.join(wd, "results.json")) as f:
        saved = json.load(f)
    for key in ("test_accuracy", "test_loss", "steps", "train_images_per_sec", "num_devices",
                "strategy"):
        assert key in saved
    assert saved["steps"] == 20 and saved["num_devices"] == 1
    rows = list(metrics.read_metrics(wd))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert {"loss", "accuracy", "lr", "grad_norm", "images_per_sec", "step_ms"} <= set(train_rows[-1])
    assert any(r["split"] == "test" for r in rows)
    assert os.listdir(os.path.join(wd, "events"))
    assert config_lib.from_json(open(os.path.join(wd, "config.json")).read()).num_steps == 20


def test_training_learns_digits(tmp_path):
    results = jaxaccel.train(tiny_config(num_steps=150, log_every=50,
                                         checkpoint_every=150), str(tmp_path))
    assert results["test_accuracy"] > 0.9


def test_load_predict_matches_eval(reference):
    from jaxaccel import data
    wd, results = reference
    loaded = jaxaccel.load(wd)
    assert loaded.step == 20 and loaded.config.model.name == "lenet300_100"
    spec = data.dataset_spec("digits")
    source = data.get_source("digits", "test")
    examples = [source[i] for i in range(len(source))]
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    logits = loaded.predict(images)
    assert logits.shape == (len(source), spec.num_classes)
    acc = float(np.mean(np.argmax(logits, -1) == labels))
    assert acc == pytest.approx(results["test_accuracy"], abs=1e-6)


def test_load_unknown_step(reference):
    with pytest.raises(ValueError, match="step=7"):
        jaxaccel.load(reference[0], step=7)


def test_different_config_refused_then_overwritten(reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    with pytest.raises(config_lib.ConfigError, match="optimizer.lr"):
        jaxaccel.train(tiny_config(**{"optimizer.lr": 0.5}), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
    results = jaxaccel.train(tiny_config(**{"optimizer.lr": 0.002, "num_steps": 5}), wd,
                             overwrite=True)
    assert results["steps"] == 5
    assert checkpoint.Checkpointer(wd).all_steps() == [5]


def test_transfer_learning_reinitialises_mismatched_head(reference, tmp_path):
    from jaxaccel import pipeline, state as state_lib
    src = reference[0]
    cfg = tiny_config(**{"model.kwargs.hidden": (300, 50), "num_steps": 0, "init_from": src})
    setup = state_lib.build(cfg)
    state = setup.init_state(jax.random.PRNGKey(1))
    new_state, reinit = pipeline.transfer(state, src)
    assert "params/fc2/kernel" in reinit and "params/fc3/kernel" in reinit
    np.testing.assert_array_equal(new_state.params["fc1"]["kernel"],
                                  final_params(src)["fc1"]["kernel"])


@pytest.mark.parametrize("name,schedule", [("sgd", "piecewise"), ("adam", "cosine"),
                                           ("adamw", "warmup_cosine"), ("sgd", "constant")])
def test_optimizers_and_schedules(name, schedule):
    import jax.numpy as jnp
    import optax
    from jaxaccel import state as state_lib
    opt = config_lib.default_config().optimizer
    opt.name, opt.schedule, opt.lr = name, schedule, 0.1
    opt.boundaries, opt.warmup_steps, opt.weight_decay, opt.grad_clip_norm = (10, 20), 5, 1e-4, 1.0
    tx, sched = state_lib.make_optimizer(opt, 40)
    if schedule == "piecewise":
        assert [float(sched(s)) for s in (0, 10, 20)] == pytest.approx([0.1, 0.01, 0.001])
    if schedule == "warmup_cosine":
        assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.1)
    if schedule == "cosine":
        assert float(sched(40)) == pytest.approx(0.0, abs=1e-7)
    params = {"w": jnp.ones((3,))}
    updates, _ = tx.update({"w": jnp.full((3,), 100.0)}, tx.init(params), params)
    # clipping to global norm 1: no update is larger than lr * (clipped grad + decay) allows
    assert float(optax.tree.norm(updates)) < 1.0


def test_label_smoothing_changes_loss():
    import jax.numpy as jnp
    from jaxaccel import state as state_lib
    logits = jnp.array([[10.0, 0.0, 0.0]])
    plain = state_lib.cross_entropy(logits, jnp.array([0]), 3)
    smooth = state_lib.cross_entropy(logits, jnp.array([0]), 3, label_smoothing=0.1)
    assert float(smooth[0]) > float(plain[0])
