"""`jaxaccel datasets` (jaxaccel.cli.datasets): every dataset, its kind and whether it is
prepared; listing prepares nothing."""
import os

from jaxaccel import cli
from tiny_runs import run_cli


def test_datasets_lists_builtins():
    proc = run_cli("datasets")
    assert proc.returncode == 0, proc.stderr
    for name in ("digits", "mnist5k", "image_folder"):
        assert name in proc.stdout


def test_datasets_says_built_on_first_use_not_not_prepared(tmp_path, capsys):
    from jaxaccel import data
    empty, ready = str(tmp_path / "empty"), str(tmp_path / "ready")
    assert cli.main(["datasets", "--data-dir", empty]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in ("digits", "mnist5k", "image_folder"):
        assert "built on first use (offline)" in rows[name], rows[name]
        assert "not prepared" not in rows[name]
    assert rows["digits"].split()[1] == "built-in" and rows["image_folder"].split()[1] == "folder"
    assert rows["cifar10"].split()[1] == "catalog"
    assert "not prepared: needs `tfds build cifar10` on a machine with internet" in rows["cifar10"]
    assert f"data dir: {empty}" in rows["data"]
    assert not os.path.exists(empty)  # listing prepares nothing
    data.prepare("digits", data_dir=ready)
    assert cli.main(["datasets", "--data-dir", ready]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["digits"].split()[1:] == ["built-in", "prepared"]
    assert "built on first use (offline)" in rows["mnist5k"]
