"""Sweep reports: `results.csv`, `results.md` and PNG plots, rebuilt from the sub-workdirs.

`jaxaccel report runs/X` (and every `jaxaccel sweep` at its end) reads each point's
`point.json` (its overrides, how it ran), `results.json`, `error.txt` and `metrics.jsonl`,
and writes:
  * `results.csv`  — one row per point (run): overrides, status, final metrics (validation
                     columns when the runs hold a validation split out), how many worker
                     processes shared the machine, error;
  * `stages.csv`   — one row per (point, stage) when results are stage-aware;
  * `results.md`   — a table with one row per point, or per group of points that differ
                     only in `seed` with mean ± std over the seeds; the best group, selected on
                     validation accuracy only (test accuracy is reported beside it); failed
                     points listed; throughput measured on a shared machine marked † / ‡;
  * plots of what varies: `accuracy_vs_<key>.png` per swept key (seeds aggregated),
    `accuracy_vs_sparsity.png` / `accuracy_vs_bits.png` only when sparsity / bits differ
    between the finished results (stage rows included), and `training_curves.png`. A plot
    that no longer applies is removed when the report is rebuilt.
Runs without compression count as sparsity 0 and 32-bit. Nothing here needs the processes
that trained the points: the workdirs are the whole truth.

Owns `collect` and `build`. Imports `sweep.points`, metrics and io; never the pipeline, the
loop, state or the CLI.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import statistics
from io import StringIO
from typing import Any, Callable, Sequence

from jaxaccel import io, metrics
from jaxaccel.sweep import points
from jaxaccel.workdir import CONFIG_FILE

SEED_KEYS = ("seed",)
# Final-result columns, in this order; stage-aware values come from the last stage.
RESULT_COLUMNS = ("test_accuracy", "test_loss", "sparsity", "bits", "packed_bytes", "flops",
                  "steps", "train_images_per_sec", "compile_seconds", "num_devices", "strategy")
STAGE_COLUMNS = ("test_accuracy", "test_loss", "sparsity", "bits", "packed_bytes", "flops")
SUMMARY_COLUMNS = ("test_accuracy", "test_loss", "sparsity", "bits", "packed_bytes",
                   "train_images_per_sec")
# Written before the test columns when any run holds a validation split out.
VALIDATION_COLUMNS = ("validation_accuracy", "validation_loss")
# How a point's throughput was measured (results.csv): worker processes sharing the machine
# (`--workers N`, from point.json) and points of one vectorized program (`--vectorize`).
RUN_COLUMNS = ("concurrent_workers", "vectorized_points")
# A column read under older names too: results.json before the rename says `model_bytes`.
ALIASES = {"packed_bytes": ("packed_bytes", "model_bytes")}
TRAINING_CURVES = "training_curves.png"
TRADEOFF_PLOTS = {"sparsity": ("accuracy_vs_sparsity.png", "sparsity"),
                  "bits": ("accuracy_vs_bits.png", "bit-width")}
KEY_PLOT_PREFIX = "accuracy_vs_"  # every accuracy plot's file name starts with it
DENSE = {"sparsity": 0.0, "bits": 32}  # what an uncompressed float32 run is
WORKERS_MARK, VECTORIZED_MARK = "†", "‡"


@dataclasses.dataclass
class RunRecord:
    """One point's sub-workdir as read back: overrides, status, results, error, point.json."""
    name: str
    workdir: str
    overrides: dict[str, Any]
    status: str
    results: dict[str, Any]
    error: str = ""
    point: dict[str, Any] = dataclasses.field(default_factory=dict)

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

    def value(self, column: str) -> Any:
        """`final(column)`, reading older results under the column's previous names."""
        for key in ALIASES.get(column, (column,)):
            v = self.final(key)
            if v is not None:
                return v
        return None

    @property
    def concurrent_workers(self) -> int | None:
        """Worker processes (this one included) that ran at once while this point trained:
        1 unless a `--workers N` sweep recorded more in point.json; None without results."""
        if not self.results:
            return None
        n = self.point.get("concurrent_workers")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    @property
    def vectorized_points(self) -> int | None:
        """K when this point trained inside a K-point vectorized program (its throughput is
        the per-point share), else None."""
        v = self.results.get("vectorized")
        k = v.get("points") if isinstance(v, dict) else None
        return int(k) if isinstance(k, int) and not isinstance(k, bool) else None

    def group(self) -> tuple:
        """The overrides that identify this point up to its seed."""
        return tuple((k, _hashable(v)) for k, v in sorted(self.overrides.items())
                     if k not in SEED_KEYS)


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple((k, _hashable(x)) for k, x in sorted(v.items()))
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def _stage_value(stage: dict[str, Any], column: str) -> Any:
    for key in ALIASES.get(column, (column,)):
        if stage.get(key) is not None:
            return stage[key]
    return None


