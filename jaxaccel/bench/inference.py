"""`jaxaccel bench infer`: eval-mode forward time of compressed models against float32.

Variants, all jitted forward passes on one device-resident batch, timed interleaved:
  * float32: `model.apply(variables, x, train=False)` (the dense reference);
  * fake-quant: `compress.quant.apply_fake_quant` with activation scales calibrated on a
    batch (the PTQ reference: simulated int8 in float arithmetic);
  * int8: `compress.int8.int8_apply` on `convert_int8` of the same scales (integer
    convs/matmuls, every layer by default: `int8_skip="none"`; lowered by "auto", on an AVX2
    CPU `kernels.int8`), goal ≥ 1.4× faster than float32 for cnn3 at batch 256 on CPU;
  * pruned-and-shrunk: channel masks at each sparsity (`prune.magnitude_masks(...,
    granularity="channel", filter_fn=shrink.shrinkable_filter(model))`), then
    `shrink.shrink` to a physically smaller model; goal at 50%: ≥ 1.8× faster.
Weights are the model's random initialisation: speed does not depend on their values.

Alongside, the int8 arithmetic of this machine (`int8_matmul_ceiling`): each int8 layer's
MACs as one plain (M x K) @ (K x N) matmul (M = output positions, K = kernel size, N = output
channels), run in float32, as XLA's int8 x int8 -> int32 dot and (where it runs) as
`kernels.int8.matmul_acc`, timed interleaved. `bound_speedup` is an Amdahl estimate for the whole
model: the float model's share of those MACs taken at the plain float32 matmuls' time,
everything else unchanged. On the AVX2 dev machine without VNNI, XLA's int8 dot is only
~1.2-1.5x its float32 matmul (a bound of ~1.2x for cnn3), the kernel ~2x.

Owns `bench_infer` and `int8_matmul_ceiling`. Imports models, compress (prune, quant, shrink),
`kernels.int8` and bench's timing and workload; never the CLI.
"""
from __future__ import annotations

import collections
import importlib
from typing import Any, Sequence

from jaxaccel.bench import timing, workload

GOAL_INT8 = 1.4
GOAL_PRUNED_50 = 1.8
DEFAULT_SPARSITIES = (0.25, 0.5, 0.75)


def _int8_module() -> tuple[Any, str]:
    try:
        return importlib.import_module("jaxaccel.compress.int8"), "ok"
    except ImportError as e:
        return None, f"jaxaccel.compress.int8 is not available ({e})"


def resolve_skip(skip: str | Sequence[str], order: Sequence[str]) -> tuple[str, ...]:
    """'first' -> the first conv/dense layer run; 'none' -> (); else the listed layer paths."""
    if isinstance(skip, str):
        if skip == "first":
            return tuple(order[:1])
        if skip in ("none", ""):
            return ()
        skip = [s for s in skip.split(",") if s]
    unknown = [s for s in skip if s not in order]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} to keep float; layers: {', '.join(order)}")
    return tuple(skip)


