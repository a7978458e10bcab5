"""`jaxaccel compress report|package|export`: per-layer compression table, compressed
package, StableHLO or ONNX export of a run (the work is `jaxaccel.artifacts`).

    jaxaccel compress report WORKDIR [--json PATH] [--bits N] [--step S] [--input-shape H,W,C]
    jaxaccel compress report PACKAGE.npz [--json PATH]
    jaxaccel compress package WORKDIR --out FILE [--bits 8] [--per-tensor] [--float16]
        [--entropy none|huffman] [--json PATH]
    jaxaccel compress export WORKDIR --out FILE [--int8 | --fake-quant] [--step S]
        [--format stablehlo|onnx]
    jaxaccel compress sensitivity WORKDIR [--sparsities 0.5,0.7,0.8,0.9,0.95] [--bits 8,6,4,3,2]
        [--split validation|test] [--target-bytes N | --target-macs N] [--out DIR] [--json PATH]

Imports artifacts, `compress.layer_table` and `compress.sensitivity` (to render) and io; never
another subcommand's module.
"""
from __future__ import annotations

import argparse

from jaxaccel import io


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="compress_command", required=True,
                           metavar="{report,package,export,sensitivity}")
    r = sub.add_parser("report", help="per-layer table: shape, params, nonzeros, sparsity, bits, "
                                      "bytes, MACs dense vs effective; totals",
                       description="Per-layer compression table of a run's final weights (or "
                                   "of a compressed package) as markdown; --json also as JSON.")
    r.add_argument("source", metavar="WORKDIR", help="a run's workdir, or a package file")
    r.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    r.add_argument("--bits", type=int, default=None,
                   help="weight bits to count (2..8 or 32; default: the run's)")
    r.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    r.add_argument("--input-shape", default=None, help="H,W,C for MACs (default: the dataset's)")
    k = sub.add_parser("package", help="write a compressed checkpoint (sparse int codes + "
                                       "bit-masks + scales) and print its size",
                       description="Write a run's final weights as a compressed checkpoint and "
                                   "compare its size with float32 dense and the orbax checkpoint.")
    k.add_argument("workdir", metavar="WORKDIR", help="a run's workdir")
    k.add_argument("--out", required=True, help="package file to write (.npz)")
    k.add_argument("--bits", type=int, default=8, help="weight bits, 2..8 (default 8)")
    k.add_argument("--per-tensor", action="store_true", help="one scale per kernel")
    k.add_argument("--float16", action="store_true",
                   help="store scales, biases and BN as float16 (default float32)")
    k.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    k.add_argument("--entropy", default="none",
                   help="none | huffman: Huffman-code the kernels' codes and positions "
                        "(Deep Compression; default none)")
    k.add_argument("--json", dest="json_path", default=None, help="also write the sizes here")
    e = sub.add_parser("export", help="write the run's inference function as serialized "
                                      "StableHLO (jax.export, symbolic batch) or ONNX "
                                      "(--format onnx): float, fake-quant or int8; raw uint8 "
                                      "images in",
                       description="Export a run's final weights as a StableHLO inference "
                                   "function of raw uint8 NHWC images (normalisation inside, "
                                   "batch size free) that plain jax loads and runs: "
                                   "jax.export.deserialize(bytearray(open(PATH, 'rb').read()))"
                                   ".call(x). "
                                   "--int8 and --fake-quant use the activation calibration the "
                                   "run's quantize stage wrote (WORKDIR/calibration.json). "
                                   "--format onnx writes an ONNX graph instead (float, or int8 "
                                   "QDQ with --int8) that ONNX Runtime runs: input 'images' "
                                   "uint8 NHWC, output 'logits', batch size free.")
    e.add_argument("workdir", metavar="WORKDIR",
                   help="a run's workdir (--int8/--fake-quant: with the calibration.json its "
                        "quantize stage wrote)")
    e.add_argument("--out", required=True, help="artifact file to write (its directory must exist)")
    e.add_argument("--int8", action="store_true", help="real int8 inference (int8 kernels)")
    e.add_argument("--fake-quant", action="store_true",
                   help="the fake-quant simulation of the run's PTQ (any bit width)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--format", default="stablehlo", metavar="{stablehlo,onnx}",
                   help="stablehlo (default: jax.export, loads with plain jax) or onnx (ONNX "
                        "Runtime; needs pip install 'jaxaccel[onnx]')")
    e.add_argument("--onnx-weights", default=None, metavar="{uint8,int8}",
                   help="--format onnx --int8: store kernel codes as uint8 + 128 (default: "
                        "exact in ONNX Runtime on CPUs without VNNI) or int8 (ONNX Runtime's "
                        "usual format, for VNNI CPUs)")
    s = sub.add_parser("sensitivity", help="per-layer accuracy when only that layer is pruned "
                                           "or quantized; per-layer sparsity and bits for a "
                                           "size or MAC target",
                       description="Accuracy on the validation split when only one layer is "
                                   "magnitude-pruned (on top of its mask) or its weights "
                                   "fake-quantized, for every layer; with a target, the "
                                   "per-layer sparsities and bits of least predicted (additive) "
                                   "accuracy drop. Writes sensitivity.json and sensitivity.png.")
    s.add_argument("workdir", metavar="WORKDIR", help="a finished run's workdir")
    s.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95",
                   help="comma-separated sparsities in [0, 1) (default 0.5,0.7,0.8,0.9,0.95)")
    s.add_argument("--bits", default="8,6,4,3,2",
                   help="comma-separated weight bits in 2..8 (default 8,6,4,3,2)")
    s.add_argument("--split", default=None, metavar="SPLIT",
                   help="validation (default) | test: only when asked for, and then the "
                        "allocation is selected on test")
    s.add_argument("--target-bytes", default=None, metavar="N",
                   help="allocate for at most N package bytes (codes + masks + scales + "
                        "biases/BN)")
    s.add_argument("--target-macs", default=None, metavar="N",
                   help="allocate for at most N effective MACs per image")
    s.add_argument("--out", default=None, help="directory for sensitivity.json and "
                                               "sensitivity.png (default WORKDIR/sensitivity)")
    s.add_argument("--json", dest="json_path", default=None, help="also write the record here")


