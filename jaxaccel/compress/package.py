"""Compressed checkpoints: sparse low-bit kernels in one small file, rebuilt for inference.

`save_compressed` writes a single ``.npz`` (zlib-compressed, readable with plain numpy and
``allow_pickle=False``). Every conv/dense kernel (``prune.is_kernel``) is stored as

* ``mask``:  ``np.packbits`` of its nonzero pattern (omitted when the kernel is dense),
* ``codes``: the integer codes of the nonzero entries only, in C order — ``int8`` for 8 bits,
  for 2..7 bits the offset codes ``q - qmin`` packed ``bits`` per entry,
* ``scale``: symmetric per-output-channel (or per-tensor) scales,

so no float copy of the weights exists. With ``shared=True`` (a run with a `cluster` stage:
weight sharing, Deep Compression), a kernel whose kept values number at most 256 is stored as
``codebook`` (its distinct kept values, float32, sorted) and ``codes`` (each kept weight's
index into it, ``ceil(log2(len(codebook)))`` bits each), which rebuilds the shared weights
exactly. With ``entropy="huffman"`` the codes and the positions (Deep Compression's relative
index coding: the gap to the previous kept weight, `compress.huffman.relative_positions`,
``INDEX_BITS`` bits, fillers for longer gaps) are stored as checksummed canonical Huffman
streams (``values``, ``positions``) instead of fixed-width codes and a bit-mask; a damaged
stream is refused, never decoded. Codes follow ``quant.quantize`` with the same
weight config as the project's PTQ stage (symmetric, narrow range, e.g. [-127, 127]), so the
dequantized kernel ``codes * scale`` equals ``quant.quantize_weights`` of the (masked)
float kernel bit for bit. Biases, BatchNorm parameters and statistics are stored as float32
(or float16). A JSON record inside the file names the registered model and its fields and holds
the dataset's `DatasetSpec` (image shape, per-channel mean/std), so `load_compressed` rebuilds
the model without the original workdir, and its ``.predict(images)`` takes raw images (uint8
NHWC, as the dataset gives them) with the normalisation inside, as ``jaxaccel.load(W).predict``.

`kernel_bytes` is the size formula of one stored kernel; the report (``compress.layer_table``)
uses it, and the tests check it against the arrays actually written.

Imports prune, quant, models (to rebuild the model), data (`DatasetSpec`) and io; never config,
stages, state, the loop or anything above.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zipfile
from io import BytesIO
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import data, io, models
from jaxaccel.compress import huffman, prune, quant

PyTree = Any

FORMAT = "jaxaccel-compressed"
VERSION = 3  # 2: the dataset's normalisation and image shape; 3: shared kernels, entropy coding
READABLE_VERSIONS = (2, 3)
ENTROPY = ("none", "huffman")
INDEX_BITS = 5  # relative index coding of positions (Han et al. 2016 use 5 bits for fc layers)
FLOAT_DTYPES = ("float32", "float16")
_META_KEY = "meta"


# --------------------------------------------------------------------------- sizes


def kernel_bytes(size: int, nonzeros: int, channels: int, bits: int, *,
                 per_channel: bool = True, scale_bytes: int = 4) -> int:
    """Bytes of one kernel stored sparse: codes + bit-mask + scales.

    ``ceil(nonzeros * bits / 8)`` for the values, ``ceil(size / 8)`` for the mask unless the
    kernel is dense, and one scale per output channel (or one per tensor) of
    ``scale_bytes`` each. ``bits=32`` means float32 values and no scales (an unquantized
    kernel in the same sparse layout; a dense one is then plain float32).
    """
    mask = 0 if nonzeros == size else math.ceil(size / 8)
    scales = 0 if bits >= 32 else (channels if per_channel else 1) * scale_bytes
    return math.ceil(nonzeros * bits / 8) + mask + scales


def packed_bytes(variables: Mapping[str, PyTree], masks: PyTree | None = None, *,
                 bits: int = 32, per_channel: bool = True, float_bytes: int = 4) -> int:
    """Bytes of `variables` stored as a package stores them (before zlib): each conv/dense
    kernel sparse (`kernel_bytes` of its nonzeros after `masks`: codes, bit-mask, scales),
    every other variable (biases, BatchNorm) as floats of `float_bytes`.

    The one definition of a model's compressed size: results rows (`packed_bytes`), the
    compression report's total and `compress package`'s payload are this number. Counts on
    the devices holding the arrays (in a multi-process run every process must call it).
    """
    flat_masks = dict(prune.named_leaves(masks)) if masks is not None else {}
    total = 0
    for collection, tree in variables.items():
        for path, leaf in prune.named_leaves(tree):
            size = int(np.size(leaf))
            if collection == "params" and prune.is_kernel(path, leaf):
                kept = leaf if path not in flat_masks else jnp.where(flat_masks[path], leaf, 0)
                nnz = int(jnp.count_nonzero(kept))
                total += kernel_bytes(size, nnz, int(np.shape(leaf)[-1]), bits,
                                      per_channel=per_channel, scale_bytes=float_bytes)
            else:
                total += float_bytes * size
    return total


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path`` (a file: its size)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# --------------------------------------------------------------------------- code packing


def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Integer codes in ``[qmin, qmin + 2**bits)``: int8 as is for 8 bits, else the offset
    codes ``codes - qmin`` packed ``bits`` per entry (big-endian) into uint8."""
    codes = np.asarray(codes)
    if bits == 8:
        return codes.astype(np.int8)
    offset = (codes.astype(np.int16) - qmin).astype(np.uint8)
    planes = np.unpackbits(offset[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.ravel())


def unpack_codes(packed: np.ndarray, count: int, bits: int, qmin: int) -> np.ndarray:
    """Inverse of `pack_codes`: ``count`` codes as int32."""
    packed = np.asarray(packed)
    if bits == 8:
        return packed.astype(np.int32)
    planes = np.unpackbits(packed)[:count * bits].reshape(count, bits)
    full = np.zeros((count, 8), np.uint8)
    full[:, 8 - bits:] = planes
    return np.packbits(full, axis=1)[:, 0].astype(np.int32) + qmin


# --------------------------------------------------------------------------- validation


def _host_tree(tree: PyTree) -> PyTree:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _check_finite(collection: str, tree: PyTree) -> None:
    for path, leaf in prune.named_leaves(tree):
        leaf = np.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"{collection}[{path!r}] has dtype {leaf.dtype}; only float "
                             f"leaves can be stored")
        bad = ~np.isfinite(leaf)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{collection}[{path!r}] has the non-finite value "
                             f"{leaf[where]!r} at index {where}")


