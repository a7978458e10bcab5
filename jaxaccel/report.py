"""Sweep reports: `results.csv`, `results.md` and PNG plots, rebuilt from the sub-workdirs.

`jaxaccel report runs/X` (and every `jaxaccel sweep` at its end) reads each point's
`point.json` (its overrides), `results.json`, `error.txt` and `metrics.jsonl`, and writes:
  * `results.csv`  — one row per point (run): overrides, status, final metrics, error;
  * `stages.csv`   — one row per (point, stage) when results are stage-aware;
  * `results.md`   — a table with one row per point, or per group of points that differ
                     only in `seed` with mean ± std over the seeds; failed points listed;
  * `accuracy_vs_sparsity.png`, `accuracy_vs_bits.png`, `training_curves.png`.
Runs without compression count as sparsity 0 and 32-bit. Nothing here needs the processes
that trained the points: the workdirs are the whole truth.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
from typing import Any, Sequence

from jaxaccel import metrics, sweep

SEED_KEYS = ("seed",)
# Final-result columns, in this order; stage-aware values come from the last stage.
RESULT_COLUMNS = ("test_accuracy", "test_loss", "sparsity", "bits", "model_bytes", "flops",
                  "steps", "train_images_per_sec", "compile_seconds", "num_devices", "strategy")
STAGE_COLUMNS = ("test_accuracy", "test_loss", "sparsity", "bits", "model_bytes", "flops")
SUMMARY_COLUMNS = ("test_accuracy", "test_loss", "sparsity", "bits", "model_bytes",
                   "train_images_per_sec")
PLOTS = ("accuracy_vs_sparsity.png", "accuracy_vs_bits.png", "training_curves.png")
DENSE = {"sparsity": 0.0, "bits": 32}  # what an uncompressed float32 run is


@dataclasses.dataclass
class RunRecord:
    """One point's sub-workdir as read back: overrides, status, results, error."""
    name: str
    workdir: str
    overrides: dict[str, Any]
    status: str
    results: dict[str, Any]
    error: str = ""

    @property
    def stages(self) -> list[dict[str, Any]]:
        return [s for s in self.results.get("stages") or [] if isinstance(s, dict)]

    def final(self, key: str) -> Any:
        """A final-result value: top-level key, else the last stage that reports it."""
        if self.results.get(key) is not None:
            return self.results[key]
        for s in reversed(self.stages):
            if s.get(key) is not None:
                return s[key]
        return None

    def group(self) -> tuple:
        """The overrides that identify this point up to its seed."""
        return tuple((k, _hashable(v)) for k, v in sorted(self.overrides.items())
                     if k not in SEED_KEYS)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def collect(workdir: str) -> list[RunRecord]:
    """Every point sub-workdir of a sweep, in the sweep's order (then by name)."""
    if not os.path.isdir(workdir):
        raise NotADirectoryError(f"sweep workdir {workdir!r} does not exist")
    order: list[str] = []
    sweep_file = os.path.join(workdir, sweep.SWEEP_FILE)
    if os.path.isfile(sweep_file):
        with open(sweep_file) as f:
            order = [p["name"] for p in json.load(f).get("points", [])]
    found = sorted(d for d in os.listdir(workdir) if _is_point_dir(os.path.join(workdir, d)))
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    records = []
    for name in names:
        sub = os.path.join(workdir, name)
        point = _read_json(os.path.join(sub, sweep.POINT_FILE)) or {}
        results = _read_json(os.path.join(sub, sweep.RESULTS_FILE)) or {}
        status = sweep.status_of(sub)
        records.append(RunRecord(name=name, workdir=sub, overrides=point.get("overrides", {}),
                                 status=status, results=results,
                                 error=sweep.read_error(sub) if status == sweep.FAILED else ""))
    return records


