"""What a finished run turns into: its per-layer compression report, its compressed package
and its StableHLO or ONNX export (`jaxaccel compress report|package|export`).

`compression_report`, `package_run` and `export_run` each read the weights a run ended with
(`loading.final_weights`), apply the compress functions, write one file and return a JSON-able
summary. Exports and packages take raw uint8 NHWC images, the dataset's normalisation inside,
exactly like `jaxaccel.load(W).predict`; `--int8` / `--fake-quant` use the activation
calibration the run's quantize stage wrote (`calibration.json`). `sensitivity_run` measures
each layer's sensitivity to pruning and quantization on the validation split and allocates
per-layer sparsities and bits for a size or MAC target (`jaxaccel compress sensitivity`).

Imports loading, data, io, compress and `models.ensemble`; never the pipeline, the loop, sweeps or
the CLI.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax

from jaxaccel import data, io, loading
from jaxaccel import stages as stages_lib
from jaxaccel.compress import (export, fold, int8, layer_table, onnx_export, package, quant,
                               sensitivity)
from jaxaccel.models.ensemble import Ensemble
from jaxaccel.workdir import CALIBRATION_FILE

EXPORT_KINDS = ("float", "fake-quant", "int8")
EXPORT_FORMATS = ("stablehlo", "onnx")
SENSITIVITY_DIR = "sensitivity"  # default --out of `compress sensitivity`, in the workdir
SENSITIVITY_SPLITS = ("validation", "test")


def compression_report(source: str, *, bits: int | None = None, step: int | None = None,
                       input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The per-layer table of a run's final weights (a workdir) or of a package file."""
    if os.path.isfile(source):
        if bits is not None or step is not None:
            raise ValueError("--bits and --step apply to workdirs; a package has its own bits")
        return layer_table.package_report(source, input_shape=input_shape)
    if os.path.isdir(source):
        return layer_table.weights_report(loading.final_weights(source, step), bits=bits,
                                          input_shape=input_shape)
    raise FileNotFoundError(f"{source!r} is neither a workdir nor a package file")


def package_run(workdir: str, out: str, *, bits: int = 8, per_channel: bool = True,
                float16: bool = False, step: int | None = None,
                entropy: str = "none") -> dict[str, Any]:
    """Write a run's final weights as a compressed package; its sizes and where they came
    from (see `compress.package.save_compressed`). A run with a `cluster` stage stores its
    shared kernels as codebook + indices; `entropy` "huffman" entropy-codes codes and
    positions. `deep_compression_bytes` holds Deep Compression's Table 1 columns for these
    weights: float32 dense, after pruning (float32 nonzeros + positions), after quantization /
    sharing (this package's codes, no entropy coding) and after Huffman coding (before zlib)."""
    check_out_file(out)
    package.weight_config(bits)  # bad bits fail before loading anything
    if entropy not in package.ENTROPY:
        raise ValueError(f"--entropy {entropy!r} is not valid; choose one of: "
                         f"{', '.join(package.ENTROPY)}")
    members = loading.read_config(workdir).ensemble.members
    if members > 1:
        raise ValueError(f"{workdir!r} is an ensemble run ({members} members); a package holds "
                         f"one model: package a member's run, or export the ensemble "
                         f"(jaxaccel compress export)")
    run = loading.final_weights(workdir, step)
    shared = any(s.kind == "cluster" for s in stages_lib.expand(run.config))
    extra = {"dataset": run.config.dataset.name, "image_shape": list(run.input_shape),
             "source_workdir": os.path.abspath(workdir), "step": run.step, "stage": run.stage}
    float_dtype = "float16" if float16 else "float32"
    info = package.save_compressed(out, run.model, run.variables, spec=run.spec, bits=bits,
                                   per_channel=per_channel, float_dtype=float_dtype,
                                   shared=shared, entropy=entropy, extra=extra)

    def payload(entropy_: str) -> int:  # the written package's own payload, or the other's
        if entropy_ == entropy:
            return info["packed_bytes"]
        arrays, _ = package.encode(run.variables, bits=bits, per_channel=per_channel,
                                   float_dtype=float_dtype, shared=shared, entropy=entropy_)
        return int(sum(a.nbytes for a in arrays.values()))

    info["deep_compression_bytes"] = {
        "dense_float32": info["dense_float32_bytes"],
        "pruned": package.packed_bytes(run.variables, bits=32),
        "quantized": payload("none"), "coded": payload("huffman")}
    ckpt_bytes = (package.directory_bytes(run.checkpoint_dir)
                  if os.path.isdir(run.checkpoint_dir) else None)
    info.update(checkpoint_dir=run.checkpoint_dir, checkpoint_bytes=ckpt_bytes,
                checkpoint_ratio=ckpt_bytes / info["package_file_bytes"] if ckpt_bytes else None,
                step=run.step, stage=run.stage, notes=run.notes, shared=shared)
    return info