def _check_mask_values(masks: PyTree) -> None:
    for path, mk in prune.named_leaves(masks):
        mk = np.asarray(mk)
        if mk.dtype == np.bool_:
            continue
        bad = (mk != 0) & (mk != 1)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"masks[{path!r}] must be boolean (or 0/1), got the value "
                             f"{mk[where]!r} at index {where}")


def _check_float_dtype(float_dtype: str) -> None:
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype={float_dtype!r} is not valid; choose one of: "
                         f"{', '.join(FLOAT_DTYPES)}")


def weight_config(bits: int, per_channel: bool = True) -> quant.QuantConfig:
    """The weight quantization of packages: symmetric, narrow range, as the PTQ stage uses."""
    return quant.QuantConfig(bits=bits, symmetric=True, per_channel=per_channel,
                             narrow_range=True)


# --------------------------------------------------------------------------- model spec


def _registry_name(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        for name, registered in models.MODELS.items():
            if registered is cls:
                return name
    raise ValueError(f"cannot package model {type(model).__name__!r}: not a registered model; "
                     f"registered: {', '.join(sorted(models.MODELS))}")


def _jsonable(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(name, v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    raise ValueError(f"model field {name}={value!r} cannot be stored in a package")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """JSON description of a registered model: registry name, num_classes, dtype, fields."""
    name = _registry_name(model)
    fields = {}
    for field in type(model).__dataclass_fields__:
        if field in ("parent", "name", "num_classes", "dtype", "conv_impl"):
            continue
        fields[field] = _jsonable(field, getattr(model, field))
    dtype = jnp.dtype(model.dtype).name
    if dtype not in models.DTYPES:
        raise ValueError(f"model dtype {dtype!r} cannot be stored; valid: {', '.join(models.DTYPES)}")
    return {"name": name, "num_classes": int(model.num_classes), "dtype": dtype,
            "conv_impl": model.conv_impl, "fields": fields}


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def model_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The module `model_spec` described (via ``models.get_model``)."""
    fields = {k: _tuples(v) for k, v in spec["fields"].items()}
    return models.get_model(spec["name"], spec["num_classes"], dtype=spec["dtype"],
                            conv_impl=spec["conv_impl"], **fields)


# --------------------------------------------------------------------------- input spec


def _spec_record(spec: data.DatasetSpec) -> dict[str, Any]:
    """Every field of ``spec`` as JSON (image shape, mean/std, class names, ...)."""
    record = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    record.update(num_classes=int(spec.num_classes),
                  image_shape=[int(d) for d in spec.image_shape],
                  mean=[float(m) for m in spec.mean], std=[float(v) for v in spec.std])
    return io.to_jsonable(record)


def _spec_from_record(record: Mapping[str, Any]) -> data.DatasetSpec:
    known = {f.name for f in dataclasses.fields(data.DatasetSpec)}
    spec = data.DatasetSpec(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in record.items() if k in known})
    _check_spec_values(spec)
    return spec


def _check_spec_values(spec: data.DatasetSpec) -> None:
    shape = tuple(spec.image_shape)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer))
                              or d <= 0 for d in shape):
        raise ValueError(f"dataset spec {spec.name!r}: image_shape must be three positive ints "
                         f"(H, W, C), got {spec.image_shape!r}")
    values = np.asarray(tuple(spec.mean) + tuple(spec.std), np.float64)
    if not np.all(np.isfinite(values)) or not np.all(np.asarray(spec.std, np.float64) > 0):
        raise ValueError(f"dataset spec {spec.name!r}: mean/std must be finite and std > 0, "
                         f"got mean={spec.mean} std={spec.std}")


def check_spec(model: nn.Module, variables: Mapping[str, PyTree], spec: data.DatasetSpec) -> None:
    """ValueError unless ``model`` with ``variables`` maps images of ``spec.image_shape`` to
    ``spec.num_classes`` logits: a package must not record another dataset's normalisation.
    Traced abstractly with plain-XLA convs (``conv_impl`` never changes the parameters)."""
    if not isinstance(spec, data.DatasetSpec):
        raise ValueError(f"spec must be a jaxaccel.data.DatasetSpec (the dataset's normalisation "
                         f"and image shape), got {spec!r}")
    _check_spec_values(spec)
    if int(model.num_classes) != int(spec.num_classes):
        raise ValueError(f"the model has {model.num_classes} classes but dataset "
                         f"{spec.name!r} has {spec.num_classes}")
    plain = model.clone(conv_impl="xla") if hasattr(model, "conv_impl") else model
    x = jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in spec.image_shape), jnp.float32)
    try:
        out = jax.eval_shape(lambda v, x: plain.apply(v, x, train=False), dict(variables), x)
    except Exception as e:  # noqa: BLE001 - flax/jax raise many types for a shape mismatch
        raise ValueError(f"the model does not take images of shape {tuple(spec.image_shape)} "
                         f"(dataset {spec.name!r}): {' '.join(str(e).split())[:200]}") from None
    if tuple(out.shape) != (1, int(spec.num_classes)):
        raise ValueError(f"the model maps images of shape {tuple(spec.image_shape)} to "
                         f"{tuple(out.shape)[1:]}, not {spec.num_classes} logits")


# --------------------------------------------------------------------------- encoding


@functools.partial(jax.jit, static_argnames=("config",))
def _quantize_kernels_jit(kernels: dict[str, jax.Array], config: quant.QuantConfig):
    out = {}
    for path, k in kernels.items():
        qp = quant.tensor_qparams(k, config)
        out[path] = (quant.quantize(k, qp, jnp.int32), jnp.asarray(qp.scale, jnp.float32))
    return out


def _quantize_kernels(kernels: dict[str, np.ndarray], config: quant.QuantConfig):
    """Codes (int32) and scales of all kernels in one compiled program (cached per shapes)."""
    return jax.device_get(_quantize_kernels_jit(kernels, config)) if kernels else {}


def _flatten(variables: Mapping[str, PyTree]) -> list[tuple[str, np.ndarray]]:
    out = []
    for collection in sorted(variables):
        for path, leaf in prune.named_leaves(variables[collection]):
            out.append((f"{collection}/{path}", leaf))
    return out


def encode(variables: Mapping[str, PyTree], masks: PyTree | None = None, *, bits: int = 8,
           per_channel: bool = True, float_dtype: str = "float32", shared: bool = False,
           entropy: str = "none") -> tuple[dict[str, np.ndarray], list[dict]]:
    """The arrays of a package and the per-leaf records describing them (no file I/O).

    ``masks`` (over ``variables["params"]``, True = keep) zero entries first; the stored
    pattern of a kernel is its nonzeros after that. ``shared``: kernels with at most 256
    distinct kept values are stored as codebook + indices (exact); ``entropy``: "huffman"
    entropy-codes the integer codes and the positions. ValueError names the leaf for bad
    bits, masks that do not match the params, non-boolean masks and non-finite values.
    """
    config = weight_config(bits, per_channel)  # validates bits (2..8)
    _check_float_dtype(float_dtype)
    if entropy not in ENTROPY:
        raise ValueError(f"entropy={entropy!r} is not valid; choose one of: {', '.join(ENTROPY)}")
    if "params" not in variables:
        raise ValueError(f"variables need a 'params' collection, got {sorted(variables)}")
    variables = {k: _host_tree(v) for k, v in variables.items()}
    params = variables["params"]
    if masks is not None:
        prune.check_masks(params, masks)
        masks = _host_tree(masks)
        _check_mask_values(masks)
        params = jax.tree.map(lambda p, mk: np.where(mk.astype(bool), p, np.zeros((), p.dtype)),
                              params, masks)
        variables = {**variables, "params": params}
    for collection, tree in variables.items():
        _check_finite(collection, tree)
    flat = _flatten(variables)
    kernels = {p: np.asarray(v, np.float32) for p, v in flat
               if p.startswith("params/") and prune.is_kernel(p, v)}
    codebooks = {p: np.unique(k[k != 0]) for p, k in kernels.items()} if shared else {}
    codebooks = {p: c for p, c in codebooks.items() if 0 < c.size <= 256}
    quantized = _quantize_kernels({p: k for p, k in kernels.items() if p not in codebooks},
                                  config)
    arrays: dict[str, np.ndarray] = {}
    records: list[dict] = []
    for i, (path, leaf) in enumerate(flat):
        leaf = np.asarray(leaf)
        record = {"path": path, "shape": list(leaf.shape), "dtype": leaf.dtype.name}
        if path in kernels:
            nonzero = kernels[path] != 0
            nnz = int(nonzero.sum())
            if path in codebooks:
                book = codebooks[path]
                leaf_bits = max(1, math.ceil(math.log2(book.size)))
                symbols = np.searchsorted(book, kernels[path][nonzero]).astype(np.int64)
                record.update(encoding="shared", bits=leaf_bits, nonzeros=nnz)
                arrays[f"{i}.codebook"] = book.astype(np.float32)
                qmin = 0
            else:
                codes, scale = quantized[path]
                record.update(encoding="sparse_int", bits=bits, qmin=config.qmin,
                              per_channel=per_channel, nonzeros=nnz)
                arrays[f"{i}.scale"] = np.atleast_1d(scale).astype(float_dtype)
                symbols, leaf_bits, qmin = codes[nonzero], bits, config.qmin
            record["entropy"] = entropy
            if entropy == "huffman":
                arrays[f"{i}.values"] = _stream(np.asarray(symbols, np.int64) - qmin)
                if nnz < leaf.size:
                    record["index_bits"] = INDEX_BITS
                    arrays[f"{i}.positions"] = _stream(huffman.relative_positions(
                        nonzero.ravel(), index_bits=INDEX_BITS))
            else:
                arrays[f"{i}.codes"] = pack_codes(np.asarray(symbols), leaf_bits, qmin)
                if nnz < leaf.size:
                    arrays[f"{i}.mask"] = np.packbits(nonzero.ravel())
        else:
            record.update(encoding="float")
            arrays[f"{i}.value"] = leaf.astype(float_dtype)
        records.append(record)
    return arrays, records


def _stream(symbols: np.ndarray) -> np.ndarray:
    """A checksummed Huffman stream of non-negative symbols, as a uint8 array."""
    return np.frombuffer(huffman.encode(np.asarray(symbols, np.int64)), np.uint8)


def _decode_leaf(record: Mapping[str, Any], arrays: Mapping[str, np.ndarray], i: int) -> np.ndarray:
    shape = tuple(record["shape"])
    if record["encoding"] == "float":
        return np.asarray(arrays[f"{i}.value"]).astype(jnp.dtype(record["dtype"])).reshape(shape)
    size = int(np.prod(shape))
    nnz = int(record["nonzeros"])
    huffman_coded = record.get("entropy", "none") == "huffman"
    if huffman_coded and f"{i}.positions" in arrays:
        diffs = huffman.decode(arrays[f"{i}.positions"].tobytes())
        mask = huffman.absolute_positions(diffs, size,
                                          index_bits=int(record["index_bits"])).reshape(shape)
    elif f"{i}.mask" in arrays:
        mask = np.unpackbits(arrays[f"{i}.mask"])[:size].astype(bool).reshape(shape)
    else:
        mask = np.ones(shape, bool)
    if int(mask.sum()) != nnz:
        raise ValueError(f"package leaf {record['path']!r}: mask holds {int(mask.sum())} "
                         f"entries, record says {nnz}")
    qmin = int(record.get("qmin", 0))
    if huffman_coded:
        codes = huffman.decode(arrays[f"{i}.values"].tobytes()).astype(np.int64) + qmin
        if codes.size != nnz:
            raise ValueError(f"package leaf {record['path']!r}: {codes.size} codes for "
                             f"{nnz} kept weights")
    else:
        codes = unpack_codes(arrays[f"{i}.codes"], nnz, int(record["bits"]), qmin)
    out = np.zeros(shape, np.float32)
    if record["encoding"] == "shared":
        book = np.asarray(arrays[f"{i}.codebook"], np.float32)
        if nnz and (codes.min() < 0 or codes.max() >= book.size):
            raise ValueError(f"package leaf {record['path']!r}: a code is outside its "
                             f"{book.size}-entry codebook")
        out[mask] = book[codes]
    else:
        scale = np.asarray(arrays[f"{i}.scale"], np.float32)
        scale = np.broadcast_to(scale, shape)  # (cout,) per channel, (1,) per tensor
        out[mask] = codes.astype(np.float32) * scale[mask]  # as fake_quant: (q - 0) * scale
    return out.astype(jnp.dtype(record["dtype"]))


def decode(arrays: Mapping[str, np.ndarray], records: list[dict],
           collections: list[str]) -> dict[str, PyTree]:
    """Float variables (dequantized kernels, zeros in place) from `encode`'s output."""
    out: dict[str, dict] = {c: {} for c in collections}
    for i, record in enumerate(records):
        node = out
        *parents, leaf = record["path"].split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _decode_leaf(record, arrays, i)
    return out


# --------------------------------------------------------------------------- files


def save_compressed(path: str | os.PathLike, model: nn.Module, variables: Mapping[str, PyTree],
                    masks: PyTree | None = None, *, spec: data.DatasetSpec, bits: int = 8,
                    per_channel: bool = True, float_dtype: str = "float32",
                    shared: bool = False, entropy: str = "none",
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a compressed checkpoint of ``model``/``variables`` to ``path`` (one .npz file).

    See the module docstring for the layout. ``spec`` is the dataset the model was trained on
    (``data.dataset_spec(...)``): its image shape and per-channel mean/std are stored so the
    package's ``predict`` takes raw images (`check_spec` refuses a spec the model does not
    fit). ``extra`` (JSON) is stored alongside, e.g. the source run and step. Returns
    ``{"path", "package_file_bytes", "packed_bytes", "dense_float32_bytes", "ratio", "bits",
    "kernel_params", "kernel_nonzeros", "sparsity"}``: ``package_file_bytes`` is the size on
    disk (zlib-compressed), ``packed_bytes`` the arrays before zlib (= `packed_bytes(...)`),
    ``dense_float32_bytes`` 4 bytes per stored variable, ``ratio`` the second over the first.
    """
    model_record = model_spec(model)
    check_spec(model, variables, spec)
    arrays, records = encode(variables, masks, bits=bits, per_channel=per_channel,
                             float_dtype=float_dtype, shared=shared, entropy=entropy)
    meta = {"format": FORMAT, "version": VERSION, "model": model_record,
            "dataset": _spec_record(spec), "bits": bits, "entropy": entropy,
            "per_channel": per_channel, "float_dtype": float_dtype,
            "collections": sorted(variables), "leaves": records, "extra": dict(extra or {})}
    buffer = BytesIO()
    np.savez_compressed(buffer, **arrays, **{_META_KEY: np.array(io.dumps(meta))})
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)  # a reader never sees half a package
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    file_bytes = os.path.getsize(path)  # after zlib
    dense = 4 * sum(int(np.prod(r["shape"])) for r in records)
    kernels = [r for r in records if r["encoding"] in ("sparse_int", "shared")]
    size = sum(int(np.prod(r["shape"])) for r in kernels)
    nnz = sum(r["nonzeros"] for r in kernels)
    return {"path": path, "package_file_bytes": file_bytes,
            "packed_bytes": int(sum(a.nbytes for a in arrays.values())),
            "dense_float32_bytes": dense, "ratio": dense / file_bytes, "bits": bits,
            "kernel_params": size, "kernel_nonzeros": nnz, "entropy": entropy,
            "shared_kernels": sum(r["encoding"] == "shared" for r in records),
            "sparsity": 1.0 - nnz / size if size else 0.0}


def read_package(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a package; ValueError if ``path`` is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compressed package at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop(_META_KEY)))
    except (zipfile.BadZipFile, KeyError, OSError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path!r} is not a jaxaccel compressed package ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a jaxaccel compressed package (format="
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version < min(
            READABLE_VERSIONS):
        raise ValueError(f"{path!r} is a version-{version} package, which does not record the "
                         f"input normalisation; re-run `jaxaccel compress package WORKDIR --out "
                         f"{path}` to rebuild it (this jaxaccel reads version {VERSION})")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path!r}: package version {version!r} is not supported "
                         f"(this jaxaccel reads versions {READABLE_VERSIONS})")
    return meta, arrays


@dataclasses.dataclass
class CompressedModel:
    """A compressed package read back for inference; the same API as ``jaxaccel.load(W)``.

    ``model.apply(variables, x, train=False)`` is the network on NORMALISED input
    ``x = data.normalize(raw, spec)``; ``predict(raw)`` is what takes raw images.
    ``meta`` is the package's JSON record (``meta["extra"]``: what the packager added).
    """
    model: nn.Module
    variables: dict
    spec: data.DatasetSpec
    meta: dict
    predict_fn: Callable

    @property
    def step(self) -> int | None:
        """The train step of the packaged weights, if the packager recorded it."""
        return self.meta.get("extra", {}).get("step")

    def predict(self, images: Any) -> jax.Array:
        """Logits for raw images (uint8 or 0..255 floats, NHWC); normalisation included."""
        return self.predict_fn(self.variables, images)


def predict_function(model: nn.Module, spec: data.DatasetSpec) -> Callable:
    """Jitted ``(variables, raw images) -> logits``, normalising as training did
    (``train.build``'s ``predict_fn``)."""
    @jax.jit
    def predict_fn(variables, images):
        return model.apply(variables, data.normalize(jnp.asarray(images), spec), train=False)
    return predict_fn


def load_compressed(path: str | os.PathLike) -> CompressedModel:
    """Rebuild a package for inference: float32 variables with the kernels dequantized
    (``codes * scale``, every pruned entry exactly zero), the model, and its dataset's
    normalisation. ``.predict(raw_uint8_nhwc)`` gives logits; ``.model.apply(.variables, x,
    train=False)`` expects normalised ``x`` (see `CompressedModel`)."""
    meta, arrays = read_package(path)
    try:
        model = model_from_spec(meta["model"])
        spec = _spec_from_record(meta["dataset"])
        variables = decode(arrays, meta["leaves"], meta["collections"])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)!r}: damaged package ({type(e).__name__}: {e})") from None
    return CompressedModel(model=model, variables=jax.tree.map(jnp.asarray, variables),
                           spec=spec, meta=meta, predict_fn=predict_function(model, spec))