def bench_infer(model: str = "cnn3", batch_size: int = 256,
                input_shape: Sequence[int] = workload.DEFAULT_INPUT_SHAPE, *,
                sparsities: Sequence[float] = DEFAULT_SPARSITIES, int8_skip: str | Sequence[str] = "none",
                conv_impl: str = "auto", warmup: int = 3, repeats: int = 20,
                seed: int = 0, cluster_bits: int = 5,
                compare_onnxruntime: bool = False) -> dict[str, Any]:
    """Median forward time of float32, fake-quant, int8, pruned+shrunk and clustered models;
    speed-ups. The clustered model (every kernel shared among 2^`cluster_bits` values,
    packaged with Huffman coding) is timed as it runs after `load_compressed` decodes it —
    dense float32 — and the decode itself is timed at load. With `compare_onnxruntime`, the
    same model exported to ONNX (`compress.onnx_export`, float and int8 QDQ from the same
    calibration) runs in ONNX Runtime sessions (threads = cores), timed interleaved with the
    rest; `vs_onnxruntime` holds jaxaccel's speed relative to them (> 1: jaxaccel faster)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxaccel import models
    from jaxaccel.compress import prune, quant, shrink

    timing.check_counts(warmup, repeats)
    input_shape = workload.parse_input_shape(input_shape)
    workload.check_model(model)
    sparsities = workload.parse_fractions(sparsities, "sparsities")
    from jaxaccel import autotune

    workload.check_conv_impl(conv_impl)
    choice = autotune.choose(workload.bench_config(model, batch_size, input_shape,
                                                   conv_impl=conv_impl),
                             mode="infer", batch=batch_size, image_shape=input_shape)
    net = models.get_model(model, workload.NUM_CLASSES, conv_impl=choice.impl)
    variables = models.init_variables(net, jax.random.PRNGKey(seed), input_shape)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch_size, *input_shape), jnp.float32)
    calib = x[: min(batch_size, 64)]
    order = prune.execution_order(net, variables, calib, train=False)
    skip = resolve_skip(int8_skip, order)
    notes: list[str] = [f"conv_impl {conv_impl!r} -> {choice.impl!r}: {choice.reason}"]

    def forward(m: Any) -> Any:
        return jax.jit(lambda v, x: m.apply(v, x, train=False))

    fns: dict[str, tuple[Any, tuple]] = {"float32": (forward(net), (variables, x))}
    # The quantized variants run the model as `conv_impl` itself resolves (under cnn3's
    # "cpu_kernel" the int8 path fuses each conv with its pool): the float32 choice above was
    # timed for float32 alone. Same parameters either way.
    qnet = models.get_model(model, workload.NUM_CLASSES, conv_impl=conv_impl)
    act_qparams = quant.calibrate(qnet, variables, [calib], skip=skip)
    fake = jax.jit(lambda v, q, x: quant.apply_fake_quant(qnet, v, x, q, skip=skip))
    fns["fake-quant"] = (fake, (variables, act_qparams, x))
    int8_lib, int8_status = _int8_module()
    int8_lowering = None
    if int8_lib is not None:
        int8_model = int8_lib.convert_int8(variables, act_qparams, skip=skip)
        lowering_choice = autotune.choose_int8_lowering(
            qnet, int8_model, x, model_key={"model": model, "input_shape": list(input_shape),
                                            "conv_impl": workload.resolved_conv_impl(conv_impl,
                                                                                     model)})
        int8_lowering = lowering_choice.impl
        notes.append(f"int8 conv lowering 'auto' -> {int8_lowering!r}: {lowering_choice.reason}")
        fns["int8"] = (jax.jit(lambda m, x: int8_lib.int8_apply(
            qnet, m, x, conv_lowering=int8_lowering)), (int8_model, x))
        shapes = [mkn for path, mkn in shrink.layer_matmul_shapes(net, variables, x) if path in int8_model.layers]
    else:
        notes.append(f"int8 skipped: {int8_status}")
        shapes = []

    ort_checks: dict[str, dict] = {}
    if compare_onnxruntime:
        ort_fns, ort_checks = _onnxruntime_variants(
            net, variables, act_qparams, input_shape, batch_size, seed=seed, skip=skip,
            int8_model=int8_model if int8_lib is not None else None,
            int8_lowering=int8_lowering, notes=notes)
        fns.update(ort_fns)
    dense_macs = shrink.flops(net, input_shape)
    macs: dict[str, int] = {name: dense_macs for name in fns}  # int8 does the same MACs in int8
    filter_fn = shrink.shrinkable_filter(net)
    for s in sparsities:
        masks = prune.magnitude_masks(variables["params"], s, granularity="channel", filter_fn=filter_fn)
        small, small_vars = shrink.shrink(net, variables, masks)
        name = f"pruned {round(100 * s)}%"
        fns[name] = (forward(small), (small_vars, x))
        macs[name] = shrink.flops(small, input_shape)

    clustered = _clustered(net, variables, input_shape, cluster_bits)
    fns[clustered["variant"]] = (forward(net), (clustered.pop("variables"), x))
    macs[clustered["variant"]] = dense_macs
    notes.append(f"clustered: every kernel shared among {2 ** cluster_bits} values, packaged with "
                 f"Huffman coding ({clustered['package_file_bytes']:,} bytes vs "
                 f"{clustered['dense_float32_bytes']:,} float32); decoding it at load takes "
                 f"{clustered['decode_ms_median']:.1f} ms; it then runs as dense float32 (no "
                 f"kernel computes on shared values, so the gain is size, not speed)")

    outputs = {name: np.asarray(fn(*args)) for name, (fn, args) in fns.items()}  # compiles
    works = {name: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args))) for name, (fn, args) in fns.items()}
    timings = timing.time_interleaved(works, warmup=warmup, repeats=repeats)

    base = timings["float32"].median_ms
    top1 = {k: v.argmax(-1) for k, v in outputs.items()}
    results = []
    for name, t in timings.items():
        row = {"variant": name, **t.as_dict("forward"),
               "images_per_sec": batch_size / (t.median_ms / 1000.0),
               "speedup_vs_float32": timing.ratio(base, t.median_ms),
               "macs": macs.get(name), "mac_fraction": timing.ratio(macs.get(name), dense_macs)}
        if name in ("fake-quant", "int8"):
            row["top1_agreement_vs_float32"] = float(np.mean(top1[name] == top1["float32"]))
        row.update(ort_checks.get(name, {}))
        if name == "int8":
            row["top1_agreement_vs_fake_quant"] = float(np.mean(top1["int8"] == top1["fake-quant"]))
            row["max_abs_diff_vs_fake_quant"] = float(np.max(np.abs(outputs["int8"] - outputs["fake-quant"])))
        results.append(row)
    by_name = {r["variant"]: r for r in results}
    out: dict[str, Any] = {
        "bench": "infer", "model": model, "batch_size": batch_size, "input_shape": list(input_shape),
        "conv_impl": conv_impl, "conv_impl_choice": choice.record(), "int8_float_layers": list(skip), "int8_conv_lowering": int8_lowering,
        "sparsities": list(sparsities),
        "warmup": warmup, "repeats": repeats, "results": results,
        "float32_ms_median": base,
        "fake_quant_speedup": by_name["fake-quant"]["speedup_vs_float32"],
        "int8_speedup": by_name.get("int8", {}).get("speedup_vs_float32"),
        "int8_status": int8_status,
    }
    for s in sparsities:
        out[f"pruned_{round(100 * s)}_speedup"] = by_name[f"pruned {round(100 * s)}%"]["speedup_vs_float32"]
    if out["int8_speedup"] is not None:
        out["int8_goal_met"] = out["int8_speedup"] >= GOAL_INT8
    if shapes:
        c = out["int8_ceiling"] = int8_matmul_ceiling(shapes, base, warmup=warmup, repeats=repeats)
        kernel = ""
        if c.get("kernel_speedup") is not None:
            kernel = (f"; jaxaccel's int8 kernel (`kernels.int8`, the `cpu_kernel` lowering, built for "
                      f"{c['kernel_isa']}) "
                      f"runs them in {c['kernel_ms_median']:.2f} ms ({c['kernel_speedup']:.2f}×; Amdahl bound "
                      f"{c['kernel_bound_speedup']:.2f}×)")
        notes.append(f"int8 ceiling on this machine: the int8 layers' {c['macs'] / 1e9:.2f} G MACs as plain "
                     f"matmuls take {c['float32_ms_median']:.2f} ms in float32 and {c['int8_ms_median']:.2f} ms as "
                     f"XLA's int8 dot ({c['speedup']:.2f}×, interleaved){kernel}. Amdahl bound: if those MACs cost "
                     f"the float32 model what the plain matmuls cost and the rest stays float32, XLA's int8 dot "
                     f"gains at most {c['bound_speedup']:.2f}× for the whole model (goal {GOAL_INT8}×)")
    if compare_onnxruntime:
        ort = {"float32": "onnxruntime float32", "int8": "onnxruntime int8"}
        out["vs_onnxruntime"] = {
            kind: timing.ratio(timings[name].median_ms, timings[kind].median_ms)
            for kind, name in ort.items() if name in timings and kind in timings}
        out["onnxruntime_version"] = ort_checks.get("_version")
    out["clustered"] = clustered
    if "pruned_50_speedup" in out:
        out["pruned_50_goal_met"] = out["pruned_50_speedup"] >= GOAL_PRUNED_50
    out["notes"] = notes
    out["table"] = _table(out)
    return out


def _onnxruntime_variants(net: Any, variables: Any, act_qparams: Any, input_shape: Sequence[int],
                          batch_size: int, *, seed: int, skip: Sequence[str], int8_model: Any,
                          int8_lowering: str | None, notes: list[str]
                          ) -> tuple[dict[str, tuple], dict[str, dict]]:
    """ONNX Runtime sessions (float32; int8 QDQ from the same calibration) of `net` on raw
    uint8 images: the timed calls, and per variant its top-1 agreement with jaxaccel's own
    float32 / int8 on the same images (ONNX Runtime's version under "_version")."""
    import os
    import tempfile

    import jax
    import numpy as np

    from jaxaccel import data
    from jaxaccel.compress import int8 as int8_lib
    from jaxaccel.compress import onnx_export

    try:
        onnx_export.require_onnx()
        import onnxruntime as ort
    except (ImportError, ValueError) as e:
        notes.append(f"ONNX Runtime comparison skipped: {e}")
        return {}, {}
    channels = int(input_shape[-1])
    spec = data.DatasetSpec(name="synthetic", num_classes=workload.NUM_CLASSES,
                            image_shape=tuple(int(v) for v in input_shape),
                            mean=(0.5,) * channels, std=(0.25,) * channels, kind="builtin")
    raw = np.random.default_rng(seed + 2).integers(0, 256, (batch_size, *input_shape), np.uint8)
    x = data.normalize(jax.numpy.asarray(raw), spec)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    fns: dict[str, tuple] = {}
    checks: dict[str, dict] = {"_version": ort.__version__}
    references = {"float32": np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(
        variables, x))}
    if int8_model is not None and not skip:
        references["int8"] = np.asarray(jax.jit(lambda m, x: int8_lib.int8_apply(
            net, m, x, conv_lowering=int8_lowering))(int8_model, x))
    elif int8_model is not None:
        notes.append("ONNX Runtime int8 skipped: --int8-skip keeps layers float, which the "
                     "QDQ export does not do")
    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-onnx-") as tmp:
        for kind in references:
            path = os.path.join(tmp, f"{kind}.onnx")
            if kind == "float32":
                onnx_export.export_float(net, variables, spec, path)
            else:
                onnx_export.export_int8(net, variables, act_qparams, spec, path)
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            name = f"onnxruntime {kind}"
            fns[name] = (lambda s=session: s.run(None, {"images": raw})[0], ())
            got = fns[name][0]()
            checks[name] = {f"top1_agreement_vs_jaxaccel_{kind}": float(np.mean(
                got.argmax(-1) == references[kind].argmax(-1)))}
    notes.append(f"ONNX Runtime {ort.__version__} (CPU provider, {options.intra_op_num_threads} "
                 f"threads) runs the same model exported by `compress export --format onnx` on "
                 f"raw uint8 images (normalisation inside); jaxaccel's rows take normalised "
                 f"float images")
    return fns, checks