def check_out_file(out: str) -> None:
    """`out` must name a file in an existing directory (nothing is created but the file)."""
    if os.path.isdir(out):
        raise ValueError(f"--out={out!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--out={out!r}: directory {parent!r} does not exist")


def read_calibration(workdir: str, kind: str) -> tuple[dict, quant.QuantConfig, dict]:
    """`(act_qparams, weight_config, meta)` of the run's quantize stage, or one clear error
    saying how to get one; `kind` "int8" also needs 8-bit symmetric weights and 8-bit
    per-tensor activations."""
    path = os.path.join(workdir, CALIBRATION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--{kind} needs the run's activation calibration, but {path!r} does not exist; "
            f"add a quantize stage to the run's stages, e.g. "
            f"stage(\"quantize\", \"quantize\", quant={{\"mode\": \"ptq\"}}), and run it "
            f"(it calibrates and writes {CALIBRATION_FILE})")
    act_qparams, weight_config, meta = quant.load_calibration(path)
    if kind == "int8":
        if weight_config.bits != 8 or not weight_config.symmetric:
            what = "symmetric" if weight_config.symmetric else "affine"
            raise ValueError(f"--int8 needs 8-bit symmetric weights; {path!r} has "
                             f"{weight_config.bits}-bit {what} weights: use --fake-quant")
        for key, qp in act_qparams.items():
            if qp.qmax - qp.qmin != 255 or qp.axis is not None:
                raise ValueError(f"--int8 needs 8-bit per-tensor activations; layer {key!r} in "
                                 f"{path!r} has codes {qp.qmin}..{qp.qmax}, axis {qp.axis}: "
                                 f"use --fake-quant")
    return act_qparams, weight_config, meta


