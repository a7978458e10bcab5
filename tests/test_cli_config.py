"""`jaxaccel config` (jaxaccel.cli.config): every key with its value, default, type, choices
and help; only the changed ones; JSON lines."""
import json
import os

def test_config_lists_every_key_with_default_type_choices_and_help(capsys):
    from jaxaccel import cli, config as config_lib
    assert cli.main(["config"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    keys = [line.split(" = ")[0] for line in lines]
    assert set(keys) >= set(config_lib.flat_keys(config_lib.default_config()))
    line = next(x for x in lines if x.startswith("optimizer.name = "))
    assert line == ("optimizer.name = 'adam'  # str, one of sgd|adam|adamw: "
                    + config_lib.KEY_HELP["optimizer.name"])
    root = os.path.join(os.path.dirname(__file__), "..", "experiments", "mnist5k_cnn3.py")
    assert cli.main(["config", "--config", root, "--changed", "--json",
                     "--config.optimizer.lr=0.5"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    lr = next(r for r in rows if r["key"] == "optimizer.lr")
    assert (lr["value"], lr["default"], lr["type"]) == (0.5, 0.001, "float")
    assert all(r["value"] != r["default"] for r in rows) and "seed" not in {r["key"] for r in rows}
    assert cli.main(["config", "--config.optimizer.nme=x"]) == 2
    assert "did you mean optimizer.name" in capsys.readouterr().err
