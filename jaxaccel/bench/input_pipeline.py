"""`jaxaccel bench input`: input-pipeline throughput from the prepared TFDS data.

Times `jaxaccel.data.TrainBatches.batch(step)` (what `train_loop` calls each step) on a
prepared split, three ways: from the in-memory copy (the default `cache=True`, after its
one-off load), with augmentation (random crop + flip), and reading every batch from the
array_record files (`cache=False`). The training step of the same model, batch and image
shape is timed too, so the pipeline's throughput is reported as a multiple of training
throughput (goal: ≥ 5×, so training never waits on data).

Owns `bench_input`. Imports data and bench's timing, training and workload; never the CLI.
"""
from __future__ import annotations

from typing import Any

from jaxaccel.bench import timing, workload
from jaxaccel.bench.training import make_step_bench

GOAL_RATIO = 5.0


def bench_input(dataset: str = "mnist5k", batch_size: int = 128, *, model: str = "cnn3",
                split: str = "train", data_dir: str | None = None, conv_impl: str = "auto",
                warmup: int = 2, repeats: int = 20, crop_padding: int = 4,
                measure_train: bool = True) -> dict[str, Any]:
    """Batches/s and images/s of each pipeline mode, and their ratio to training throughput."""
    from jaxaccel import data

    timing.check_counts(warmup, repeats)
    workload.check_model(model)
    source = data.get_source(dataset, split, data_dir=data_dir)  # prepares built-ins
    spec = data.dataset_spec(dataset, data_dir=data_dir)
    if batch_size > len(source):
        raise ValueError(f"batch size {batch_size} exceeds the {len(source)} examples of "
                         f"{dataset}:{split}")

    def pipeline(cache: bool, augment: bool) -> data.TrainBatches:
        return data.TrainBatches(source, spec, global_batch_size=batch_size, seed=0,
                                 crop_padding=crop_padding if augment else 0, flip=augment,
                                 cache=cache)

    modes = {"in-memory": pipeline(True, False), "in-memory + crop/flip": pipeline(True, True),
             "from array_record": pipeline(False, False)}
    load_s = timing.time_once(lambda: modes["in-memory"].batch(0))  # reads the whole split
    modes["in-memory + crop/flip"].batch(0)
    steps = {name: iter(range(1, 1 << 30)) for name in modes}
    works = {name: (lambda name=name, p=p: p.batch(next(steps[name]))) for name, p in modes.items()}

    train_rate = None
    if measure_train:
        step = make_step_bench(model, batch_size, spec.image_shape, conv_impl=conv_impl)
        step.first_step()
        works["train step"] = step.step
    timings = timing.time_interleaved(works, warmup=warmup, repeats=repeats)
    if measure_train:
        train_rate = batch_size / (timings.pop("train step").median_ms / 1000.0)

    results = []
    for name, t in timings.items():
        rate = batch_size / (t.median_ms / 1000.0)
        results.append({"mode": name, **t.as_dict("batch"), "images_per_sec": rate,
                        "vs_train": timing.ratio(rate, train_rate)})
    default = results[0]
    out: dict[str, Any] = {
        "bench": "input", "dataset": dataset, "split": split, "examples": len(source),
        "image_shape": list(spec.image_shape), "batch_size": batch_size, "model": model,
        "load_s": load_s, "input_images_per_sec": default["images_per_sec"],
        "train_images_per_sec": train_rate, "input_vs_train": default["vs_train"],
        "results": results, "warmup": warmup, "repeats": repeats,
    }
    if default["vs_train"] is not None:
        out["goal_met"] = default["vs_train"] >= GOAL_RATIO
    out["notes"] = [f"the in-memory modes read the whole split once first ({load_s:.2f} s)"]
    out["table"] = _table(out)
    return out


def _table(r: dict[str, Any]) -> dict[str, Any]:
    rows = [[x["mode"], f"{x['batch_ms_median']:.2f}", f"{x['images_per_sec']:.0f}",
             "–" if x["vs_train"] is None else f"{x['vs_train']:.1f}×"] for x in r["results"]]
    if r["train_images_per_sec"] is not None:
        rows.append([f"train step ({r['model']})", f"{1000 * r['batch_size'] / r['train_images_per_sec']:.2f}",
                     f"{r['train_images_per_sec']:.0f}", "1.0×"])
    shape = "×".join(str(v) for v in r["image_shape"])
    return {"title": f"input ({r['dataset']}:{r['split']}, {r['examples']} examples, {shape}, "
                     f"batch {r['batch_size']})",
            "columns": ["pipeline", "ms / batch (median)", "img/s", "× training throughput"],
            "rows": rows}
