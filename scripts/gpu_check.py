"""The measuring half of scripts/gpu_check.sh (which runs each subcommand under `timeout`).

Subcommands (each prints one `FIGURE: ...` line, the step's key figure for the table; exit 0
ok, 77 skipped (what it needs is absent), anything else failed):
  figure demo|train|infer PATH   the key figure of a demo workdir / `bench train|infer --json`
  train-bf16 --json PATH         jaxaccel's cnn3 train step in float32 vs bfloat16 (the
                                 model's compute dtype; params stay float32), interleaved
  train-torch-cuda --json PATH   jaxaccel's cnn3 train step vs the same PyTorch step
                                 (`bench.torch_cnn3.make_step`, built with torch's default
                                 device set to CUDA) in float32 and under bfloat16 autocast
  onnx-session MODEL --json PATH an ONNX Runtime session asking for CUDA then CPU: which
                                 provider ran, its forward time, max |diff| vs `predict`
  table ROWS.tsv --json PATH     the markdown table of the steps (stdout) and strict JSON

Only `table` and `figure` run without jax; the timing ones use jaxaccel's own StepBench and
`timing.time_interleaved` (warm-up, repeats, medians), as `jaxaccel bench` does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

SKIPPED = 77


def figure(text: str) -> None:
    print(f"FIGURE: {' '.join(str(text).split())}", flush=True)


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, allow_nan=False, default=str)
        f.write("\n")


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


# --- figures of the CLI steps ------------------------------------------------------------

def figure_of(kind: str, path: str) -> str:
    if kind == "demo":
        r = _read(os.path.join(path, "results.json"))
        return (f"test accuracy {_fmt(r.get('test_accuracy'), '.4f')} after {r.get('steps')} steps "
                f"({r.get('model')} on {r.get('dataset')}), {_fmt(r.get('train_images_per_sec'), '.0f')} img/s, "
                f"compile {_fmt(r.get('compile_seconds'), '.1f')} s")
    r = _read(path)
    if kind == "train":
        text = (f"{r['step_ms_median']:.2f} ms/step, {r['train_images_per_sec']:.0f} img/s, "
                f"MFU {_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} % "
                f"(conv_impl {r.get('conv_impl')}→{r.get('conv_impl_resolved')})")
        if r.get("jax_vs_torch_speed") is not None:
            text += (f"; {r['jax_vs_torch_speed']:.2f}× PyTorch {r.get('torch_version')} "
                     f"({r['torch_step_ms_median']:.2f} ms) — torch ran on the CPU: "
                     f"bench.torch_cnn3 builds its step there (the CUDA comparison is its own row)")
        else:
            text += f"; PyTorch: {r.get('torch_status')}"
        return text
    if kind == "infer":
        rows = {row["variant"]: row for row in r["results"]}
        f32, i8 = rows.get("float32"), rows.get("int8")
        text = f"float32 {f32['forward_ms_median']:.2f} ms" if f32 else "float32 –"
        if i8:
            text += (f", int8 {i8['forward_ms_median']:.2f} ms ({_fmt(i8.get('speedup_vs_float32'))}× float32, "
                     f"int8 lowering {r.get('int8_conv_lowering')}, top-1 = fake-quant on "
                     f"{_fmt(100 * i8['top1_agreement_vs_fake_quant'], '.1f')} %)")
        else:
            text += f", int8: {r.get('int8_status')}"
        return f"{text}; batch {r['batch_size']}"
    raise ValueError(f"unknown figure kind {kind!r}")


# --- timed steps -------------------------------------------------------------------------

def _step_bench(batch_size: int, input_shape, dtype: str):
    from jaxaccel import parallel
    from jaxaccel.bench import training, workload

    config = workload.bench_config("cnn3", batch_size, input_shape, dtype=dtype)
    setup = workload.bench_setup(config, input_shape)
    batch = workload.synthetic_batch(batch_size, input_shape)
    return training.StepBench(setup, parallel.make_mesh(1), "data", batch)


def _machine() -> dict:
    import jax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": str(d), "device_kind": d.device_kind,
            "jax": jax.__version__}


def train_bf16(args) -> int:
    from jaxaccel.bench import timing

    shape = (32, 32, 3)
    benches = {dtype: _step_bench(args.batch_size, shape, dtype) for dtype in ("float32", "bfloat16")}
    first = {dtype: b.first_step() for dtype, b in benches.items()}
    t = timing.time_interleaved({k: b.step for k, b in benches.items()},
                                warmup=args.warmup, repeats=args.repeats)
    f32, bf16 = t["float32"].median_ms, t["bfloat16"].median_ms
    out = {"batch_size": args.batch_size, "input_shape": list(shape), **_machine(),
           **t["float32"].as_dict("float32_step"), **t["bfloat16"].as_dict("bfloat16_step"),
           "first_step_s": first, "bfloat16_speedup": timing.ratio(f32, bf16),
           "final_loss": {k: b.loss() for k, b in benches.items()}}
    _write(args.json, out)
    figure(f"cnn3 batch {args.batch_size}: bfloat16 {bf16:.2f} ms/step vs float32 {f32:.2f} ms "
           f"(bfloat16 at {out['bfloat16_speedup']:.2f}× float32's speed; interleaved, {out['backend']} "
           f"{out['device_kind']})")
    return 0


def train_torch_cuda(args) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    from jaxaccel.bench import timing, torch_cnn3

    if not torch_cnn3.torch_available():
        figure("not available: torch is not installed (pip install -e '.[bench]')")
        return SKIPPED
    import torch

    if not torch.cuda.is_available():
        figure(f"not available: torch {torch.__version__} sees no CUDA device "
               f"(torch.version.cuda = {torch.version.cuda})")
        return SKIPPED
    shape = (32, 32, 3)
    jax_step = _step_bench(args.batch_size, shape, "float32")
    jax_first = jax_step.first_step()
    # The project's own PyTorch step, every tensor of it created on the GPU: make_step builds
    # its model, optimizer and batch with factory calls, which follow `with torch.device`.
    # Its step ends with float(loss), which waits for the GPU.
    with torch.device("cuda"):
        torch_step = torch_cnn3.make_step(args.batch_size, shape)

    def torch_bf16() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch_step()

    works = {"jax": jax_step.step, "torch": torch_step, "torch_bf16_autocast": torch_bf16}
    for w in works.values():
        w()
    t = timing.time_interleaved(works, warmup=args.warmup, repeats=args.repeats)
    j, p, pb = (t[k].median_ms for k in ("jax", "torch", "torch_bf16_autocast"))
    out = {"batch_size": args.batch_size, "input_shape": list(shape), **_machine(),
           "torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
           "torch_device": torch.cuda.get_device_name(0), "jax_first_step_s": jax_first,
           **t["jax"].as_dict("jax_step"), **t["torch"].as_dict("torch_step"),
           **t["torch_bf16_autocast"].as_dict("torch_bf16_autocast_step"),
           "jax_vs_torch_speed": timing.ratio(p, j), "jax_vs_torch_bf16_speed": timing.ratio(pb, j)}
    _write(args.json, out)
    figure(f"cnn3 batch {args.batch_size}: jaxaccel {j:.2f} ms/step = {out['jax_vs_torch_speed']:.2f}× "
           f"PyTorch {torch.__version__} CUDA eager ({p:.2f} ms; bf16 autocast {pb:.2f} ms) on "
           f"{out['torch_device']}; >1 = jaxaccel faster")
    return 0


def onnx_session(args) -> int:
    import numpy as np

    try:
        import onnxruntime as ort
    except ImportError:
        figure("not available: onnxruntime is not installed (pip install -e '.[onnx]')")
        return SKIPPED
    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    available = ort.get_available_providers()
    session = ort.InferenceSession(args.model, providers=asked)
    ran = session.get_providers()[0]  # the providers the session holds, in priority order
    inp = session.get_inputs()[0]
    hwc = [int(v) for v in inp.shape[1:]]
    x = np.random.default_rng(0).integers(0, 256, (args.batch_size, *hwc), dtype=np.uint8)
    feed = {inp.name: x}
    for _ in range(args.warmup):
        session.run(None, feed)
    samples = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        logits = session.run(None, feed)[0]
        samples.append(1000 * (time.perf_counter() - t0))
    median = float(np.median(samples))
    out = {"model": args.model, "batch_size": args.batch_size, "ort_version": ort.__version__,
           "providers_asked": asked, "providers_available": available, "provider_ran": ran,
           "forward_ms_median": median, "forward_ms_min": float(min(samples)), "repeats": args.repeats}
    diff = ""
    if args.workdir:
        import jaxaccel

        ref = np.asarray(jaxaccel.load(args.workdir).predict(x))
        out["max_abs_diff_vs_predict"] = float(np.max(np.abs(ref - logits)))
        out["top1_agreement_vs_predict"] = float(np.mean(ref.argmax(-1) == logits.argmax(-1)))
        diff = (f", max |diff| vs predict {out['max_abs_diff_vs_predict']:.1e}, top-1 equal "
                f"{100 * out['top1_agreement_vs_predict']:.1f} %")
    _write(args.json, out)
    note = "" if ran == "CUDAExecutionProvider" else (
        " (CUDAExecutionProvider not available: " + ("installed but did not load" if
        "CUDAExecutionProvider" in available else "needs onnxruntime-gpu") + ")")
    figure(f"ONNX Runtime {ort.__version__}, provider that ran: {ran}{note}; float forward "
           f"{median:.2f} ms at batch {args.batch_size}{diff}")
    return 0


# --- the table ---------------------------------------------------------------------------

COLUMNS = ("step", "status", "seconds", "key figure")


def read_rows(path: str) -> list[dict]:
    """Rows of the TSV the shell script appends: step, status, seconds, figure, command, log."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                parts += [""] * (6 - len(parts))
            step, status, seconds, fig, command, log = parts[:6]
            try:
                secs = float(seconds)
            except ValueError:
                secs = None
            rows.append({"step": step, "status": status,
                         "seconds": secs if secs is None or math.isfinite(secs) else None,
                         "figure": fig, "command": command, "log": log or None})
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    title = (f"GPU: {header.get('gpu') or 'none found (nvidia-smi)'}; jax devices: "
             f"{header.get('jax_devices') or '–'}; total {_fmt(header.get('elapsed_s'), '.0f')} s "
             f"of a {_fmt(header.get('budget_s'), '.0f')} s budget")
    lines = [title, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(cell(v) for v in (
            r["step"], r["status"], _fmt(r["seconds"], ".0f"), r["figure"] or "–")) + " |")
    return "\n".join(lines)


