"""Reports from sub-workdirs alone: csv rows, mean ± std over seeds, stage-aware results,
failed/pending points, PNG plots that open, and the `jaxaccel report` command."""
import csv
import json
import statistics

import pytest
from PIL import Image

from jaxaccel import cli, report, sweep


def make_point(root, overrides, results=None, error=None, curve=None):
    """A sub-workdir as a sweep leaves it (no training needed)."""
    name = sweep.point_name(overrides)
    d = root / name
    d.mkdir(parents=True)
    (d / "point.json").write_text(json.dumps({"name": name, "overrides": overrides}))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if error is not None:
        (d / "error.txt").write_text(error + "\n\nTraceback ...\n")
    if curve:
        rows = [{"step": s, "split": "train", "loss": l, "accuracy": 1 - l} for s, l in curve]
        rows.append({"step": curve[-1][0], "split": "test", "loss": 0.3, "accuracy": 0.9})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return name


def plain(acc, loss=0.5):
    return {"test_accuracy": acc, "test_loss": loss, "steps": 10, "train_images_per_sec": 1000.0,
            "num_devices": 1, "strategy": "data"}


def staged(sparsities, accs, bits=32):
    rows = [{"name": f"s{i}", "test_accuracy": a, "test_loss": 1 - a, "sparsity": s, "bits": bits,
             "model_bytes": round(1000 * (1 - s)), "flops": 10} for i, (s, a) in enumerate(zip(sparsities, accs))]
    return {**plain(accs[-1]), "stages": rows}


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "runs"
    accs = {(1e-3, 0): 0.90, (1e-3, 1): 0.92, (1e-2, 0): 0.80, (1e-2, 1): 0.86}
    for (lr, seed), acc in accs.items():
        make_point(root, {"optimizer.lr": lr, "seed": seed}, plain(acc),
                   curve=[(5, 1.0 - acc / 2), (10, 1.0 - acc)])
    make_point(root, {"optimizer.lr": 1e-1, "seed": 0}, error="FloatingPointError: non-finite loss")
    make_point(root, {"optimizer.lr": 1e-1, "seed": 1})  # started, never finished
    return root


def test_csv_has_one_row_per_point(sweep_dir):
    paths = report.build(str(sweep_dir))
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    by = {(r["optimizer.lr"], r["seed"]): r for r in rows}
    assert float(by[("0.001", "1")]["test_accuracy"]) == 0.92
    assert by[("0.1", "0")]["status"] == "failed"
    assert by[("0.1", "0")]["error"] == "FloatingPointError: non-finite loss"
    assert by[("0.1", "1")]["status"] == "pending" and by[("0.1", "1")]["test_accuracy"] == ""
    assert "stages_csv" not in paths  # no stage-aware results here


def test_markdown_groups_seeds_with_mean_and_std(sweep_dir):
    report.build(str(sweep_dir), plots=False)
    md = (sweep_dir / "results.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| 0.0")]
    assert len(table) == 2  # lr 1e-3 and 1e-2, each over seeds 0 and 1
    std = statistics.stdev([0.90, 0.92])
    assert f"0.9100 ± {std:.4f}" in table[0] and "| 2 |" in table[0]
    assert f"0.8300 ± {statistics.stdev([0.80, 0.86]):.4f}" in table[1]
    assert "6 points: 4 done, 1 failed, 1 pending" in md
    assert "FloatingPointError" in md and "## Not finished" in md
    assert "![" not in md  # no plots requested


def test_summary_without_seeds_is_one_row_per_point(tmp_path):
    root = tmp_path / "r"
    make_point(root, {"model.width": 0.5}, plain(0.7))
    make_point(root, {"model.width": 1.0}, plain(0.8))
    rows = report.summarize(report.collect(str(root)))
    assert [(r["overrides"], r["n"]) for r in rows] == [({"model.width": 0.5}, 1), ({"model.width": 1.0}, 1)]
    assert rows[1]["test_accuracy"] == (0.8, None)


def test_stage_aware_results(tmp_path):
    root = tmp_path / "r"
    for seed, accs in ((0, [0.95, 0.60, 0.93]), (1, [0.96, 0.62, 0.91])):
        make_point(root, {"prune.sparsity": 0.9, "seed": seed}, staged([0.0, 0.9, 0.9], accs))
    make_point(root, {"prune.sparsity": 0.5, "seed": 0}, staged([0.0, 0.5], [0.95, 0.94], bits=8))
    paths = report.build(str(root))
    records = report.collect(str(root))
    first = next(r for r in records if r.name == "prune.sparsity=0.9,seed=0")
    assert first.final("sparsity") == 0.9 and first.final("model_bytes") == 100
    with open(paths["stages_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    row = next(r for r in rows if r["point"] == first.name and r["stage"] == "s1")
    assert float(row["sparsity"]) == 0.9 and float(row["test_accuracy"]) == 0.6
    # Accuracy vs sparsity: per run, the last stage at each sparsity; seeds averaged.
    series = report.tradeoff_points(records, "sparsity")
    assert set(series) == {"all"}  # the sparsity-like key and the seed are not series
    pts = {x: (m, s) for x, m, s in series["all"]}
    assert pts[0.9][0] == pytest.approx(0.92) and pts[0.9][1] == pytest.approx(statistics.stdev([0.93, 0.91]))
    assert pts[0.5][0] == pytest.approx(0.94)
    assert pts[0.0][0] == pytest.approx((0.95 + 0.96 + 0.95) / 3)
    bits = report.tradeoff_points(records, "bits")
    assert set(bits) == {"sparsity=0.5", "sparsity=0.9"}
    assert [x for x, _, _ in bits["sparsity=0.5"]] == [8.0] and [x for x, _, _ in bits["sparsity=0.9"]] == [32.0]


def test_plots_are_pngs_that_open(sweep_dir):
    paths = report.build(str(sweep_dir))
    for key in ("accuracy_vs_sparsity", "accuracy_vs_bits", "training_curves"):
        with Image.open(paths[key]) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # something is drawn
    curves = report.training_curves(str(sweep_dir / "optimizer.lr=0.001,seed=0"))
    assert curves["train_loss"] == [(5, pytest.approx(0.55)), (10, pytest.approx(0.1))]


def test_report_command(sweep_dir, tmp_path, capsys):
    assert cli.main(["report", str(sweep_dir)]) == 0
    assert "4/6 points done" in capsys.readouterr().out
    assert (sweep_dir / "results.md").exists() and (sweep_dir / "training_curves.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 2
    assert "holds no sweep points" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