def collect(workdir: str) -> list[RunRecord]:
    """Every point sub-workdir of a sweep, in the sweep's order (then by name)."""
    if not os.path.isdir(workdir):
        raise NotADirectoryError(f"sweep workdir {workdir!r} does not exist")
    sweep_file = _read_json(os.path.join(workdir, points.SWEEP_FILE)) or {}
    order = [p["name"] for p in sweep_file.get("points", []) if isinstance(p, dict)]
    found = sorted(d for d in os.listdir(workdir) if _is_point_dir(os.path.join(workdir, d)))
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    records = []
    for name in names:
        sub = os.path.join(workdir, name)
        point = _read_json(os.path.join(sub, points.POINT_FILE)) or {}
        results = _read_json(os.path.join(sub, points.RESULTS_FILE)) or {}
        status = points.status_of(sub)
        records.append(RunRecord(name=name, workdir=sub, overrides=point.get("overrides", {}),
                                 status=status, results=results,
                                 error=points.read_error(sub) if status == points.FAILED else "",
                                 point=point))
    return records


def _is_point_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f))
        for f in (points.POINT_FILE, points.RESULTS_FILE, CONFIG_FILE))


def _read_json(path: str) -> dict | None:
    """A JSON object file (files from before the strict writer: NaN -> None), or None."""
    try:
        obj = io.read_json(path, lenient=True)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def swept_keys(records: Sequence[RunRecord]) -> list[str]:
    """Override keys in first-seen order."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.overrides if k not in keys]
    return keys


def has_validation(records: Sequence[RunRecord]) -> bool:
    """Whether any run reports validation metrics (it held a validation split out)."""
    return any(r.value(c) is not None or any(s.get(c) is not None for s in r.stages)
               for r in records for c in VALIDATION_COLUMNS)


def result_columns(records: Sequence[RunRecord]) -> tuple[str, ...]:
    """RESULT_COLUMNS, with the validation columns first when any run has them."""
    return (VALIDATION_COLUMNS if has_validation(records) else ()) + RESULT_COLUMNS


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------
def _write_csv(path: str, rows: Sequence[Sequence[str]]) -> None:
    buf = StringIO()
    csv.writer(buf).writerows(rows)
    io.write_text(path, buf.getvalue())


def write_csv(path: str, records: Sequence[RunRecord]) -> None:
    """One row per point; `concurrent_workers` / `vectorized_points` say how its throughput
    was measured (more than 1: while other points trained on the same machine)."""
    keys, columns = swept_keys(records), result_columns(records)
    rows = [["point", "status", *keys, *columns, *RUN_COLUMNS, "error"]]
    for r in records:
        rows.append([r.name, r.status, *[_cell(r.overrides.get(k)) for k in keys],
                     *[_cell(r.value(c)) for c in columns],
                     _cell(r.concurrent_workers), _cell(r.vectorized_points), r.error])
    _write_csv(path, rows)


def write_stages_csv(path: str, records: Sequence[RunRecord]) -> bool:
    """One row per (point, stage); False (and no file) when no run has stages."""
    if not any(r.stages for r in records):
        return False
    keys = swept_keys(records)
    columns = (VALIDATION_COLUMNS if has_validation(records) else ()) + STAGE_COLUMNS
    rows = [["point", "stage", *keys, *columns]]
    for r in records:
        for s in r.stages:
            rows.append([r.name, s.get("name", ""), *[_cell(r.overrides.get(k)) for k in keys],
                         *[_cell(_stage_value(s, c)) for c in columns]])
    _write_csv(path, rows)
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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Finished points grouped over seeds: overrides, n, seeds, (mean, std) per summary and
    validation column, and how their throughput was measured: `workers` (the most worker
    processes that shared the machine) and `vectorized` (the most points per vectorized
    program; None if none)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.status == points.DONE:
            groups.setdefault(r.group(), []).append(r)
    out = []
    for key, runs in groups.items():
        row: dict[str, Any] = {"overrides": dict(key), "n": len(runs),
                               "seeds": [r.overrides.get("seed") for r in runs]}
        for c in VALIDATION_COLUMNS + SUMMARY_COLUMNS:
            vals = [v for v in (r.value(c) for r in runs) if _number(v)]
            row[c] = mean_std(vals) if vals else None
        row["workers"] = max(r.concurrent_workers or 1 for r in runs)
        row["vectorized"] = max((r.vectorized_points or 0 for r in runs), default=0) or None
        out.append(row)
    return out


_FORMATS = {"test_accuracy": "{:.4f}", "test_loss": "{:.4f}", "validation_accuracy": "{:.4f}",
            "validation_loss": "{:.4f}", "sparsity": "{:.3f}", "bits": "{:.0f}",
            "packed_bytes": "{:.0f}", "train_images_per_sec": "{:.0f}"}


def _fmt(c: str, ms: tuple[float, float | None] | None) -> str:
    if ms is None:
        return "—"
    f = _FORMATS.get(c, "{:.4g}")
    mean, std = ms
    return f.format(mean) + (f" ± {f.format(std)}" if std else "")  # no "± 0" for constants


def _marks(row: dict[str, Any]) -> str:
    """† / ‡ after a throughput measured while other points trained on the same machine."""
    return ((WORKERS_MARK if row["workers"] > 1 else "")
            + (VECTORIZED_MARK if (row["vectorized"] or 0) > 1 else ""))


def _up_to(values: Sequence[int]) -> str:
    return str(max(values)) if len(set(values)) == 1 else f"up to {max(values)}"


def best_point(summary: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary row with the highest mean validation accuracy (None when no row has
    validation metrics). Test accuracy never selects: it is reported beside the choice."""
    candidates = [row for row in summary if row.get("validation_accuracy") is not None]
    return max(candidates, key=lambda row: row["validation_accuracy"][0], default=None)


