"""`jaxaccel compress report|package|export`: per-layer compression table, compressed
checkpoint, StableHLO export.

    jaxaccel compress report WORKDIR [--json PATH] [--bits N] [--step S] [--input-shape H,W,C]
    jaxaccel compress report PACKAGE.npz [--json PATH]
    jaxaccel compress package WORKDIR --out FILE [--bits 8] [--per-tensor] [--float16] [--json PATH]
    jaxaccel compress export WORKDIR --out FILE [--int8 | --fake-quant] [--step S]

Packages and exports take raw images (uint8 NHWC, as the dataset gives them), the dataset's
normalisation inside, exactly like ``jaxaccel.load(WORKDIR).predict``.
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from jaxaccel import io

if TYPE_CHECKING:  # the commands import lazily so `jaxaccel --help` stays fast
    import ml_collections

    from jaxaccel import data
    from jaxaccel.compress import quant

SUBCOMMANDS = ("report", "package", "export")
CALIBRATION_FILE = "calibration.json"  # written by the pipeline's quantize stage


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="compress_command", required=True,
                           metavar="{report,package,export}")
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
    k.add_argument("--json", dest="json_path", default=None, help="also write the sizes here")
    e = sub.add_parser("export", help="write the run's inference function as serialized "
                                      "StableHLO (jax.export, symbolic batch): float, "
                                      "fake-quant or int8; raw uint8 images in",
                       description="Export a run's final weights as a StableHLO inference "
                                   "function of raw uint8 NHWC images (normalisation inside, "
                                   "batch size free) that plain jax loads and runs: "
                                   "jax.export.deserialize(bytearray(open(PATH, 'rb').read()))"
                                   ".call(x). "
                                   "--int8 and --fake-quant use the activation calibration the "
                                   "run's quantize stage wrote (WORKDIR/calibration.json).")
    e.add_argument("workdir", metavar="WORKDIR",
                   help="a run's workdir (--int8/--fake-quant: with the calibration.json its "
                        "quantize stage wrote)")
    e.add_argument("--out", required=True, help="artifact file to write (its directory must exist)")
    e.add_argument("--int8", action="store_true", help="real int8 inference (int8 kernels)")
    e.add_argument("--fake-quant", action="store_true",
                   help="the fake-quant simulation of the run's PTQ (any bit width)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")


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
    if args.compress_command == "export":
        return _export(args)
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
    info = package.save_compressed(args.out, run.model, run.variables, spec=_run_spec(run.config),
                                   bits=args.bits,
                                   per_channel=not args.per_tensor,
                                   float_dtype="float16" if args.float16 else "float32",
                                   extra=extra)
    ckpt_bytes = package.directory_bytes(run.checkpoint_dir) \
        if os.path.isdir(run.checkpoint_dir) else None
    info.update(checkpoint_dir=run.checkpoint_dir, checkpoint_bytes=ckpt_bytes,
                checkpoint_ratio=ckpt_bytes / info["package_file_bytes"] if ckpt_bytes else None,
                step=run.step, stage=run.stage, notes=run.notes)
    print(f"wrote {info['path']}: {info['package_file_bytes']:,} bytes on disk "
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


def _run_spec(config: "ml_collections.ConfigDict") -> "data.DatasetSpec":
    """The `DatasetSpec` (image shape, normalisation) of a run's config, as training used it."""
    from jaxaccel import data

    return data.spec_for(config.dataset)


def _check_out_file(out: str) -> None:
    """`--out` must name a file in an existing directory (nothing is created but the file)."""
    if os.path.isdir(out):
        raise ValueError(f"--out={out!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--out={out!r}: directory {parent!r} does not exist")


def _calibration(workdir: str, kind: str) -> tuple[dict, "quant.QuantConfig", dict]:
    """`(act_qparams, weight_config, meta)` of the run's quantize stage, or one clear error."""
    from jaxaccel.compress import quant

    path = os.path.join(workdir, CALIBRATION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--{kind} needs the run's activation calibration, but {path!r} does not exist; "
            f"add a quantize stage to the run's stages, e.g. "
            f"stage(\"quantize\", \"quantize\", quant={{\"mode\": \"ptq\"}}), and run it "
            f"(it calibrates and writes {CALIBRATION_FILE})")
    return quant.load_calibration(path)


def _check_int8(act_qparams: dict, weight_config: "quant.QuantConfig", path: str) -> None:
    """Real int8 kernels need 8-bit symmetric weights and 8-bit per-tensor activations."""
    if weight_config.bits != 8 or not weight_config.symmetric:
        raise ValueError(f"--int8 needs 8-bit symmetric weights; {path!r} has "
                         f"{weight_config.bits}-bit {'symmetric' if weight_config.symmetric else 'affine'}"
                         f" weights: use --fake-quant")
    for key, qp in act_qparams.items():
        if qp.qmax - qp.qmin != 255 or qp.axis is not None:
            raise ValueError(f"--int8 needs 8-bit per-tensor activations; layer {key!r} in "
                             f"{path!r} has codes {qp.qmin}..{qp.qmax}, axis {qp.axis}: use "
                             f"--fake-quant")


def _export(args: argparse.Namespace) -> int:
    from jaxaccel.compress import export, fold, int8, report

    if args.int8 and args.fake_quant:
        raise ValueError("choose one of --int8 and --fake-quant (neither: float)")
    _check_out_file(args.out)
    kind = "int8" if args.int8 else "fake-quant" if args.fake_quant else "float"
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"{args.workdir!r} is not a directory (a run's workdir)")
    calibration = None if kind == "float" else _calibration(args.workdir, kind)
    if kind == "int8":
        _check_int8(*calibration[:2], os.path.join(args.workdir, CALIBRATION_FILE))
    run = report.run_weights(args.workdir, args.step)
    spec = _run_spec(run.config)
    if kind == "float":
        exported = export.export_float(run.model, run.variables, spec, args.out)
    else:
        act_qparams, weight_config, meta = calibration
        calibrated_step = meta.get("step")
        if calibrated_step is not None and calibrated_step != run.step:
            raise ValueError(f"{CALIBRATION_FILE} was calibrated on the weights of step "
                             f"{calibrated_step}, not those of step {run.step}; export step "
                             f"{calibrated_step} (--step) or calibrate again")
        # The quantize stage calibrates the BN-folded model: fold the same way first.
        model, variables = fold.fold_bn(run.model, run.variables,
                                        input_shape=(1,) + tuple(spec.image_shape))
        if kind == "int8":
            int8_model = int8.convert_int8(variables, act_qparams, weight_config=weight_config)
            exported = export.export_int8(model, int8_model, spec, args.out)
        else:
            exported = export.export_fake_quant(model, variables, act_qparams, spec, args.out,
                                                weight_config=weight_config)
    nbytes = os.path.getsize(args.out)
    h, w, c = spec.image_shape
    print(f"wrote {args.out}: {kind} inference of {args.workdir} (step {run.step}, stage "
          f"{run.stage}) as StableHLO, {nbytes:,} bytes; input uint8 (b, {h}, {w}, {c}) NHWC raw "
          f"pixels (normalisation inside), output float32 (b, {exported.out_avals[0].shape[-1]}) "
          f"logits, any batch size b")
    return 0
