"""jaxaccel.sweep.report: reports from sub-workdirs alone: csv rows, mean ± std over seeds, stage-aware results,
failed/pending points, PNG plots of what varies (stale ones removed), validation columns and
the best point chosen on validation only, throughput marked when measured on a shared
machine, and the `jaxaccel report` command."""
import csv
import json
import statistics

import pytest
from PIL import Image

from jaxaccel import cli, sweep
from jaxaccel.sweep import report


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


def assert_png(path, min_width=400):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] >= min_width and im.size[1] >= 300
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # something is drawn


def pngs(root):
    return sorted(p.name for p in root.glob("*.png"))


def test_plots_are_pngs_that_open(sweep_dir):
    paths = report.build(str(sweep_dir))
    for key in ("accuracy_vs_optimizer.lr", "training_curves"):
        assert_png(paths[key])
    curves = report.training_curves(str(sweep_dir / "optimizer.lr=0.001,seed=0"))
    assert curves["train_loss"] == [(5, pytest.approx(0.55)), (10, pytest.approx(0.1))]


def test_plots_follow_what_varies(sweep_dir):
    """lr x seeds, all dense float32: accuracy vs lr (seeds aggregated), no sparsity/bits."""
    paths = report.build(str(sweep_dir))
    assert pngs(sweep_dir) == ["accuracy_vs_optimizer.lr.png", "training_curves.png"]
    assert "accuracy_vs_sparsity" not in paths and "accuracy_vs_bits" not in paths
    md = (sweep_dir / "results.md").read_text()
    assert "![accuracy_vs_optimizer.lr](accuracy_vs_optimizer.lr.png)" in md
    assert "accuracy_vs_sparsity" not in md and "accuracy_vs_bits" not in md
    records = report.collect(str(sweep_dir))
    assert report.plotted_keys(records) == ["optimizer.lr"]  # the failed 0.1 is not finished
    (label, pts), = report.key_points(records, "optimizer.lr").items()
    assert label == "all"
    assert [p[0] for p in pts] == [0.001, 0.01]
    assert pts[0][1:] == (pytest.approx(0.91), pytest.approx(statistics.stdev([0.90, 0.92])))
    assert pts[1][1:] == (pytest.approx(0.83), pytest.approx(statistics.stdev([0.80, 0.86])))


def test_other_swept_keys_are_series_and_categories(tmp_path):
    root = tmp_path / "r"
    names = [make_point(root, {"optimizer.name": opt, "model.width": width, "seed": seed},
                        plain(acc + width / 10 + seed / 100))
             for opt, acc in (("sgd", 0.7), ("adam", 0.8)) for width in (0.5, 1.0) for seed in (0, 1)]
    (root / "sweep.json").write_text(json.dumps({"points": [{"name": n} for n in names]}))
    paths = report.build(str(root))
    assert pngs(root) == ["accuracy_vs_model.width.png", "accuracy_vs_optimizer.name.png",
                          "training_curves.png"]
    assert_png(paths["accuracy_vs_optimizer.name"])
    records = report.collect(str(root))
    assert report.key_values(records, "optimizer.name") == ["sgd", "adam"]  # sweep order
    series = report.key_points(records, "optimizer.name")
    assert set(series) == {"width=0.5", "width=1.0"}
    assert [(v, round(m, 3)) for v, m, _ in series["width=1.0"]] == [("sgd", 0.805), ("adam", 0.905)]
    assert report.key_plot_name("model.kwargs.padding mode") == "accuracy_vs_model.kwargs.padding_mode.png"


def test_sparsity_and_bits_plots_only_when_they_vary_and_stale_ones_go(tmp_path):
    root = tmp_path / "r"
    for sp in (0.5, 0.9):  # train -> prune: dense and sparse stage rows, all 32-bit
        make_point(root, {"prune.sparsity": sp}, staged([0.0, sp], [0.95, 0.9]))
    report.build(str(root))
    assert pngs(root) == ["accuracy_vs_prune.sparsity.png", "accuracy_vs_sparsity.png",
                          "training_curves.png"]
    # One point finished dense and another 8-bit: the sparsity plot stays, bits appears.
    (root / "prune.sparsity=0.9" / "results.json").write_text(json.dumps(staged([0.0], [0.9], bits=8)))
    report.build(str(root))
    assert "accuracy_vs_bits.png" in pngs(root) and "accuracy_vs_sparsity.png" in pngs(root)
    # Rebuilt from dense results only, with another key swept: no stale plots remain.
    for name in ("prune.sparsity=0.5", "prune.sparsity=0.9"):
        (root / name / "results.json").write_text(json.dumps(plain(0.9)))
    report.build(str(root), plots=False)
    assert pngs(root) == ["accuracy_vs_prune.sparsity.png", "training_curves.png"]
    (root / "prune.sparsity=0.5" / "results.json").unlink()  # now only one value is finished
    paths = report.build(str(root))
    assert pngs(root) == ["training_curves.png"] and "accuracy_vs_prune.sparsity" not in paths


def with_validation(val_acc, test_acc, **extra):
    return {**plain(test_acc), "validation_accuracy": val_acc, "validation_loss": 1 - val_acc,
            **extra}