def _is_point_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f))
        for f in (sweep.POINT_FILE, sweep.RESULTS_FILE, "config.json"))


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def swept_keys(records: Sequence[RunRecord]) -> list[str]:
    """Override keys in first-seen order."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.overrides if k not in keys]
    return keys


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------
def write_csv(path: str, records: Sequence[RunRecord]) -> None:
    """One row per point."""
    keys = swept_keys(records)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", "status", *keys, *RESULT_COLUMNS, "error"])
        for r in records:
            w.writerow([r.name, r.status, *[_cell(r.overrides.get(k)) for k in keys],
                        *[_cell(r.final(c)) for c in RESULT_COLUMNS], r.error])


def write_stages_csv(path: str, records: Sequence[RunRecord]) -> bool:
    """One row per (point, stage); False (and no file) when no run has stages."""
    if not any(r.stages for r in records):
        return False
    keys = swept_keys(records)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", "stage", *keys, *STAGE_COLUMNS])
        for r in records:
            for s in r.stages:
                w.writerow([r.name, s.get("name", ""), *[_cell(r.overrides.get(k)) for k in keys],
                            *[_cell(s.get(c)) for c in STAGE_COLUMNS]])
    return True


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Finished points grouped over seeds: overrides, n, and (mean, std) per summary column."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.status == sweep.DONE:
            groups.setdefault(r.group(), []).append(r)
    out = []
    for key, runs in groups.items():
        row: dict[str, Any] = {"overrides": dict(key), "n": len(runs),
                               "seeds": [r.overrides.get("seed") for r in runs]}
        for c in SUMMARY_COLUMNS:
            vals = [r.final(c) for r in runs]
            vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            row[c] = mean_std(vals) if vals else None
        out.append(row)
    return out


_FORMATS = {"test_accuracy": "{:.4f}", "test_loss": "{:.4f}", "sparsity": "{:.3f}",
            "bits": "{:.0f}", "model_bytes": "{:.0f}", "train_images_per_sec": "{:.0f}"}


def _fmt(c: str, ms: tuple[float, float | None] | None) -> str:
    if ms is None:
        return "—"
    f = _FORMATS.get(c, "{:.4g}")
    mean, std = ms
    return f.format(mean) + (f" ± {f.format(std)}" if std else "")  # no "± 0" for constants


def write_markdown(path: str, records: Sequence[RunRecord], title: str,
                   plots: Sequence[str]) -> None:
    """results.md: grouped table (mean ± std over seeds), failures, plots."""
    summary = summarize(records)
    keys = [k for k in swept_keys(records) if k not in SEED_KEYS]
    counts = {s: sum(r.status == s for r in records)
              for s in (sweep.DONE, sweep.FAILED, sweep.PENDING)}
    repeats = max((row["n"] for row in summary), default=0)
    lines = [f"# Sweep results: {title}", "",
             f"{len(records)} points: {counts[sweep.DONE]} done, {counts[sweep.FAILED]} "
             f"failed, {counts[sweep.PENDING]} pending."]
    if repeats > 1:
        lines.append("Values are mean ± sample std over the seeds of each row (n).")
    lines += ["", "| " + " | ".join([*keys, "n", *SUMMARY_COLUMNS]) + " |",
              "|" + "---|" * (len(keys) + 1 + len(SUMMARY_COLUMNS))]
    for row in summary:
        cells = [_cell(row["overrides"].get(k)) or "—" for k in keys]
        cells += [str(row["n"])] + [_fmt(c, row[c]) for c in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in records if r.status == sweep.FAILED]
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- `{r.name}`: {r.error}" for r in failed]
    pending = [r for r in records if r.status == sweep.PENDING]
    if pending:
        lines += ["", "## Not finished", ""] + [f"- `{r.name}`" for r in pending]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------
def tradeoff_points(records: Sequence[RunRecord], x: str) -> dict[str, list[tuple]]:
    """Series label -> [(x mean, accuracy mean, accuracy std)] sorted by x.

    A run contributes, for each distinct value of `x` among its stages, the accuracy of the
    last stage at that value (train → prune → finetune gives dense and finetuned points; IMP
    gives one per round); a run without stages contributes its final result. Seeds of a
    point are averaged; a series is the point's overrides minus seed and the `x`-like keys.
    """
    acc: dict[tuple[str, float], list[float]] = {}
    for r in records:
        if r.status != sweep.DONE:
            continue
        label = _label({k: v for k, v in r.overrides.items()
                        if k not in SEED_KEYS and x not in k.split(".")[-1]})
        pairs: dict[float, float] = {}
        for s in r.stages:
            if s.get("test_accuracy") is not None:
                pairs[float(s.get(x) if s.get(x) is not None else DENSE[x])] = s["test_accuracy"]
        if not pairs and r.results.get("test_accuracy") is not None:
            xv = r.final(x)
            pairs[float(xv if xv is not None else DENSE[x])] = r.results["test_accuracy"]
        for xv, a in pairs.items():
            acc.setdefault((label, xv), []).append(float(a))
    series: dict[str, list[tuple]] = {}
    for (label, xv), vals in acc.items():
        m, s = mean_std(vals)
        series.setdefault(label, []).append((xv, m, s or 0.0))
    return {k: sorted(v) for k, v in series.items()}


def _label(overrides: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={sweep.name_value(v)}"
                     for k, v in sorted(overrides.items())) or "all"


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_tradeoff(path: str, records: Sequence[RunRecord], x: str, xlabel: str) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    series = tradeoff_points(records, x)
    for label, pts in list(series.items())[:12]:
        xs, ms, ss = zip(*pts)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label)
    if x == "bits":
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in series.values() for p in pts})
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"accuracy vs {xlabel}")
    ax.grid(alpha=0.3)
    if not series:
        ax.text(0.5, 0.5, "no finished points", ha="center", va="center",
                transform=ax.transAxes)
    elif len(series) > 1 or next(iter(series)) != "all":
        ax.legend(fontsize=7)
    fig.savefig(path)


def training_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """Per metric name (train loss/accuracy, test accuracy): [(step, value)] of one run.

    Steps that restart (a later stage counting from 0) are shifted to continue the curve.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    offset, last = 0, -1
    for row in metrics.read_metrics(workdir):
        step = row.get("step")
        if not isinstance(step, int):
            continue
        if step + offset < last:
            offset = last
        x = step + offset
        last = max(last, x)
        split = row.get("split")
        for k in ("loss", "accuracy"):
            if isinstance(row.get(k), (int, float)) and split in ("train", "test"):
                out.setdefault(f"{split}_{k}", []).append((x, float(row[k])))
    return out


