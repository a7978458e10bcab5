"""jaxaccel.bench.sweep: sequential vs vectorized sweeps, skipped with a clear message when
it cannot run; TPE + ASHA vs the full grid of the same space (`bench sweep --search`)."""
import importlib.util
import os

import pytest

from jaxaccel.bench import sweep
from test_search import write_experiment


def test_sweep_skips_with_a_clear_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jaxaccel.sweep" else real(name, *a))
    out = sweep.bench_sweep(2)
    assert out["skipped"] is True and "sweep.py does not exist" in out["reason"]
    assert out["table"]["rows"][0][0].startswith("skipped:")
    monkeypatch.undo()
    if sweep.sweep_support()[0] is not None:
        out = sweep.bench_sweep(2, experiment="/nonexistent.py")
        assert out["skipped"] is True and "not found" in out["reason"]


@pytest.mark.slow
def test_sweep_bench_sequential_vs_vectorized():
    out = sweep.bench_sweep(2, steps=5)
    assert out["skipped"] is False and out["vectorized_speedup"] > 0


def test_search_bench_tpe_asha_vs_the_grid(tmp_path, capsys):
    """`bench sweep --search` at a tiny size: a 2-point grid vs 2 TPE + ASHA trials of 2 steps,
    each study in its own workdir under --search-workdir, both through sweep.search."""
    import json

    from jaxaccel import cli
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.choice([1e-3, 3e-3])}')
    wd, path = tmp_path / "bench", tmp_path / "out.json"
    assert cli.main(["bench", "sweep", "--search", "--sweep-config", exp,
                     "--search-trials", "2", "--search-seeds", "1", "--search-steps", "2",
                     "--search-workdir", str(wd), "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["bench"] == "sweep_search" and out["grid_points"] == 2 and out["seeds"] == 1
    assert out["grid"]["complete"] == 2 and out["grid"]["steps_trained"] == 2 * 2
    (arm,) = out["search"]
    assert arm["complete"] + arm["pruned"] == 2 and 0 < arm["steps_trained"] <= 4
    # Every complete trial trains with the same seed: TPE's best is one of the grid's points.
    assert arm["best_validation_accuracy"] in out["grid_validation_accuracies"]
    assert out["grid"]["best_validation_accuracy"] == max(out["grid_validation_accuracies"])
    assert out["median"]["best_validation_accuracy"] == arm["best_validation_accuracy"]
    assert out["steps_fraction"] == arm["steps_trained"] / 4
    assert isinstance(out["goal_met"], bool) and "--search" in out["command"]
    assert sorted(os.listdir(wd)) == ["grid", "tpe-asha-seed0"]
    assert json.loads((wd / "grid" / "search.json").read_text())["sampler"] == "grid"
    assert "| TPE + ASHA, study seed 0 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds grid"):  # no resumed (cheaper) rerun
        sweep.bench_search(experiment=str(exp), trials=2, seeds=1, steps=2, workdir=str(wd))


def test_vectorized_search_bench_compares_the_same_suggestions(tmp_path, monkeypatch):
    """`bench sweep --search --search-vectorize`: both arms through `search.run` on an
    experiment whose get_search() keeps shapes, one study seed, the same suggestions; the
    table and the largest objective difference. (That a vectorized search reproduces the
    values trial by trial is tests/test_search.py's; here the search is stood in for.)"""
    from jaxaccel.sweep import search
    exp = write_experiment(tmp_path, '{"optimizer.lr": sweep.choice([1e-3, 3e-3])}')
    calls = []

    def fake_run(experiment, workdir, **kw):
        space = search.load_search(experiment)  # the wrapper's get_search() loads and keeps shapes
        assert set(space) == {"optimizer.lr", "optimizer.weight_decay"}
        calls.append(kw)
        value = 0.5 if "vectorize" in kw else 0.5 + 1e-3
        trials = [{"params": {"optimizer.lr": 1e-3 * (k + 1)}, "value": value}
                  for k in range(kw["trials"])]
        return search.SearchResult({"trials": trials}, list(range(kw["trials"])))

    monkeypatch.setattr(search, "run", fake_run)
    out = sweep.bench_vectorized_search(experiment=str(exp), trials=2, steps=2, mode="loop")
    assert [c.get("vectorize") for c in calls] == [None, "loop"]
    assert all(c["sampler"] == "random" and c["trials"] == 2 for c in calls)
    assert calls[1]["per_program"] == 2 and "num_steps=2" in calls[0]["overrides"]
    assert out["trials"] == 2 and out["max_objective_difference"] == pytest.approx(1e-3)
    assert out["sequential_s"] > 0 and out["vectorized_s"] > 0
    assert out["table"]["rows"][1][0] == "one program (loop)"
    with pytest.raises(ValueError, match="--search-trials 1 must be >= 2"):
        sweep.bench_vectorized_search(experiment=str(exp), trials=1)