def _clustered(net: Any, variables: Any, input_shape: Sequence[int], bits: int) -> dict[str, Any]:
    """`variables` with every kernel weight-shared (2^bits k-means values), written as a
    Huffman-coded package and decoded again (timed); the decoded variables for timing."""
    import os
    import tempfile

    import jax
    import numpy as np

    from jaxaccel import data
    from jaxaccel.compress import package, sharing

    params = variables["params"]
    masks = jax.tree.map(lambda p: np.ones(np.shape(p), bool), params)
    shared, _, _ = sharing.share_weights(params, masks, sharing.layer_bits(params, bits))
    variables = {**variables, "params": shared}
    c = int(input_shape[-1])
    spec = data.DatasetSpec(name="synthetic", num_classes=workload.NUM_CLASSES,
                            image_shape=tuple(input_shape), mean=(0.5,) * c, std=(0.25,) * c,
                            kind="builtin")
    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-cluster-") as tmp:
        path = os.path.join(tmp, "clustered.npz")
        info = package.save_compressed(path, net, variables, spec=spec, shared=True,
                                       entropy="huffman")
        decode = timing.time_calls(lambda: package.load_compressed(path), warmup=1, repeats=5)
        decoded = package.load_compressed(path).variables
    return {"variant": f"clustered {bits}-bit (decoded)", "bits": bits,
            "package_file_bytes": info["package_file_bytes"],
            "dense_float32_bytes": info["dense_float32_bytes"],
            "decode_ms_median": decode.median_ms, "variables": decoded}