def _group_label(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={points.name_value(v)}" for k, v in overrides.items()) or "all points"


def results_table(records: Sequence[RunRecord]) -> list[str]:
    """The grouped table (mean ± std over seeds), its † / ‡ footnotes and the best-point
    line: the core of results.md, which `jaxaccel sweep` also prints when it ends."""
    summary = summarize(records)
    keys = [k for k in swept_keys(records) if k not in SEED_KEYS]
    columns = (VALIDATION_COLUMNS if has_validation(records) else ()) + SUMMARY_COLUMNS
    lines = ["| " + " | ".join([*keys, "n", *columns]) + " |",
             "|" + "---|" * (len(keys) + 1 + len(columns))]
    for row in summary:
        cells = [_cell(row["overrides"].get(k)) or "—" for k in keys] + [str(row["n"])]
        for c in columns:
            text = _fmt(c, row[c])
            cells.append(text + _marks(row) if c == "train_images_per_sec" and row[c] else text)
        lines.append("| " + " | ".join(cells) + " |")
    measured = [row for row in summary if row["train_images_per_sec"]]
    shared = [row["workers"] for row in measured if row["workers"] > 1]
    vectorized = [row["vectorized"] for row in measured if (row["vectorized"] or 0) > 1]
    notes = []
    if shared:
        notes.append(f"{WORKERS_MARK} train_images_per_sec measured while {_up_to(shared)} "
                     f"worker processes (`--workers`) shared this machine: lower than a point "
                     f"running alone would measure.")
    if vectorized:
        notes.append(f"{VECTORIZED_MARK} train_images_per_sec is the per-point share of one "
                     f"vectorized program (`--vectorize`) training {_up_to(vectorized)} points "
                     f"at once: the program's images/s divided by its points.")
    if notes:
        lines += [""] + notes
    if summary:
        lines += ["", best_point_line(summary)]
    return lines


def best_point_line(summary: Sequence[dict[str, Any]]) -> str:
    """One line naming the best group by mean validation accuracy, its validation and test
    accuracy side by side; or why none is selected (never on test accuracy)."""
    best = best_point(summary)
    if best is None:
        return ("No best point is selected: the runs have no validation split "
                "(`dataset.validation_split=0`), and test accuracy is only reported, never "
                "used to select.")
    among = sum(row.get("validation_accuracy") is not None for row in summary)
    scope = f" among the {among} of {len(summary)} rows with validation metrics" if (
        among < len(summary)) else ""
    return (f"**Best point** (highest mean validation accuracy{scope}; test accuracy is "
            f"reported beside it, never selects): `{_group_label(best['overrides'])}` — "
            f"validation accuracy {_fmt('validation_accuracy', best['validation_accuracy'])}, "
            f"test accuracy {_fmt('test_accuracy', best['test_accuracy'])} (n={best['n']}).")


def write_markdown(path: str, records: Sequence[RunRecord], title: str,
                   plots: Sequence[str]) -> None:
    """results.md: grouped table (mean ± std over seeds), best point, failures, plots."""
    summary = summarize(records)
    counts = {s: sum(r.status == s for r in records)
              for s in (points.DONE, points.FAILED, points.PENDING)}
    repeats = max((row["n"] for row in summary), default=0)
    lines = [f"# Sweep results: {title}", "",
             f"{len(records)} points: {counts[points.DONE]} done, {counts[points.FAILED]} "
             f"failed, {counts[points.PENDING]} pending."]
    if repeats > 1:
        lines.append("Values are mean ± sample std over the seeds of each row (n).")
    lines += [""] + results_table(records)
    failed = [r for r in records if r.status == points.FAILED]
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- `{r.name}`: {r.error}" for r in failed]
    pending = [r for r in records if r.status == points.PENDING]
    if pending:
        lines += ["", "## Not finished", ""] + [f"- `{r.name}`" for r in pending]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    io.write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------
def accuracy_panels(records: Sequence[RunRecord]) -> list[tuple[str, str]]:
    """(metric, panel title) of every accuracy plot: validation (which selects) beside test
    (which is only reported) when the runs have validation metrics, else test alone."""
    if has_validation(records):
        return [("validation_accuracy", "validation accuracy (selects)"),
                ("test_accuracy", "test accuracy (reported only)")]
    return [("test_accuracy", "test accuracy")]


def tradeoff_points(records: Sequence[RunRecord], x: str,
                    metric: str = "test_accuracy") -> dict[str, list[tuple]]:
    """Series label -> [(x mean, `metric` mean, `metric` std)] sorted by x.

    A run contributes, for each distinct value of `x` among its stages, the metric of the
    last stage at that value (train → prune → finetune gives dense and finetuned points; IMP
    gives one per round); a run without stages contributes its final result. Seeds of a
    point are averaged; a series is the point's overrides minus seed and the `x`-like keys.
    """
    acc: dict[tuple[str, float], list[float]] = {}
    for r in records:
        if r.status != points.DONE:
            continue
        label = _label({k: v for k, v in r.overrides.items()
                        if k not in SEED_KEYS and x not in k.split(".")[-1]})
        pairs: dict[float, float] = {}
        for s in r.stages:
            if _number(s.get(metric)):
                pairs[float(s.get(x) if s.get(x) is not None else DENSE[x])] = s[metric]
        if not pairs and _number(r.results.get(metric)):
            xv = r.final(x)
            pairs[float(xv if xv is not None else DENSE[x])] = r.results[metric]
        for xv, a in pairs.items():
            acc.setdefault((label, xv), []).append(float(a))
    series: dict[str, list[tuple]] = {}
    for (label, xv), vals in acc.items():
        m, s = mean_std(vals)
        series.setdefault(label, []).append((xv, m, s or 0.0))
    return {k: sorted(v) for k, v in series.items()}


def varies(records: Sequence[RunRecord], x: str) -> bool:
    """Whether the finished results (stage rows included) hold more than one value of `x`
    ("sparsity" or "bits"): only then is accuracy against it worth a plot."""
    values = {p[0] for pts in tradeoff_points(records, x).values() for p in pts}
    return len(values) > 1


def plotted_keys(records: Sequence[RunRecord]) -> list[str]:
    """Swept keys (seeds excluded) that take more than one value among finished points."""
    done = [r for r in records if r.status == points.DONE]
    keys = []
    for k in swept_keys(done):
        values = {_hashable(r.overrides[k]) for r in done if k in r.overrides}
        if k not in SEED_KEYS and len(values) > 1:
            keys.append(k)
    return keys


def key_plot_name(key: str) -> str:
    """`accuracy_vs_<key>.png`, filesystem-safe; never a sparsity/bits plot's name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)
    name = f"{KEY_PLOT_PREFIX}{safe}.png"
    if name in {n for n, _ in TRADEOFF_PLOTS.values()}:
        name = f"{KEY_PLOT_PREFIX}key_{safe}.png"
    return name


def key_values(records: Sequence[RunRecord], key: str) -> list[Any]:
    """The distinct values of a swept key among finished points: sorted when all are
    numbers, else in first-seen (sweep) order."""
    seen: dict[Any, Any] = {}
    for r in records:
        if r.status == points.DONE and key in r.overrides:
            seen.setdefault(_hashable(r.overrides[key]), r.overrides[key])
    values = list(seen.values())
    return sorted(values) if values and all(_number(v) for v in values) else values


def key_points(records: Sequence[RunRecord], key: str,
               metric: str = "test_accuracy") -> dict[str, list[tuple[Any, float, float]]]:
    """Series label -> [(value of `key`, `metric` mean, sample std (0 for one run))].

    From the finished points that set `key` and report `metric`, seeds of a point averaged;
    a series is the point's values of the other swept keys that vary (`plotted_keys`).
    Values in `key_values` order.
    """
    order = {_hashable(v): i for i, v in enumerate(key_values(records, key))}
    others = [k for k in plotted_keys(records) if k != key]
    acc: dict[tuple[str, Any], list[float]] = {}
    raw: dict[Any, Any] = {}
    for r in records:
        v = r.value(metric)
        if r.status != points.DONE or key not in r.overrides or not _number(v):
            continue
        label = _label({k: x for k, x in r.overrides.items() if k in others})
        hv = _hashable(r.overrides[key])
        raw.setdefault(hv, r.overrides[key])
        acc.setdefault((label, hv), []).append(float(v))
    series: dict[str, list[tuple[Any, float, float]]] = {}
    for (label, hv), vals in acc.items():
        m, s = mean_std(vals)
        series.setdefault(label, []).append((raw[hv], m, s or 0.0))
    return {k: sorted(pts, key=lambda p: order[_hashable(p[0])]) for k, pts in series.items()}


def _label(overrides: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={points.name_value(v)}"
                     for k, v in sorted(overrides.items())) or "all"


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _panel_axes(fig, n: int) -> list:
    axes = [fig.add_subplot(1, n, 1)]
    axes += [fig.add_subplot(1, n, i + 1, sharey=axes[0]) for i in range(1, n)]
    return axes


def _finish(fig, axes: list, titles: Sequence[str], title: str, xlabel: str,
            legend: bool, empty: bool) -> None:
    for ax, t in zip(axes, titles):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.set_title(t if len(axes) > 1 else f"{title} ({t})", fontsize=10)
        if empty:
            ax.text(0.5, 0.5, "no finished points", ha="center", va="center",
                    transform=ax.transAxes)
    axes[0].set_ylabel("accuracy")
    if len(axes) > 1:
        fig.suptitle(title)
    if legend:
        axes[-1].legend(fontsize=7)


def plot_tradeoff(path: str, records: Sequence[RunRecord], x: str, xlabel: str) -> None:
    """Accuracy against measured sparsity or bit-width (stage rows included)."""
    panels = accuracy_panels(records)
    fig = _figure(6.0 * len(panels), 4.0)
    axes = _panel_axes(fig, len(panels))
    colors: dict[str, str] = {}
    labels: set[str] = set()
    for ax, (metric, _) in zip(axes, panels):
        series = tradeoff_points(records, x, metric)
        for label, pts in list(series.items())[:12]:
            xs, ms, ss = zip(*pts)
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=color,
                        label=label if ax is axes[-1] else None)
            labels.add(label)
        if x == "bits":
            ax.set_xscale("log", base=2)
            ticks = sorted({p[0] for pts in series.values() for p in pts})
            if ticks:
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    _finish(fig, axes, [t for _, t in panels], f"accuracy vs {xlabel}", xlabel,
            legend=bool(labels) and labels != {"all"}, empty=not labels)
    fig.savefig(path)


def plot_key(path: str, records: Sequence[RunRecord], key: str) -> None:
    """Accuracy against one swept key: seeds aggregated (mean, error bar = sample std), the
    other swept keys as series. Numbers on a numeric axis (log when positive and spanning
    more than a decade), anything else (strings, bools, tuples) as categories."""
    from matplotlib.ticker import NullFormatter
    panels = accuracy_panels(records)
    values = key_values(records, key)
    numeric = bool(values) and all(_number(v) for v in values)
    position = {_hashable(v): i for i, v in enumerate(values)}
    fig = _figure(6.0 * len(panels), 4.0)
    axes = _panel_axes(fig, len(panels))
    colors: dict[str, str] = {}
    labels: set[str] = set()
    for ax, (metric, _) in zip(axes, panels):
        series = list(key_points(records, key, metric).items())[:12]
        for j, (label, pts) in enumerate(series):
            vs, ms, ss = zip(*pts)
            if numeric:
                xs = [float(v) for v in vs]
            else:  # side by side within a category, so error bars do not hide each other
                shift = 0.08 * (j - (len(series) - 1) / 2)
                xs = [position[_hashable(v)] + shift for v in vs]
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=color,
                        linestyle="-" if numeric else "none",
                        label=label if ax is axes[-1] else None)
            labels.add(label)
        if numeric:
            if min(values) > 0 and max(values) > 10 * min(values):
                ax.set_xscale("log")
            if len(values) <= 10:
                ax.set_xticks([float(v) for v in values], [f"{v:g}" for v in values])
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xticks(range(len(values)), [points.name_value(v) for v in values])
            ax.set_xlim(-0.5, len(values) - 0.5)
    _finish(fig, axes, [t for _, t in panels], f"accuracy vs {key}", key,
            legend=bool(labels) and labels != {"all"}, empty=not labels)
    fig.savefig(path)


def training_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """Per metric name (train loss/accuracy, validation and test accuracy/loss): [(step,
    value)] of one run. Steps that restart (a later stage counting from 0) are shifted to
    continue the curve.
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
            if _number(row.get(k)) and split in ("train", "validation", "test"):
                out.setdefault(f"{split}_{k}", []).append((x, float(row[k])))
    return out


def plot_training_curves(path: str, records: Sequence[RunRecord]) -> None:
    """Train loss, and train / validation / test accuracy over steps, one colour per group."""
    fig = _figure(10.0, 4.0)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    groups: dict[tuple, int] = {}
    colors = [f"C{i}" for i in range(10)]
    validation = False
    for r in records:
        curves = training_curves(r.workdir)
        if not curves:
            continue
        first = r.group() not in groups
        g = groups.setdefault(r.group(), len(groups))
        color = colors[g % len(colors)]
        label = _label(dict(r.group())) if first else None  # one legend entry per group
        validation = validation or "validation_accuracy" in curves
        for name, ax, style in (("train_loss", ax_loss, "-"), ("train_accuracy", ax_acc, "-"),
                                ("validation_accuracy", ax_acc, ":+"),
                                ("test_accuracy", ax_acc, "--x")):
            pts = curves.get(name)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, alpha=0.8, linewidth=1, label=label)
                label = None  # on the run's first curve only
    ax_loss.set_title("train loss")
    ax_acc.set_title("accuracy (train —, validation +, test ×)" if validation
                     else "accuracy (train —, test ×)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if not groups:
        ax_loss.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax_loss.transAxes)
    elif len(groups) <= 12:
        fig.legend(fontsize=7, loc="outside right upper")
    fig.savefig(path)