def export_run(workdir: str, out: str, *, kind: str = "float", step: int | None = None,
               format: str = "stablehlo", onnx_weights: str | None = None) -> dict[str, Any]:
    """Export a run's final weights as an inference function of raw uint8 NHWC images (batch
    size free; `kind` float, fake-quant or int8): serialized StableHLO (`format` "stablehlo",
    `compress.export`) or an ONNX graph ("onnx": float or int8 QDQ, `compress.onnx_export`);
    what was written. `onnx_weights` ("uint8", the default, or "int8"): how an ONNX int8
    graph stores its kernel codes (`onnx_export.export_int8`'s `weight_dtype`; "int8" is ONNX
    Runtime's usual format, exact on VNNI CPUs). Every input is checked before the weights are
    read; the file appears whole or not at all."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind {kind!r} is not valid; choose one of: "
                         f"{', '.join(EXPORT_KINDS)}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format {format!r} is not valid; choose one of: "
                         f"{', '.join(EXPORT_FORMATS)}")
    onnx = format == "onnx"
    if onnx_weights is not None and not (onnx and kind == "int8"):
        raise ValueError(f"--onnx-weights {onnx_weights} sets an ONNX int8 graph's kernel "
                         f"storage: use it with --format onnx --int8")
    if onnx_weights is not None and onnx_weights not in onnx_export.WEIGHT_DTYPES:
        raise ValueError(f"--onnx-weights {onnx_weights!r} is not valid; choose one of: "
                         f"{', '.join(onnx_export.WEIGHT_DTYPES)}")
    if onnx and kind == "fake-quant":
        raise ValueError("--fake-quant exports StableHLO only (the simulation at any bit "
                         "width); --format onnx exports float, or int8 with --int8")
    check_out_file(out)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir!r} is not a directory (a run's workdir)")
    if onnx:
        onnx_export.require_onnx()
    calibration = None if kind == "float" else read_calibration(workdir, kind)
    run = loading.final_weights(workdir, step)
    spec = run.spec
    if onnx and calibration is not None and isinstance(run.model, Ensemble):
        raise onnx_export.OnnxExportError(onnx_export.ENSEMBLE_INT8)
    if calibration is None:
        if onnx:
            written = onnx_export.export_float(run.model, run.variables, spec, out)
        else:
            exported = export.export_float(run.model, run.variables, spec, out)
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
        if onnx:
            written = onnx_export.export_int8(model, variables, act_qparams, spec, out,
                                              weight_config=weight_config,
                                              weight_dtype=onnx_weights or "uint8")
        elif kind == "int8":
            int8_model = int8.convert_int8(variables, act_qparams, weight_config=weight_config)
            exported = export.export_int8(model, int8_model, spec, out)
        else:
            exported = export.export_fake_quant(model, variables, act_qparams, spec, out,
                                                weight_config=weight_config)
    info = {"path": out, "kind": kind, "format": format, "workdir": workdir, "step": run.step,
            "stage": run.stage, "bytes": os.path.getsize(out),
            "image_shape": list(spec.image_shape)}
    if onnx:
        info.update(num_classes=written["num_classes"], opset=written["opset"],
                    input=onnx_export.INPUT_NAME, output=onnx_export.OUTPUT_NAME)
    else:
        info["num_classes"] = int(exported.out_avals[0].shape[-1])
    return info


def sensitivity_run(workdir: str, *, sparsities: Sequence[float] = sensitivity.DEFAULT_SPARSITIES,
                    bits: Sequence[int] = sensitivity.DEFAULT_BITS, split: str | None = None,
                    target_bytes: int | None = None, target_macs: int | None = None,
                    out: str | None = None, json_path: str | None = None) -> dict[str, Any]:
    """Per-layer sensitivity of a run's final weights (`compress.sensitivity`) on ``split``
    and, with a target, the allocation; writes ``sensitivity.json`` and ``sensitivity.png``
    into ``out`` (default WORKDIR/sensitivity) and returns the record.

    ``split`` None means validation; a run without one is refused unless ``split="test"``
    is asked for explicitly (then the record says the allocation was selected on test).
    Every input is checked, and a target below what the grids can reach refused, before
    anything is evaluated or written.
    """
    sparsities, bits = sensitivity.check_grid(sparsities, bits)
    target = sensitivity.check_targets(target_bytes, target_macs)
    if split is not None and split not in SENSITIVITY_SPLITS:
        raise ValueError(f"--split {split!r} is not valid; choose one of: "
                         f"{', '.join(SENSITIVITY_SPLITS)}")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir!r} is not a directory (a run's workdir)")
    out = out or os.path.join(workdir, SENSITIVITY_DIR)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out!r} is a file; give a directory")
    if json_path:
        check_out_file(json_path)
    config = loading.read_config(workdir)
    if not config.dataset.validation_split and split != "test":
        raise ValueError(f"{workdir!r} holds out no validation split "
                         f"(dataset.validation_split=0) and the allocation must not be "
                         f"selected on test: train with --config.dataset.validation_split=0.1, "
                         f"or pass --split test to select on the test split knowingly")
    if config.ensemble.members > 1:
        raise ValueError(f"{workdir!r} is an ensemble run ({config.ensemble.members} "
                         f"members); sensitivity takes a single model")
    split = split or "validation"
    run = loading.final_weights(workdir)
    sizes = sensitivity.layer_sizes(run.model, run.variables, run.input_shape)
    sensitivity.check_reachable(sizes, sparsities, bits, target)
    splits = data.splits_for(run.config.dataset)
    source = splits.validation if split == "validation" else splits.test
    evaluate = sensitivity.make_evaluate(
        run.model, run.variables,
        data.eval_batches(source, run.spec, batch_size=run.config.eval_batch_size))
    params = run.variables["params"]
    masks = jax.tree.map(lambda p: p != 0, params)
    table = sensitivity.layer_sensitivity(evaluate, params, masks, list(sizes["layers"]),
                                          sparsities, bits)
    for row in table["layers"]:
        info = sizes["layers"][row["layer"]]
        row.update(params=info["size"], nonzeros=info["nonzeros"],
                   macs_dense=info["positions"] * info["size"])
    notes = list(run.notes)
    if split == "test":
        notes.append("measured on the TEST split (--split test): an allocation chosen here is "
                     "selected on test, so its test accuracy is no unbiased estimate")
    record = {"workdir": workdir, "model": run.config.model.name, "step": run.step,
              "stage": run.stage, "split": split, "selected_on_test": split == "test",
              **table, "fixed_bytes": sizes["fixed_bytes"], "allocation": None, "notes": notes,
              "smallest": sensitivity.smallest(sizes, sparsities, bits)}
    if target is not None:
        alloc = sensitivity.allocate(table, sizes, **{f"target_{target[0]}": target[1]})
        per_layer = io.dumps(alloc["prune_per_layer"], indent=None, sort_keys=False)
        alloc["prune_stage"] = (f'stage("prune", "prune", prune={{"method": "one_shot", '
                                f'"per_layer": {per_layer}}})')
        alloc["bits_note"] = ("per-kernel weight bits, measured with symmetric per-channel "
                              "uniform quantization (e.g. a cluster stage's per_layer bits, "
                              "which shares 2^bits values by k-means instead)")
        record["allocation"] = alloc
    record["paths"] = {"json": os.path.join(out, "sensitivity.json"),
                       "png": os.path.join(out, "sensitivity.png")}
    os.makedirs(out, exist_ok=True)
    io.write_json(record["paths"]["json"], record, sort_keys=False)
    sensitivity.plot(record["paths"]["png"], record)
    if json_path:
        io.write_json(json_path, record, sort_keys=False)
    return record
