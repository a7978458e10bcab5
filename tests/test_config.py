"""jaxaccel.config: config loading, overrides and validation (experiment files, sweep points,
values checked with the dataset)."""
import os
import re

import ml_collections
import pytest

from jaxaccel import config as config_lib


def test_overrides_parse_and_coerce():
    c = config_lib.default_config()
    config_lib.apply_overrides(c, ["optimizer.lr=0.01", "num_steps=7", "dataset.flip=true",
                                   "optimizer.boundaries=(5,9)", "optimizer.momentum=1",
                                   "model.kwargs.padding=SAME"])
    assert c.optimizer.lr == 0.01 and c.num_steps == 7 and c.dataset.flip is True
    assert c.optimizer.boundaries == (5, 9)
    assert isinstance(c.optimizer.momentum, float)
    assert c.model.kwargs.padding == "SAME"


@pytest.mark.parametrize("item,needle", [
    ("optimizer.lrr=0.1", "did you mean optimizer.lr"),
    ("nosuch=1", "nosuch"),
    ("num_steps=abc", "expected int"),
    ("dataset.flip=3", "expected bool"),
    ("optimizer=1", "section"),
    ("num_steps", "key=value"),
])
def test_bad_overrides(item, needle):
    with pytest.raises(config_lib.ConfigError, match=needle):
        config_lib.apply_overrides(config_lib.default_config(), [item])


@pytest.mark.parametrize("key,value,needle", [
    ("optimizer.name", "lion", "adamw"),
    ("parallel.strategy", "tp", "fsdp"),
    ("model.name", "vit", "cnn3"),
    ("dataset.name", "imagenet", "mnist5k"),
    ("optimizer.schedule", "linear", "warmup_cosine"),
    ("batch_size", 0, "positive"),
    ("label_smoothing", 1.5, "label_smoothing"),
    ("optimizer.warmup_steps", 1000, "warmup_steps=1000 must be below the 1000 steps"),
])
def test_validate_names_bad_value_and_choices(key, value, needle):
    c = config_lib.default_config()
    c.optimizer.schedule = "warmup_cosine"
    config_lib.set_value(c, key, value)
    with pytest.raises(config_lib.ConfigError, match=needle):
        config_lib.validate(c)


def test_batch_must_divide_devices():
    c = config_lib.default_config()
    c.batch_size = 60
    with pytest.raises(config_lib.ConfigError, match="divisible by the 8 devices"):
        config_lib.validate_devices(c, 8)


def test_json_round_trip_and_differences():
    c = config_lib.default_config()
    back = config_lib.from_json(config_lib.to_json(c))
    assert config_lib.differences(c, back) == []
    back.optimizer.lr = 0.5
    back.log_every = 3  # runtime-only: ignored
    assert config_lib.differences(c, back) == ["optimizer.lr: 0.001 -> 0.5"]


def test_experiments_load_and_validate():
    import glob
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    for path in glob.glob(os.path.join(root, "*.py")):
        c = config_lib.load_experiment(path)
        assert isinstance(c, ml_collections.ConfigDict)
        if c.dataset.name in ("digits", "mnist5k"):
            config_lib.validate(c)


def test_override_inside_stages():
    from jaxaccel import stages
    c = config_lib.default_config()
    c.stages = (stages.stage("t", "train", steps=3),
                stages.stage("p", "prune", prune={"method": "one_shot", "sparsity": 0.5}))
    config_lib.apply_overrides(c, ["stages.1.prune.sparsity=0.9", "stages.0.steps=7"])
    assert c.stages[1].prune.sparsity == 0.9 and c.stages[0].steps == 7
    back = config_lib.from_json(config_lib.to_json(c))  # stages as plain dicts
    config_lib.apply_overrides(back, ["stages.1.prune.sparsity=0.95"])
    assert stages.expand(back)[1].prune.sparsity == 0.95
    with pytest.raises(config_lib.ConfigError, match="stages.5"):
        config_lib.apply_overrides(c, ["stages.5.steps=1"])
    with pytest.raises(config_lib.ConfigError, match="expected float"):
        config_lib.apply_overrides(c, ["stages.1.prune.sparsity=abc"])


EXPERIMENT = '''
from jaxaccel.config import default_config
from jaxaccel.stages import stage

def get_config():
    c = default_config()
    c.dataset.name, c.model.name, c.num_steps = "digits", "lenet5", 2
{body}
    return c
'''

SWEEP = '''
def get_sweep():
    return [{{"optimizer.lr": 0.1}}, {{{point}: 1}}]
'''