def int8_matmul_ceiling(shapes: Sequence[tuple[int, int, int]], float_model_ms: float, *,
                        warmup: int = 3, repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """float32 vs int8 time of the int8 layers' MACs as plain matmuls (see the module note).

    `float_model_ms` is the float32 model's median time from the same run; the Amdahl bound
    assumes everything but these matmuls costs what it costs in float32.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    # One operand set per distinct shape (ResNets repeat a few shapes many times), each
    # matmul run as often as its layer is called.
    counts = collections.Counter(tuple(int(v) for v in s) for s in shapes)
    rng = np.random.default_rng(seed)
    f32 = {s: (jnp.asarray(rng.standard_normal(s[:2], np.float32)), jnp.asarray(rng.standard_normal(s[1:], np.float32)))
           for s in counts}
    i8 = {s: (jnp.asarray(rng.integers(-127, 128, s[:2]).astype(np.int8)),
              jnp.asarray(rng.integers(-127, 128, s[1:]).astype(np.int8))) for s in counts}
    f32_dot = jax.jit(lambda a, b: a @ b)
    i8_dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))

    def run(dot: Any, operands: dict) -> None:
        jax.block_until_ready([dot(*operands[s]) for s, n in counts.items() for _ in range(n)])

    works = {"float32": lambda: run(f32_dot, f32), "int8": lambda: run(i8_dot, i8)}
    from jaxaccel.kernels import int8 as int8_cpu
    if int8_cpu.available():
        kernel_dot = jax.jit(int8_cpu.matmul_acc)
        works["kernel"] = lambda: run(kernel_dot, i8)
    for work in works.values():
        work()  # compile
    t = timing.time_interleaved(works, warmup=warmup, repeats=repeats)
    f_ms, i_ms = t["float32"].median_ms, t["int8"].median_ms
    share = min(1.0, f_ms / float_model_ms)  # of the float model's time spent in these MACs

    def amdahl(speedup: float) -> float:  # between 1 and `speedup`; clamp float rounding
        bound = 1.0 / (1.0 - share + share / speedup)
        return min(max(bound, min(1.0, speedup)), max(1.0, speedup))

    speedup = timing.ratio(f_ms, i_ms)
    out = {"shapes_mkn": [list(s) for s in shapes], "macs": int(sum(m * k * n for m, k, n in shapes)),
           "float32_ms_median": f_ms, "int8_ms_median": i_ms, "speedup": speedup, "bound_speedup": amdahl(speedup),
           "kernel_ms_median": None, "kernel_speedup": None, "kernel_bound_speedup": None}
    if "kernel" in t:
        out["kernel_isa"] = int8_cpu.KERNEL.isa()
        k_speedup = timing.ratio(f_ms, t["kernel"].median_ms)
        out.update(kernel_ms_median=t["kernel"].median_ms, kernel_speedup=k_speedup,
                   kernel_bound_speedup=amdahl(k_speedup))
    return out


def _table(r: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for x in r["results"]:
        check = ""
        if "top1_agreement_vs_float32" in x:
            check = f"top-1 = float32 on {100 * x['top1_agreement_vs_float32']:.0f}%"
        if "top1_agreement_vs_fake_quant" in x:
            check += f"; = fake-quant on {100 * x['top1_agreement_vs_fake_quant']:.0f}%"
        for kind in ("float32", "int8"):
            if f"top1_agreement_vs_jaxaccel_{kind}" in x:
                check = (f"top-1 = jaxaccel {kind} on "
                         f"{100 * x[f'top1_agreement_vs_jaxaccel_{kind}']:.1f}%")
        rows.append([x["variant"], f"{x['forward_ms_median']:.2f} (± {x['forward_ms_iqr']:.2f})",
                     f"{x['images_per_sec']:.0f}", f"{x['speedup_vs_float32']:.2f}×",
                     f"{x['mac_fraction']:.2f}" if x["mac_fraction"] is not None else "–", check])
    shape = "×".join(str(v) for v in r["input_shape"])
    floats = ", ".join(r["int8_float_layers"]) or "none"
    lowering = f"; int8 convs: {r['int8_conv_lowering']}" if r.get("int8_conv_lowering") else ""
    return {"title": f"infer ({r['model']}, batch {r['batch_size']}, {shape}; float layers in int8/fake-quant: "
                     f"{floats}{lowering})",
            "columns": ["variant", "ms / batch (median ± IQR)", "img/s", "speed-up vs float32",
                        "MACs vs dense", "check"],
            "rows": rows}