def plot_plan(records: Sequence[RunRecord]) -> dict[str, Callable[[str], None]]:
    """File name -> how to draw it, for every plot that applies: accuracy vs each swept key
    that varies, vs sparsity / bits only when they vary, and the training curves."""
    plan: dict[str, Callable[[str], None]] = {}
    for key in plotted_keys(records):
        plan[key_plot_name(key)] = lambda path, key=key: plot_key(path, records, key)
    for x, (name, xlabel) in TRADEOFF_PLOTS.items():
        if varies(records, x):
            plan[name] = lambda path, x=x, xlabel=xlabel: plot_tradeoff(path, records, x, xlabel)
    plan[TRAINING_CURVES] = lambda path: plot_training_curves(path, records)
    return plan


def write_plots(workdir: str, plan: dict[str, Callable[[str], None]],
                owned: Callable[[str], bool], *, plots: bool, paths: dict[str, str]) -> list[str]:
    """Delete the plots (`owned(name)`: a .png this report writes) a previous report wrote
    that `plan` no longer has (e.g. the sparsity plot once no finished point is sparse), so no
    plot shows what does not vary; then, with `plots`, draw `plan`'s into `workdir`. Returns
    the names written; `paths[stem]` gets each one's path."""
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name)
        if name.endswith(".png") and owned(name) and name not in plan and os.path.isfile(path):
            os.remove(path)
    written = []
    if plots:
        for name, draw in plan.items():
            draw(os.path.join(workdir, name))
            written.append(name)
            paths[name[:-4]] = os.path.join(workdir, name)
    return written


# ----------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------
def build(workdir: str, *, plots: bool = True) -> dict[str, str]:
    """Write results.csv, results.md (and stages.csv, plots) for the sweep in `workdir`.

    Returns what it wrote: "csv", "md", "stages_csv", and each plot under its file name
    without `.png`. Accuracy plots that no longer apply are removed (also with plots=False).
    """
    records = collect(workdir)
    paths = {"csv": os.path.join(workdir, "results.csv"),
             "md": os.path.join(workdir, "results.md")}
    write_csv(paths["csv"], records)
    stages_path = os.path.join(workdir, "stages.csv")
    if write_stages_csv(stages_path, records):
        paths["stages_csv"] = stages_path
    written = write_plots(workdir, plot_plan(records),
                          lambda name: name.startswith(KEY_PLOT_PREFIX), plots=plots,
                          paths=paths)
    write_markdown(paths["md"], records, os.path.basename(os.path.abspath(workdir)), written)
    return paths