def test_validation_columns_and_best_point_selected_on_validation(tmp_path):
    root = tmp_path / "r"
    # lr=0.01 has the best test accuracy, lr=0.001 the best validation accuracy.
    for (lr, seed), (v, t) in {(1e-3, 0): (0.90, 0.80), (1e-3, 1): (0.92, 0.82),
                                (1e-2, 0): (0.85, 0.95), (1e-2, 1): (0.87, 0.97)}.items():
        make_point(root, {"optimizer.lr": lr, "seed": seed},
                   with_validation(v, t, packed_bytes=500 if lr == 1e-3 else None,
                                   model_bytes=700))  # packed_bytes read first, model_bytes before the rename
    paths = report.build(str(root))
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:6] == ["point", "status", "optimizer.lr", "seed",
                                     "validation_accuracy", "validation_loss"]
    assert "model_bytes" not in reader.fieldnames
    by = {r["point"]: r for r in rows}
    assert float(by["optimizer.lr=0.001,seed=1"]["validation_accuracy"]) == 0.92
    assert by["optimizer.lr=0.001,seed=1"]["packed_bytes"] == "500"
    assert by["optimizer.lr=0.01,seed=1"]["packed_bytes"] == "700"
    md = (root / "results.md").read_text()
    assert "| optimizer.lr | n | validation_accuracy | validation_loss | test_accuracy |" in md
    best = [l for l in md.splitlines() if l.startswith("**Best point**")]
    assert len(best) == 1 and "`optimizer.lr=0.001`" in best[0]
    assert f"validation accuracy 0.9100 ± {statistics.stdev([0.90, 0.92]):.4f}" in best[0]
    assert f"test accuracy 0.8100 ± {statistics.stdev([0.80, 0.82]):.4f}" in best[0]
    assert "No best point" not in md
    # Validation and test side by side in the plots (two panels: wider).
    assert_png(paths["accuracy_vs_optimizer.lr"], min_width=1000)
    val = report.key_points(report.collect(str(root)), "optimizer.lr", "validation_accuracy")
    assert [round(m, 3) for _, m, _ in val["all"]] == [0.91, 0.86]
    # Training curves show the validation accuracy too.
    rows = [{"step": 5, "split": "validation", "loss": 0.4, "accuracy": 0.88},
            {"step": 5, "split": "test", "loss": 0.5, "accuracy": 0.78}]
    (root / "optimizer.lr=0.001,seed=0" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    curves = report.training_curves(str(root / "optimizer.lr=0.001,seed=0"))
    assert curves["validation_accuracy"] == [(5, 0.88)] and curves["test_accuracy"] == [(5, 0.78)]
    assert_png(report.build(str(root))["training_curves"])


def test_no_best_point_without_validation_and_stable_columns(sweep_dir):
    paths = report.build(str(sweep_dir), plots=False)
    with open(paths["csv"]) as f:
        header = next(csv.reader(f))
    assert header == ["point", "status", "optimizer.lr", "seed", *report.RESULT_COLUMNS,
                      "concurrent_workers", "vectorized_points", "error"]
    md = (sweep_dir / "results.md").read_text()
    assert "validation_accuracy" not in md and "**Best point**" not in md
    assert "No best point is selected: the runs have no validation split " \
           "(`dataset.validation_split=0`)" in md


def test_throughput_measured_on_a_shared_machine_is_marked(tmp_path):
    root = tmp_path / "r"
    make_point(root, {"model.width": 0.5}, plain(0.7))  # alone
    shared = make_point(root, {"model.width": 1.0}, plain(0.8))
    point = json.loads((root / shared / "point.json").read_text())
    (root / shared / "point.json").write_text(json.dumps({**point, "concurrent_workers": 2}))
    make_point(root, {"model.width": 2.0}, {**plain(0.9), "vectorized": {"points": 4, "mode": "loop"}})
    paths = report.build(str(root), plots=False)
    with open(paths["csv"]) as f:
        rows = {r["model.width"]: r for r in csv.DictReader(f)}
    assert [rows[w]["concurrent_workers"] for w in ("0.5", "1.0", "2.0")] == ["1", "2", "1"]
    assert [rows[w]["vectorized_points"] for w in ("0.5", "1.0", "2.0")] == ["", "", "4"]
    md = (root / "results.md").read_text().splitlines()
    table = {l.split(" | ")[0]: l for l in md if l.startswith("| ")}
    assert table["| 0.5"].endswith("| 1000 |")
    assert table["| 1.0"].endswith("| 1000† |")
    assert table["| 2.0"].endswith("| 1000‡ |")
    assert any(l.startswith("† train_images_per_sec measured while 2 worker processes") for l in md)
    assert any(l.startswith("‡ ") and "4 points at once" in l for l in md)


def test_report_command(sweep_dir, tmp_path, capsys):
    assert cli.main(["report", str(sweep_dir)]) == 0
    assert "4/6 points done" in capsys.readouterr().out
    assert (sweep_dir / "results.md").exists() and (sweep_dir / "training_curves.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 2
    assert "holds no sweep points" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
