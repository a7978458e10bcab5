"""`jaxaccel compress report|package`: per-layer compression table, compressed checkpoint.

    jaxaccel compress report WORKDIR [--json PATH] [--bits N] [--step S] [--input-shape H,W,C]
    jaxaccel compress report PACKAGE.npz [--json PATH]
    jaxaccel compress package WORKDIR --out FILE [--bits 8] [--per-tensor] [--float16] [--json PATH]
"""
from __future__ import annotations

import argparse
import os

from jaxaccel import io

SUBCOMMANDS = ("report", "package")


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="compress_command", required=True, metavar="{report,package}")
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
    k.add_argument("workdir", metavar="WORKDIR")
    k.add_argument("--out", required=True, help="package file to write (.npz)")
    k.add_argument("--bits", type=int, default=8, help="weight bits, 2..8 (default 8)")
    k.add_argument("--per-tensor", action="store_true", help="one scale per kernel")
    k.add_argument("--float16", action="store_true",
                   help="store scales, biases and BN as float16 (default float32)")
    k.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    k.add_argument("--json", dest="json_path", default=None, help="also write the sizes here")


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


def run_compress(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"compress takes no --config overrides, got --config.{overrides[0]}")
    if args.compress_command == "report":
        return _report(args)
    return _package(args)


def _report(args: argparse.Namespace) -> int:
    from jaxaccel.compress import report

    shape = _input_shape(args.input_shape)
    if os.path.isfile(args.source):
        if args.bits is not None or args.step is not None:
            raise ValueError("--bits and --step apply to workdirs; a package has its own bits")
        rep = report.package_report(args.source, input_shape=shape)
    elif os.path.isdir(args.source):
        rep = report.workdir_report(args.source, bits=args.bits, step=args.step,
                                    input_shape=shape)
    else:
        raise FileNotFoundError(f"{args.source!r} is neither a workdir nor a package file")
    print(report.to_markdown(rep), end="")
    if args.json_path:
        io.write_json(args.json_path, rep)
    return 0


def _package(args: argparse.Namespace) -> int:
    from jaxaccel.compress import package, report

    if os.path.isdir(args.out):
        raise ValueError(f"--out={args.out!r} is a directory; give a file name")
    package.weight_config(args.bits)  # bad bits fail before loading anything
    run = report.run_weights(args.workdir, args.step)
    extra = {"dataset": run.config.dataset.name, "image_shape": list(run.input_shape),
             "source_workdir": os.path.abspath(args.workdir), "step": run.step,
             "stage": run.stage}
    info = package.save_compressed(args.out, run.model, run.variables, bits=args.bits,
                                   per_channel=not args.per_tensor,
                                   float_dtype="float16" if args.float16 else "float32",
                                   extra=extra)
    ckpt_bytes = package.directory_bytes(run.checkpoint_dir) \
        if os.path.isdir(run.checkpoint_dir) else None
    info.update(checkpoint_dir=run.checkpoint_dir, checkpoint_bytes=ckpt_bytes,
                checkpoint_ratio=ckpt_bytes / info["file_bytes"] if ckpt_bytes else None,
                step=run.step, stage=run.stage, notes=run.notes)
    print(f"wrote {info['path']}: {info['file_bytes']:,} bytes on disk "
          f"({info['bits']}-bit codes of {info['kernel_nonzeros']:,} nonzero kernel weights, "
          f"{100 * info['sparsity']:.1f}% sparse; step {run.step}, stage {run.stage})")
    print(f"  vs float32 dense parameters: {info['dense_float32_bytes']:,} bytes "
          f"-> {info['ratio']:.1f}x smaller")
    if ckpt_bytes:
        print(f"  vs float32 orbax checkpoint {run.checkpoint_dir}: {ckpt_bytes:,} bytes "
              f"-> {info['checkpoint_ratio']:.1f}x smaller (it also holds optimizer state)")
    if args.json_path:
        io.write_json(args.json_path, info)
    return 0