def _numbers(text: str, flag: str, kind: type) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag}={text!r} must be comma-separated {what}") from None


def _target(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"{flag}={text!r} must be a positive integer") from None
    if value <= 0:
        raise ValueError(f"{flag}={text!r} must be a positive integer")
    return value


def _sensitivity(args: argparse.Namespace) -> int:
    from jaxaccel import artifacts
    from jaxaccel.compress import sensitivity

    target_bytes = _target(args.target_bytes, "--target-bytes")
    target_macs = _target(args.target_macs, "--target-macs")
    if target_bytes is not None and target_macs is not None:
        raise ValueError("choose one of --target-bytes and --target-macs")
    record = artifacts.sensitivity_run(
        args.workdir, sparsities=_numbers(args.sparsities, "--sparsities", float),
        bits=_numbers(args.bits, "--bits", int), split=args.split, target_bytes=target_bytes,
        target_macs=target_macs, out=args.out, json_path=args.json_path)
    print(sensitivity.to_markdown(record), end="")
    print(f"wrote {record['paths']['json']} and {record['paths']['png']}")
    return 0


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape={text!r} must be H,W,C (three ints)") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"--input-shape={text!r} must be H,W,C (three positive ints)")
    return shape


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxaccel import artifacts
    from jaxaccel.compress import layer_table

    if overrides:
        raise ValueError(f"compress takes no --config overrides, got --config.{overrides[0]}")
    if args.compress_command == "sensitivity":
        return _sensitivity(args)
    if args.compress_command == "report":
        rep = artifacts.compression_report(args.source, bits=args.bits, step=args.step,
                                           input_shape=_input_shape(args.input_shape))
        print(layer_table.to_markdown(rep), end="")
        if args.json_path:
            io.write_json(args.json_path, rep)
        return 0
    if args.compress_command == "package":
        info = artifacts.package_run(args.workdir, args.out, bits=args.bits,
                                     per_channel=not args.per_tensor, float16=args.float16,
                                     step=args.step, entropy=args.entropy)
        print(f"wrote {info['path']}: {info['package_file_bytes']:,} bytes on disk "
              f"({'shared-value indices' if info['shared'] else str(info['bits']) + '-bit codes'}"
              f" of {info['kernel_nonzeros']:,} nonzero kernel "
              f"weights, {100 * info['sparsity']:.1f}% sparse; step {info['step']}, stage "
              f"{info['stage']})")
        print(f"  vs float32 dense parameters: {info['dense_float32_bytes']:,} bytes "
              f"-> {info['ratio']:.1f}x smaller")
        dc = info["deep_compression_bytes"]
        print(f"  Deep Compression columns (bytes before zlib): dense float32 "
              f"{dc['dense_float32']:,} -> pruned {dc['pruned']:,} -> "
              f"{'shared' if info['shared'] else 'quantized'} {dc['quantized']:,} -> "
              f"Huffman-coded {dc['coded']:,} ({dc['dense_float32'] / dc['coded']:.1f}x)")
        if info["checkpoint_bytes"]:
            print(f"  vs float32 orbax checkpoint {info['checkpoint_dir']}: "
                  f"{info['checkpoint_bytes']:,} bytes -> {info['checkpoint_ratio']:.1f}x "
                  f"smaller (it also holds optimizer state)")
        if args.json_path:
            io.write_json(args.json_path, info)
        return 0
    if args.int8 and args.fake_quant:
        raise ValueError("choose one of --int8 and --fake-quant (neither: float)")
    kind = "int8" if args.int8 else "fake-quant" if args.fake_quant else "float"
    info = artifacts.export_run(args.workdir, args.out, kind=kind, step=args.step,
                                format=args.format, onnx_weights=args.onnx_weights)
    h, w, c = info["image_shape"]
    if info["format"] == "onnx":
        print(f"wrote {info['path']}: {kind} inference of {info['workdir']} (step "
              f"{info['step']}, stage {info['stage']}) as ONNX (opset {info['opset']}), "
              f"{info['bytes']:,} bytes; input {info['input']!r} uint8 (batch, {h}, {w}, {c}) "
              f"NHWC raw pixels (normalisation inside), output {info['output']!r} float32 "
              f"(batch, {info['num_classes']}) logits, any batch size")
        return 0
    print(f"wrote {info['path']}: {kind} inference of {info['workdir']} (step {info['step']}, "
          f"stage {info['stage']}) as StableHLO, {info['bytes']:,} bytes; input uint8 "
          f"(b, {h}, {w}, {c}) NHWC raw pixels (normalisation inside), output float32 "
          f"(b, {info['num_classes']}) logits, any batch size b")
    return 0