def table(args) -> int:
    rows = read_rows(args.rows)
    header = {"gpu": args.gpu or None, "jax_devices": args.jax_devices or None,
              "budget_s": args.budget_s, "elapsed_s": args.elapsed_s}
    print(markdown(rows, header))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    _write(args.json, {**header, "counts": counts, "steps": rows})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("figure")
    f.add_argument("kind", choices=("demo", "train", "infer"))
    f.add_argument("path")
    for name in ("train-bf16", "train-torch-cuda"):
        s = sub.add_parser(name)
        s.add_argument("--batch-size", type=int, default=128)
        s.add_argument("--warmup", type=int, default=5)
        s.add_argument("--repeats", type=int, default=30)
        s.add_argument("--json", required=True)
    o = sub.add_parser("onnx-session")
    o.add_argument("model")
    o.add_argument("--workdir", default=None, help="compare with jaxaccel.load(WORKDIR).predict")
    o.add_argument("--batch-size", type=int, default=256)
    o.add_argument("--warmup", type=int, default=5)
    o.add_argument("--repeats", type=int, default=30)
    o.add_argument("--json", required=True)
    t = sub.add_parser("table")
    t.add_argument("rows")
    t.add_argument("--json", required=True)
    t.add_argument("--gpu", default="")
    t.add_argument("--jax-devices", default="")
    t.add_argument("--budget-s", type=float, default=None)
    t.add_argument("--elapsed-s", type=float, default=None)
    args = p.parse_args(argv)
    if args.cmd == "figure":
        try:
            figure(figure_of(args.kind, args.path))
        except (OSError, KeyError, ValueError, TypeError) as e:
            figure(f"no figure: {type(e).__name__}: {e}")
            return 1
        return 0
    return {"train-bf16": train_bf16, "train-torch-cuda": train_torch_cuda,
            "onnx-session": onnx_session, "table": table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