def plot_training_curves(path: str, records: Sequence[RunRecord]) -> None:
    fig = _figure(10.0, 4.0)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    groups: dict[tuple, int] = {}
    colors = [f"C{i}" for i in range(10)]
    for r in records:
        curves = training_curves(r.workdir)
        if not curves:
            continue
        first = r.group() not in groups
        g = groups.setdefault(r.group(), len(groups))
        color = colors[g % len(colors)]
        label = _label(dict(r.group())) if first else None  # one legend entry per group
        for name, ax, style in (("train_loss", ax_loss, "-"), ("train_accuracy", ax_acc, "-"),
                                ("test_accuracy", ax_acc, "--x")):
            pts = curves.get(name)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, alpha=0.8, linewidth=1,
                        label=label if name == "train_loss" else None)
    ax_loss.set_title("train loss")
    ax_acc.set_title("accuracy (train —, test ×)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if not groups:
        ax_loss.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax_loss.transAxes)
    elif len(groups) <= 12:
        ax_loss.legend(fontsize=7)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------
def build(workdir: str, *, plots: bool = True) -> dict[str, str]:
    """Write results.csv, results.md (and stages.csv, plots) for the sweep in `workdir`."""
    records = collect(workdir)
    paths = {"csv": os.path.join(workdir, "results.csv"),
             "md": os.path.join(workdir, "results.md")}
    write_csv(paths["csv"], records)
    stages_path = os.path.join(workdir, "stages.csv")
    if write_stages_csv(stages_path, records):
        paths["stages_csv"] = stages_path
    written = []
    if plots:
        plot_tradeoff(os.path.join(workdir, PLOTS[0]), records, "sparsity", "sparsity")
        plot_tradeoff(os.path.join(workdir, PLOTS[1]), records, "bits", "bit-width")
        plot_training_curves(os.path.join(workdir, PLOTS[2]), records)
        written = list(PLOTS)
        paths.update({p[:-4]: os.path.join(workdir, p) for p in PLOTS})
    write_markdown(paths["md"], records, os.path.basename(os.path.abspath(workdir)), written)
    return paths


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="a sweep's workdir (holding one sub-workdir per point)")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def run_report(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"report takes no --config overrides (got --config.{overrides[0]})")
    records = collect(args.workdir)
    if not records:
        raise ValueError(f"{args.workdir!r} holds no sweep points (no sub-workdirs with "
                         f"point.json, results.json or config.json)")
    paths = build(args.workdir, plots=not args.no_plots)
    done = sum(r.status == sweep.DONE for r in records)
    print(f"report: {done}/{len(records)} points done; wrote "
          + ", ".join(os.path.basename(p) for p in paths.values()))
    return 0