@pytest.mark.parametrize("body,needle", [
    ("    c.optimizer.learning_rate = 0.5", "unknown config key 'optimizer.learning_rate'"),
    ("    c.num_step = 100", "'num_step'; did you mean num_steps"),
    ("    c.dataset.nmae = 'mnist5k'", "'dataset.nmae'; did you mean dataset.name"),
    ("    c.stages = (stage('t', 'train', steps=2),\n"
     "                stage('prune', 'prune', prune={'method': 'one_shot', 'sparsty': 0.9}))",
     "line 9: ValueError: stage 'prune' prune: unknown key 'sparsty'; did you mean sparsity"),
    ("    c.optimizer.lr = '0.01'", "line 8: TypeError: .*'lr'"),
    ("    c.stages = (stage('t', 'train', steps=2),)\n    c.stages[0].prune.sparsty = 0.9",
     "'stages.0.prune.sparsty'; did you mean stages.0.prune.sparsity"),
    ("    c.model.kwargs.paddin = 'SAME'", "model.kwargs.paddin: model 'lenet5' has no field "
                                           "'paddin'; did you mean padding"),
    ("    c.optimizer.momentum = None", r"optimizer.momentum=None: expected float"),
    ("    undefined_name", "line 8: NameError: name 'undefined_name' is not defined"),
])
def test_mistakes_in_experiment_files_are_one_line_errors(body, needle, tmp_path, capsys):
    """Everything an experiment file sets is checked before anything runs: exit 2, one line
    naming the file and the key, nothing written."""
    from jaxaccel import cli
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(body=body))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxaccel: error: "), err
    assert re.search(needle, err), err
    if "model.kwargs" not in body:  # checked with the model, after --config overrides
        assert str(path) in err
    assert not workdir.exists()


def test_mistakes_in_sweep_points_are_refused_before_anything_runs(tmp_path, capsys):
    from jaxaccel import cli
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(body="") + SWEEP.format(point='"num_step"'))
    workdir = tmp_path / "sweep"
    assert cli.main(["sweep", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean num_steps" in err, err
    assert not workdir.exists()


def test_experiment_file_is_imported_once(tmp_path):
    path = tmp_path / "counted.py"
    path.write_text("import builtins\nbuiltins.jaxaccel_imports = "
                    "getattr(builtins, 'jaxaccel_imports', 0) + 1\n"
                    + EXPERIMENT.format(body="") + SWEEP.format(point='"seed"'))
    import builtins
    from jaxaccel import sweep
    config_lib.load_experiment(str(path))
    sweep.load_sweep(str(path))
    assert builtins.jaxaccel_imports == 1


def test_every_key_is_documented_and_described():
    c = config_lib.default_config()
    leaves = [k for k in config_lib.flat_keys(c)]
    assert sorted(set(leaves) - {"model.kwargs"} - set(config_lib.KEY_HELP)) == []
    from jaxaccel import stages
    c.stages = (stages.stage("t", "train", steps=3, optimizer={"lr": 0.1}),)
    c.optimizer.name = "sgd"
    rows = {r["key"]: r for r in config_lib.describe(c)}
    assert rows["optimizer.name"] == {"key": "optimizer.name", "value": "sgd", "default": "adam",
                                      "type": "str", "choices": ("sgd", "adam", "adamw"),
                                      "help": config_lib.KEY_HELP["optimizer.name"]}
    assert rows["stages.0.optimizer.lr"]["value"] == 0.1
    assert rows["stages.0.prune.granularity"]["choices"] == ("unstructured", "channel", "n:m")
    assert all(r["help"] for r in rows.values()), [k for k, r in rows.items() if not r["help"]]
    assert rows["optimizer.boundaries"]["type"] == "tuple"


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_validation_split_must_be_a_fraction(value):
    c = config_lib.default_config()
    c.dataset.validation_split = value
    with pytest.raises(config_lib.ConfigError, match="dataset.validation_split"):
        config_lib.validate(c)


@pytest.mark.parametrize("name,size,needle", [
    ("image_folder", (4, 0), "must be \\(height, width\\), both > 0"),
    ("digits", (4, 4), "resizes 'image_folder' images only"),
])
def test_image_size_is_checked_with_the_config(name, size, needle, tmp_path):
    from jaxaccel.config import ConfigError, default_config, validate
    c = default_config()
    c.dataset.name, c.dataset.path, c.dataset.image_size = name, str(tmp_path), size
    with pytest.raises(ConfigError, match=needle):
        validate(c)
