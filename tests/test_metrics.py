"""jaxaccel.metrics: metrics.jsonl rows (strict JSON lines), torn last lines, the history
`read_metrics` gives after resumed runs, and the progress lines a stage prints."""
import json
import math
import os

from jaxaccel import io, metrics


def test_rows_are_strict_json_lines_with_step_and_split(tmp_path):
    wd = str(tmp_path)
    with metrics.MetricWriter(wd, tensorboard=False) as w:
        w.write(3, {"loss": 0.5, "acc": math.nan, "n": 2, "stage": "train"}, prefix="train")
        w.write(3, {"accuracy": 0.75}, prefix="test")
    lines = open(os.path.join(wd, "metrics.jsonl")).read().splitlines()
    rows = [io.loads(line) for line in lines]  # strict: NaN would not parse
    assert [(r["step"], r["split"]) for r in rows] == [(3, "train"), (3, "test")]
    assert rows[0]["loss"] == 0.5 and rows[0]["acc"] is None and rows[0]["stage"] == "train"
    assert isinstance(rows[0]["time"], float)
    assert list(metrics.read_metrics(wd)) == rows
    assert not os.path.exists(os.path.join(wd, "events"))  # tensorboard=False


def test_tensorboard_events_and_disabled_writers(tmp_path):
    with metrics.MetricWriter(str(tmp_path / "tb")) as w:
        w.write(1, {"loss": 1.0}, prefix="train")
    assert os.listdir(tmp_path / "tb" / "events")
    off = metrics.MetricWriter(str(tmp_path / "off"), enabled=False)  # processes other than 0
    off.write(1, {"loss": 1.0}, prefix="train")
    off.mark_start(0)
    off.close()
    assert not (tmp_path / "off").exists()
    assert list(metrics.read_metrics(str(tmp_path / "off"))) == []


def test_torn_metrics_line_is_skipped_and_next_writer_starts_fresh(tmp_path):
    wd = str(tmp_path)
    with metrics.MetricWriter(wd, tensorboard=False) as w:
        w.mark_start(0)
        w.write(5, {"loss": 1.0}, prefix="train")
        w.write(10, {"loss": 0.5}, prefix="train")
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 15, "split": "train", "lo')  # the crash came mid-write
    assert [r["step"] for r in metrics.read_metrics(wd)] == [5, 10]
    with metrics.MetricWriter(wd, tensorboard=False) as w:  # the resumed run
        w.mark_start(10)
        w.write(15, {"loss": 0.25}, prefix="train")
    rows = list(metrics.read_metrics(wd))
    assert [(r["step"], r["loss"]) for r in rows] == [(5, 1.0), (10, 0.5), (15, 0.25)]
    lines = open(os.path.join(wd, "metrics.jsonl")).read().splitlines()
    assert lines[3] == '{"step": 15, "split": "train", "lo'  # kept, alone on its line


def test_rows_of_lost_work_are_superseded_by_the_resumed_run(tmp_path):
    wd = str(tmp_path)
    with metrics.MetricWriter(wd, tensorboard=False) as w:  # crashed after logging 15
        w.mark_start(0)
        for step in (5, 10, 15):
            w.write(step, {"loss": 1.0 / step}, prefix="train")
        w.write(15, {"accuracy": 0.1}, prefix="test")
    with metrics.MetricWriter(wd, tensorboard=False) as w:  # resumed from checkpoint 10
        w.mark_start(10)
        w.write(12, {"loss": 0.0}, prefix="train")  # e.g. a different log cadence
        w.write(20, {"accuracy": 0.9}, prefix="test")
    rows = list(metrics.read_metrics(wd))
    assert [(r["split"], r["step"]) for r in rows] == [
        ("train", 5), ("train", 10), ("train", 12), ("test", 20)]
    assert len(list(metrics.read_metrics(wd, raw=True))) == 8


def test_a_row_written_twice_keeps_the_last_copy_in_place_of_the_first(tmp_path):
    """(split, step, stage) names a row: a second copy (an evaluation redone after a resume
    at that step) replaces the first; rows of other stages at the same step stay."""
    wd = str(tmp_path)
    with metrics.MetricWriter(wd, tensorboard=False) as w:
        w.mark_start(0)
        w.write(10, {"loss": 1.0, "stage": "a"}, prefix="train")
        w.write(10, {"accuracy": 0.1, "stage": "a"}, prefix="test")
        w.write(10, {"accuracy": 0.2, "stage": "b"}, prefix="test")
        w.mark_start(10)  # resumed at step 10: rows at step 10 are kept
        w.write(10, {"accuracy": 0.3, "stage": "a"}, prefix="test")
    rows = [(r["split"], r["stage"], r.get("accuracy")) for r in metrics.read_metrics(wd)]
    assert rows == [("train", "a", None), ("test", "b", 0.2), ("test", "a", 0.3)]
    raw = list(metrics.read_metrics(wd, raw=True))
    assert [r["split"] for r in raw].count(metrics.START) == 2 and len(raw) == 6


def test_progress_lines_carry_the_stage_label(capsys):
    progress = metrics.Progress(10, 0, label="finetune")  # not a terminal: plain lines
    progress.update(5, {"loss": 0.123456, "accuracy": 0.5, "lr": 0.1})
    progress.close()
    metrics.Progress(10, 0).update(10, {"loss": 2.0})
    metrics.Progress(10, 0, enabled=False, label="x").update(10, {"loss": 2.0})
    assert capsys.readouterr().out.splitlines() == [
        "[finetune] step 5: loss=0.1235 accuracy=0.5", "step 10: loss=2"]


def test_missing_file_reads_as_no_rows(tmp_path):
    assert list(metrics.read_metrics(str(tmp_path))) == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps([1, 2]) + "\n")  # not a row
    assert list(metrics.read_metrics(str(tmp_path))) == []
