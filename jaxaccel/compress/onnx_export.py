"""ONNX export of inference functions, float and int8 (QDQ), for ONNX Runtime and other peers.

The exported graph takes what ``jaxaccel.load(W).predict`` takes: a batch of RAW images,
uint8 NHWC (input ``"images"``, batch dimension ``"batch"`` dynamic), and returns float32
``"logits"``; the dataset's normalisation is inside, the weights are initializers.
Opset `ONNX_OPSET` (17), IR version `ONNX_IR_VERSION` (8), for ONNX Runtime 1.2x and later.

    import onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    logits = session.run(None, {"images": images_uint8_nhwc})[0]

How: the model's eval-mode function of raw pixels is traced to a jaxpr (symbolic batch; convs
forced to plain `lax.conv_general_dilated`, pools to `reduce_window_max`) and each primitive is
lowered to ONNX operators here (`to_onnx`): convs run NCHW inside the graph (layouts are
tracked, so one transpose enters the conv stack and one leaves it), bias adds join their Conv,
computations on weights alone are folded to initializers. jax2onnx was not used: its 0.17
release pins orbax-checkpoint below the version jaxaccel requires.

int8 (`export_int8`): a QDQ graph from jaxaccel's OWN calibration (the quantize stage's
activation scales and zero points, `calibration.json`) and its int8 weights (`int8.convert_int8`):
every int8 layer's input passes QuantizeLinear -> DequantizeLinear with the calibrated per-tensor
scale / zero point (uint8 or int8 as calibrated), its kernel an 8-bit initializer behind a
per-output-channel DequantizeLinear, a conv's bias an int32 initializer with scale s_x * s_w
(the layer's accumulator step, as QLinearConv needs it), and where `int8.fusion_plan` proves it
exact the layer's output is quantized with the next layer's input parameters (so ONNX Runtime
can run the conv as QLinearConv). ONNX Runtime's result then equals `int8.int8_apply`'s but for
the bias, rounded to the accumulator step (jaxaccel adds it in float): that moves a value across
a code boundary of the next layer now and then (one code by one), and rounding ties. On the
tested digits runs logits agree within 3% of their range and top-1 in >= 99.5% of the images.

A model this lowering cannot express fails with `OnnxExportError` (a ValueError) naming the
layer and the operation; nothing is written. Needs the `onnx` package (``pip install
'jaxaccel[onnx]'``, which also brings onnxruntime).

Owns `export_float`, `export_int8`, `to_onnx`, `save_model`, `require_onnx` and
`OnnxExportError`. Imports compress's int8 and quant, data (`DatasetSpec`, `normalize`) and
`models.ensemble`; never config, stages, state, the loop or anything above.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export
from jax.extend.core import Literal, Primitive

from jaxaccel import data
from jaxaccel.compress import int8 as int8_lib
from jaxaccel.compress.quant import WEIGHT_CONFIG, QParams, QuantConfig, tensor_qparams
from jaxaccel.models.ensemble import Ensemble

ONNX_OPSET = 17
ONNX_IR_VERSION = 8
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
INSTALL_HINT = "pip install 'jaxaccel[onnx]'"
WEIGHT_DTYPES = ("uint8", "int8")  # how int8 kernel codes are stored (export_int8)


class OnnxExportError(ValueError):
    """A model, layer or operation the ONNX export cannot express (one line, naming it)."""


ENSEMBLE_INT8 = ("int8 ONNX export takes one model, not an ensemble: export the ensemble in "
                 "float, or a member's run with --int8")


def require_onnx() -> Any:
    """The `onnx` module, or a ValueError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ValueError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    return onnx


# ---------------------------------------------------------------------------------------------
# Marker primitives of the int8 trace (lowered to QuantizeLinear / DequantizeLinear)
# ---------------------------------------------------------------------------------------------
_QDQ = Primitive("jaxaccel_onnx_qdq")            # x -> DQ(Q(x)); params scale, zero_point, dtype
_DQ_WEIGHT = Primitive("jaxaccel_onnx_dq_weight")  # int8 codes -> codes * scale (last axis)


def _qdq_impl(x, *, scale: float, zero_point: int, dtype: str):
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    q = jnp.clip(jnp.round(x / np.float32(scale)) + zero_point, lo, hi)
    return ((q - zero_point) * np.float32(scale)).astype(x.dtype)


def _dq_weight_impl(codes, *, scale: tuple[float, ...]):
    return codes.astype(jnp.float32) * np.asarray(scale, np.float32)


def _dq_weight_abstract(codes, **_):
    return jax.core.ShapedArray(codes.shape, jnp.float32)


_QDQ.def_impl(_qdq_impl)
_QDQ.def_abstract_eval(lambda x, **_: x)
_DQ_WEIGHT.def_impl(_dq_weight_impl)
_DQ_WEIGHT.def_abstract_eval(_dq_weight_abstract)


# ---------------------------------------------------------------------------------------------
# jaxpr -> ONNX
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Val:
    """One jaxpr value in the graph being built.

    `shape` is the jaxpr's (logical) shape; `actual` the logical-order shape held (1 on axes
    broadcast lazily, numpy-style, by a later elementwise op; None: `shape`); the ONNX tensor
    holds `actual` transposed by `perm` (None: identity). `const` is a folded value (no ONNX
    name until used); `qweight` = (int8 codes, scales, axis) of a DequantizeLinear not yet
    emitted; `qscale` the per-tensor scale of a DequantizeLinear output; `conv` the Conv node
    that made it (bias not yet attached) with its channel axis and quantization scales.
    """
    shape: tuple
    dtype: np.dtype
    name: str | None = None
    const: np.ndarray | None = None
    actual: tuple | None = None
    perm: tuple | None = None
    qweight: tuple | None = None
    qscale: float | None = None
    conv: dict | None = None

    @property
    def held(self) -> tuple:
        return self.shape if self.actual is None else self.actual


def _is_int(d: Any) -> bool:
    return isinstance(d, (int, np.integer))


def _norm(perm: Sequence[int] | None) -> tuple[int, ...] | None:
    """None for no permutation or the identity, else the permutation as a tuple of ints."""
    if perm is None or tuple(perm) == tuple(range(len(perm))):
        return None
    return tuple(int(a) for a in perm)


_UNARY = {"exp": "Exp", "log": "Log", "neg": "Neg", "abs": "Abs", "sqrt": "Sqrt", "tanh": "Tanh",
          "logistic": "Sigmoid", "floor": "Floor", "ceil": "Ceil", "sign": "Sign", "not": "Not",
          "erf": "Erf", "sin": "Sin", "cos": "Cos"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow", "eq": "Equal", "gt": "Greater", "ge": "GreaterOrEqual", "lt": "Less",
           "le": "LessOrEqual", "and": "And", "or": "Or"}
_IDENTITY = {"stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd"}
_NUMPY_FOLD = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
               "min": np.minimum, "neg": np.negative, "abs": np.abs}


class _Converter:
    """Lowers one jaxpr (eval-mode inference, one uint8 NHWC input, symbolic batch) to ONNX."""

    def __init__(self, batch: Any, weight_dtype: str = "uint8"):
        self.weight_dtype = weight_dtype
        self.onnx = require_onnx()
        self.helper = self.onnx.helper
        self.batch = batch
        self.nodes: list = []
        self.initializers: list = []
        self._ids = itertools.count()
        self._const_names: dict = {}
        self._transposed: dict = {}
        self._batch_name: str | None = None
        self.input_name = INPUT_NAME
        self.layer = ""

    # -- small builders ------------------------------------------------------------------------
    def fresh(self, hint: str = "v") -> str:
        return f"{hint}_{next(self._ids)}"

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, list(inputs), outs, name=self.fresh("n"),
                                                **attrs))
        return outs

    def init(self, array: np.ndarray, hint: str = "c") -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._const_names:
            name = self.fresh(hint)
            self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
            self._const_names[key] = name
        return self._const_names[key]

    def fail(self, what: str, hint: str = "") -> None:
        where = f"layer {self.layer!r}" if self.layer else "the model's top level"
        raise OnnxExportError(f"ONNX export cannot express {what} in {where}"
                              + (f"; {hint}" if hint else ""))

    def batch_dim(self) -> str:
        """A 1-D int64 tensor [batch] read off the input at run time."""
        if self._batch_name is None:
            shape = self.node("Shape", [self.input_name])[0]
            self._batch_name = self.node("Slice", [shape, self.init(np.array([0], np.int64)),
                                                   self.init(np.array([1], np.int64))])[0]
        return self._batch_name

    def shape_tensor(self, dims: Sequence[Any], allow_minus_one: bool = False) -> str:
        """An int64 shape tensor of `dims` (ints, or the batch symbol read at run time)."""
        symbolic = [i for i, d in enumerate(dims) if not _is_int(d)]
        for i in symbolic:
            if not dims[i] == self.batch:
                self.fail(f"the shape {tuple(dims)} (only the batch size may vary)")
        if not symbolic:
            return self.init(np.asarray(dims, np.int64))
        if allow_minus_one and len(symbolic) == 1:
            return self.init(np.asarray([-1 if i in symbolic else d for i, d in enumerate(dims)],
                                        np.int64))
        pieces = [self.batch_dim() if not _is_int(d) else self.init(np.array([d], np.int64))
                  for d in dims]
        return self.node("Concat", pieces, axis=0)[0]

    # -- values --------------------------------------------------------------------------------
    def name_of(self, v: _Val, perm: Sequence[int] | None = None) -> str:
        """v's ONNX name with its held shape laid out as logical.transpose(perm)."""
        perm = _norm(perm)
        if v.const is not None:
            return self.init(v.const if perm is None else np.transpose(v.const, perm))
        if v.qweight is not None:
            codes, scale, axis = v.qweight
            if perm is not None:
                codes, axis = np.transpose(codes, perm), perm.index(axis)
            attrs = {"axis": axis} if np.ndim(scale) else {}
            if self.weight_dtype == "uint8":  # the same real values: codes + 128, zero point 128
                inputs = [self.init((codes.astype(np.int32) + 128).astype(np.uint8), "w_uint8"),
                          self.init(scale, "w_scale"),
                          self.init(np.full(np.shape(scale), 128, np.uint8), "w_zero_point")]
            else:
                inputs = [self.init(codes, "w_int8"), self.init(scale, "w_scale")]
            return self.node("DequantizeLinear", inputs, **attrs)[0]
        have = _norm(v.perm)
        if have == perm:
            return v.name
        key = (v.name, have, perm)  # one name can be held in two layouts (op_transpose)
        if key not in self._transposed:
            have = have or tuple(range(len(v.shape)))
            want = perm or tuple(range(len(v.shape)))
            self._transposed[key] = self.node("Transpose", [v.name],
                                              perm=[have.index(a) for a in want])[0]
        return self._transposed[key]

    def complete(self, v: _Val) -> _Val:
        """v with its held shape the jaxpr's (a lazy broadcast materialised by Expand)."""
        if v.actual is None or tuple(v.actual) == tuple(v.shape):
            return v
        if v.const is not None and all(_is_int(d) for d in v.shape):
            return _Val(tuple(v.shape), v.dtype, const=np.broadcast_to(v.const, v.shape).copy())
        perm = v.perm or tuple(range(len(v.shape)))
        shape = self.shape_tensor([v.shape[p] for p in perm])
        name = self.node("Expand", [self.name_of(v, v.perm), shape])[0]
        return _Val(tuple(v.shape), v.dtype, name=name, perm=v.perm)

    def logical(self, v: _Val) -> str:
        """The name of v complete, in logical (jaxpr) layout."""
        return self.name_of(self.complete(v), None)

    # -- the jaxpr walk ------------------------------------------------------------------------
    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[_Val], prefix: str = "") -> list[_Val]:
        env: dict = {}
        uses: dict = {}
        for eqn in jaxpr.eqns:
            for var in eqn.invars:
                if not isinstance(var, Literal):
                    uses[var] = uses.get(var, 0) + 1
        for var in jaxpr.outvars:
            if not isinstance(var, Literal):
                uses[var] = uses.get(var, 0) + 2  # an output is never folded into a later op

        def read(var: Any) -> _Val:
            if isinstance(var, Literal):
                return _Val((), np.dtype(var.aval.dtype), const=np.asarray(var.val, var.aval.dtype))
            return env[var]

        for var, c in zip(jaxpr.constvars, consts):
            c = np.asarray(jax.device_get(c))
            env[var] = _Val(tuple(c.shape), c.dtype, const=c)
        for var, a in zip(jaxpr.invars, args):
            env[var] = a
        for eqn in jaxpr.eqns:
            stack = str(eqn.source_info.name_stack)
            self.layer = "/".join(p for p in (prefix, stack) if p)
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins, [0 if isinstance(v, Literal) else uses.get(v, 0)
                                       for v in eqn.invars])
            for var, val in zip(eqn.outvars, outs):
                if type(var).__name__ != "DropVar":
                    env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[_Val], uses: list[int]) -> list[_Val]:
        name = eqn.primitive.name
        p = eqn.params
        outs = [_Val(tuple(v.aval.shape), np.dtype(v.aval.dtype)) for v in eqn.outvars]
        if eqn.primitive is _QDQ:
            return [self.qdq(ins[0], p["scale"], p["zero_point"], p["dtype"])]
        if eqn.primitive is _DQ_WEIGHT:
            codes = ins[0].const
            scale = np.asarray(p["scale"], np.float32)
            return [_Val(outs[0].shape, np.dtype(np.float32), qweight=(codes, scale, codes.ndim - 1))]
        if name in _CALLS or (name not in _IDENTITY and name.startswith("custom_")):
            sub = p.get(_CALLS.get(name, "call_jaxpr"))
            if sub is None:
                self.fail(f"the call {name!r}")
            inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            return self.run(inner, consts, ins, self.layer)
        for o in outs:
            if jnp.issubdtype(o.dtype, jnp.floating) and o.dtype != np.float32:
                self.fail(f"{o.dtype.name} arithmetic ({name})", "it exports float32 models")
        if all(v.const is not None for v in ins) and \
                all(_is_int(d) for o in outs for d in o.shape):
            return self.fold(eqn, ins, outs)
        if name in _IDENTITY:  # (`conv` dropped: a bias joins a Conv only straight after it)
            return [dataclasses.replace(v, conv=None) for v in ins]
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            return handler(eqn, ins, outs, uses)
        if name in _UNARY:
            return [self.unary(_UNARY[name], ins[0], outs[0])]
        if name in _BINARY:
            return [self.elementwise(_BINARY[name], ins, outs[0], eqn, uses)]
        if name in _REDUCE:
            return [self.reduce(_REDUCE[name], ins[0], outs[0], p["axes"])]
        self.fail(f"the operation {name!r}")

    def fold(self, eqn: Any, ins: list[_Val], outs: list[_Val]) -> list[_Val]:
        name = eqn.primitive.name
        if not all(_is_int(d) for v in ins for d in v.shape):
            self.fail(f"{name} of a constant broadcast along the batch")
        args = [np.broadcast_to(v.const, v.shape) if v.actual is not None else v.const for v in ins]
        if name in _NUMPY_FOLD:  # IEEE-exact in numpy as in XLA: no dispatch per op
            results = [_NUMPY_FOLD[name](*args)]
        elif name in _IDENTITY:
            results = list(args)
        elif name == "reshape" and eqn.params.get("dimensions") is None:
            results = [np.reshape(args[0], eqn.params["new_sizes"])]
        elif name == "broadcast_in_dim":
            results = [np.broadcast_to(np.expand_dims(args[0], tuple(
                i for i in range(len(outs[0].shape)) if i not in eqn.params["broadcast_dimensions"])),
                outs[0].shape)]
        elif name == "convert_element_type":
            results = [args[0].astype(eqn.params["new_dtype"])]
        else:
            r = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **eqn.params)
            results = list(r) if eqn.primitive.multiple_results else [r]
        return [_Val(o.shape, o.dtype, const=np.asarray(jax.device_get(r), o.dtype).reshape(o.shape))
                for o, r in zip(outs, results)]

    # -- elementwise ---------------------------------------------------------------------------
    def unary(self, op: str, v: _Val, out: _Val) -> _Val:
        name = self.node(op, [self.name_of(v, v.perm)])[0]
        return dataclasses.replace(out, name=name, actual=v.actual, perm=v.perm)

    def elementwise(self, op: str, ins: list[_Val], out: _Val, eqn: Any = None,
                    uses: Sequence[int] = ()) -> _Val:
        rank = len(out.shape)
        if op == "Sub" and ins[1].const is not None and ins[0].const is None \
                and ins[1].dtype.kind == "f":  # x - c as x + (-c): exact, and ORT folds Adds into Conv
            op, ins = "Add", [ins[0], dataclasses.replace(ins[1], const=np.negative(ins[1].const))]
        if op == "Max" and len(ins) == 2:  # nn.relu: max(x, 0)
            for x, zero in (ins, ins[::-1]):
                if zero.const is not None and zero.const.size == 1 and x.const is None \
                        and x.qweight is None and float(zero.const.reshape(())) == 0.0:
                    return self.unary("Relu", x, out)
        if op == "Add" and eqn is not None:
            fused = self.conv_bias(ins, uses, out)
            if fused is not None:
                return fused
        perm = next((v.perm for v in ins if v.const is None and v.qweight is None
                     and len(v.shape) == rank and v.perm), None)
        names = [self.name_of(v, perm if len(v.shape) == rank else None) for v in ins]
        helds = [v.held if len(v.shape) == rank else (1,) * rank for v in ins]
        actual = tuple(next((d for d in dims if not (_is_int(d) and d == 1)), 1)
                       for dims in zip(*helds))
        name = self.node(op, names)[0]
        return dataclasses.replace(out, name=name, perm=perm,
                                   actual=None if actual == tuple(out.shape) else actual)

    def op_ne(self, eqn, ins, outs, uses):
        eq = self.elementwise("Equal", ins, outs[0])
        return [self.unary("Not", eq, outs[0])]

    def op_rsqrt(self, eqn, ins, outs, uses):
        return [self.unary("Reciprocal", self.unary("Sqrt", ins[0], outs[0]), outs[0])]

    def op_integer_pow(self, eqn, ins, outs, uses):
        exponent = _Val((), ins[0].dtype, const=np.asarray(eqn.params["y"], ins[0].dtype))
        return [self.elementwise("Pow", [ins[0], exponent], outs[0])]

    def op_is_finite(self, eqn, ins, outs, uses):
        inf = self.unary("IsInf", ins[0], outs[0])
        nan = self.unary("IsNaN", ins[0], outs[0])
        return [self.unary("Not", self.elementwise("Or", [inf, nan], outs[0]), outs[0])]

    def op_round(self, eqn, ins, outs, uses):
        if int(eqn.params.get("rounding_method", 0)) != 1:  # ONNX Round: half to even only
            self.fail("rounding half away from zero (round)")
        return [self.unary("Round", ins[0], outs[0])]

    def op_select_n(self, eqn, ins, outs, uses):
        if len(ins) != 3 or ins[0].dtype != np.bool_:
            self.fail("select_n with more than two cases")
        return [self.elementwise("Where", [ins[0], ins[2], ins[1]], outs[0])]

    def op_clamp(self, eqn, ins, outs, uses):
        lo, x, hi = ins
        return [self.elementwise("Max", [self.elementwise("Min", [x, hi], outs[0]), lo], outs[0])]

    def op_convert_element_type(self, eqn, ins, outs, uses):
        v, out = ins[0], outs[0]
        if v.dtype == out.dtype:
            return [dataclasses.replace(v, shape=out.shape, conv=None)]
        to = self.helper.np_dtype_to_tensor_dtype(out.dtype)
        name = self.node("Cast", [self.name_of(v, v.perm)], to=to)[0]
        return [dataclasses.replace(out, name=name, actual=v.actual, perm=v.perm)]

    # -- shapes --------------------------------------------------------------------------------
    def op_broadcast_in_dim(self, eqn, ins, outs, uses):
        v, out = ins[0], outs[0]
        dims = tuple(eqn.params["broadcast_dimensions"])
        held = [1] * len(out.shape)
        for i, d in enumerate(dims):
            held[d] = v.held[i]
        held = tuple(held)
        if dims == tuple(range(len(out.shape))):  # same rank: only size-1 axes broadcast
            return [dataclasses.replace(v, shape=out.shape, actual=None if held == out.shape else held,
                                        conv=None)]
        if v.const is not None:
            const = np.reshape(v.const, [d if _is_int(d) else -1 for d in held])
            return [_Val(out.shape, out.dtype, const=const, actual=held)]
        name = self.node("Reshape", [self.name_of(v, None), self.shape_tensor(held, True)])[0]
        return [_Val(out.shape, out.dtype, name=name, actual=None if held == out.shape else held)]

    def op_reshape(self, eqn, ins, outs, uses):
        if eqn.params.get("dimensions") is not None:
            self.fail("reshape with dimensions")
        v, out = self.complete(ins[0]), outs[0]
        if tuple(v.shape) == tuple(out.shape):
            return [dataclasses.replace(v, conv=None)]
        if v.const is not None:
            return [_Val(out.shape, out.dtype, const=np.reshape(v.const, [d if _is_int(d) else -1
                                                                          for d in out.shape]))]
        name = self.node("Reshape", [self.name_of(v, None), self.shape_tensor(out.shape, True)])[0]
        return [dataclasses.replace(out, name=name)]

    def op_squeeze(self, eqn, ins, outs, uses):
        v, out = self.complete(ins[0]), outs[0]
        name = self.node("Reshape", [self.name_of(v, None), self.shape_tensor(out.shape, True)])[0]
        return [dataclasses.replace(out, name=name)]

    def op_transpose(self, eqn, ins, outs, uses):
        v, out = ins[0], outs[0]
        perm = tuple(eqn.params["permutation"])
        if v.qweight is not None:
            v = _Val(v.shape, v.dtype, name=self.name_of(v, None))
        held = tuple(v.held[a] for a in perm)
        actual = None if held == tuple(out.shape) else held
        if v.const is not None:
            return [_Val(out.shape, out.dtype, const=np.transpose(v.const, perm), actual=actual)]
        have = v.perm or tuple(range(len(perm)))
        return [dataclasses.replace(out, name=v.name, actual=actual,
                                    perm=tuple(perm.index(a) for a in have))]

    def op_concatenate(self, eqn, ins, outs, uses):
        names = [self.logical(v) for v in ins]
        return [dataclasses.replace(outs[0], name=self.node("Concat", names,
                                                           axis=int(eqn.params["dimension"]))[0])]

    def op_stack(self, eqn, ins, outs, uses):
        axis = int(eqn.params["axis"])
        one = tuple(outs[0].shape[:axis]) + (1,) + tuple(outs[0].shape[axis + 1:])
        names = [self.node("Reshape", [self.logical(v), self.shape_tensor(one, True)])[0]
                 for v in ins]
        return [dataclasses.replace(outs[0], name=self.node("Concat", names, axis=axis)[0])]

    def op_pad(self, eqn, ins, outs, uses):
        v, value = ins
        config = eqn.params["padding_config"]
        if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
            self.fail("pad with interior or negative padding")
        if value.const is None:
            self.fail("pad with a computed padding value")
        pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
        name = self.node("Pad", [self.logical(v), self.init(np.asarray(pads, np.int64)),
                                 self.init(np.asarray(value.const, v.dtype))], mode="constant")[0]
        return [dataclasses.replace(outs[0], name=name)]

    def op_slice(self, eqn, ins, outs, uses):
        v = ins[0]
        starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params["strides"] or (1,) * len(starts)
        if not all(_is_int(d) for d in (*starts, *limits)):
            self.fail("a slice of the batch dimension")
        arrays = [np.asarray(a, np.int64) for a in (starts, limits, range(len(starts)), strides)]
        name = self.node("Slice", [self.logical(v)] + [self.init(a) for a in arrays])[0]
        return [dataclasses.replace(outs[0], name=name)]

    def op_gather(self, eqn, ins, outs, uses):
        """jnp's static indexing under a symbolic batch (`x[:, 2:6]`, `x[:, 0]`): a gather at
        constant start indices, one window, as Slice (+ Reshape dropping collapsed axes)."""
        v, idx = ins
        dn, sizes, out = eqn.params["dimension_numbers"], eqn.params["slice_sizes"], outs[0]
        rank = len(v.shape)
        if idx.const is None or np.ndim(idx.const) != 1 or dn.operand_batching_dims \
                or tuple(dn.offset_dims) != tuple(range(len(out.shape))):
            self.fail("a gather other than static indexing")
        starts = [0] * rank
        for axis, start in zip(dn.start_index_map, np.asarray(idx.const).tolist()):
            if not _is_int(v.shape[axis]):
                self.fail("indexing into the batch dimension")
            starts[axis] = min(max(int(start), 0), int(v.shape[axis]) - int(sizes[axis]))
        ends = [s + int(n) if _is_int(n) else np.iinfo(np.int64).max for s, n in zip(starts, sizes)]
        arrays = [np.asarray(a, np.int64) for a in (starts, ends, range(rank))]
        name = self.node("Slice", [self.logical(v)] + [self.init(a) for a in arrays])[0]
        if dn.collapsed_slice_dims:
            name = self.node("Reshape", [name, self.shape_tensor(out.shape, True)])[0]
        return [dataclasses.replace(out, name=name)]

    # -- reductions ----------------------------------------------------------------------------
    def reduce(self, op: str, v: _Val, out: _Val, axes: Sequence[int]) -> _Val:
        v = self.complete(v)
        perm = v.perm or tuple(range(len(v.shape)))
        phys = sorted(perm.index(a) for a in axes)
        src = self.name_of(v, v.perm)
        if op == "ReduceSum":
            name = self.node(op, [src, self.init(np.asarray(phys, np.int64))], keepdims=0)[0]
        else:
            name = self.node(op, [src], axes=phys, keepdims=0)[0]
        kept = [a for a in perm if a not in axes]  # logical axes in physical order
        return dataclasses.replace(out, name=name, perm=_norm([sorted(kept).index(a) for a in kept]))

    def op_argmax(self, eqn, ins, outs, uses):
        (axis,) = eqn.params["axes"]
        v = ins[0]
        idx = self.node("ArgMax", [self.logical(v)], axis=int(axis), keepdims=0)[0]
        to = self.helper.np_dtype_to_tensor_dtype(outs[0].dtype)
        return [dataclasses.replace(outs[0], name=self.node("Cast", [idx], to=to)[0])]

    # -- layers --------------------------------------------------------------------------------
    def op_dot_general(self, eqn, ins, outs, uses):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        if lb or rb or len(lc) != 1 or len(rc) != 1 or len(rhs.shape) != 2:
            self.fail("a dot_general other than (..., K) @ (K, N)")
        lhs_perm = [a for a in range(len(lhs.shape)) if a != lc[0]] + [lc[0]]
        a = self.name_of(self.complete(lhs), lhs_perm)
        rhs_perm = (rc[0], 1 - rc[0])
        b = self.name_of(self.complete(rhs) if rhs.qweight is None else rhs, rhs_perm)
        name = self.node("MatMul", [a, b])[0]
        return [dataclasses.replace(outs[0], name=name)]

    def op_conv_general_dilated(self, eqn, ins, outs, uses):
        p = eqn.params
        lhs, rhs = ins
        dn = p["dimension_numbers"]
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            self.fail("a transposed (input-dilated) or batch-grouped convolution")
        if p.get("preferred_element_type") not in (None, np.float32, jnp.float32):
            self.fail("an integer convolution")
        padding = p["padding"]
        if isinstance(padding, str):
            self.fail(f"a convolution with padding {padding!r}")
        x = self.name_of(self.complete(lhs), tuple(dn.lhs_spec))
        w = self.name_of(rhs if rhs.qweight is not None else self.complete(rhs), tuple(dn.rhs_spec))
        pads = [lo for lo, _ in padding] + [hi for _, hi in padding]
        kernel_shape = [int(rhs.shape[a]) for a in dn.rhs_spec[2:]]
        name = self.node("Conv", [x, w], kernel_shape=kernel_shape, pads=pads,
                         strides=list(p["window_strides"]), dilations=list(p["rhs_dilation"]),
                         group=int(p["feature_group_count"]))[0]
        conv = {"node": self.nodes[-1], "channel_axis": dn.out_spec[1],
                "x_scale": lhs.qscale, "w_scale": rhs.qweight[1] if rhs.qweight is not None else None}
        return [dataclasses.replace(outs[0], name=name, perm=tuple(dn.out_spec), conv=conv)]

    def conv_bias(self, ins: list[_Val], uses: Sequence[int], out: _Val) -> _Val | None:
        """conv(x) + bias as the Conv's bias input (int32 with scale s_x * s_w when the conv
        is quantized), when the conv output feeds only this add."""
        for i in (0, 1):
            v, b = ins[i], ins[1 - i]
            if v.conv is None or uses[i] != 1 or b.const is None or v.conv["node"].input[2:]:
                continue
            axis = v.conv["channel_axis"]
            held = b.held if len(b.shape) == len(v.shape) else None
            channels = v.shape[axis]
            if held is None or any(d != 1 for a, d in enumerate(held) if a != axis) \
                    or held[axis] != channels or b.dtype != np.float32:
                continue
            bias = np.asarray(b.const, np.float32).reshape(channels)
            x_scale, w_scale = v.conv["x_scale"], v.conv["w_scale"]
            if x_scale is not None and w_scale is not None:
                acc_scale = (np.float32(x_scale) * np.broadcast_to(w_scale, (channels,))
                             ).astype(np.float32)
                codes = np.clip(np.round(bias / acc_scale), -2**31, 2**31 - 1).astype(np.int32)
                name = self.node("DequantizeLinear", [self.init(codes, "b_int32"),
                                                      self.init(acc_scale, "b_scale")], axis=0)[0]
                # topological order: the bias before its Conv
                self.nodes.insert(self.nodes.index(v.conv["node"]), self.nodes.pop())
            else:
                name = self.init(bias, "bias")
            v.conv["node"].input.append(name)
            return dataclasses.replace(out, name=v.name, perm=v.perm, actual=None)
        return None

    def op_reduce_window_max(self, eqn, ins, outs, uses):
        p = eqn.params
        v = self.complete(ins[0])
        window, strides = p["window_dimensions"], p["window_strides"]
        padding, base, wdil = p["padding"], p["base_dilation"], p["window_dilation"]
        trivial = [a for a in range(len(v.shape)) if window[a] == 1 and strides[a] == 1
                   and tuple(padding[a]) == (0, 0) and wdil[a] == 1]
        if any(d != 1 for d in base):
            self.fail("a base-dilated max pool")
        perm = v.perm
        if perm is None or not {perm[0], perm[1]} <= set(trivial):
            perm = (0, len(v.shape) - 1) + tuple(range(1, len(v.shape) - 1))
            if not {0, len(v.shape) - 1} <= set(trivial):
                self.fail("a max pool over the batch or channel axis")
        spatial = perm[2:]
        name = self.node("MaxPool", [self.name_of(v, perm)],
                         kernel_shape=[int(window[a]) for a in spatial],
                         strides=[int(strides[a]) for a in spatial],
                         pads=[int(padding[a][0]) for a in spatial] + [int(padding[a][1]) for a in spatial],
                         dilations=[int(wdil[a]) for a in spatial])[0]
        return [dataclasses.replace(outs[0], name=name, perm=perm)]

    def qdq(self, v: _Val, scale: float, zero_point: int, dtype: str) -> _Val:
        zp = np.asarray(zero_point, np.uint8 if dtype == "uint8" else np.int8)
        s, z = self.init(np.asarray(scale, np.float32), "x_scale"), self.init(zp, "x_zero_point")
        q = self.node("QuantizeLinear", [self.name_of(v, v.perm), s, z])[0]
        name = self.node("DequantizeLinear", [q, s, z])[0]
        return dataclasses.replace(v, name=name, const=None, qweight=None, conv=None,
                                   qscale=float(scale))


def to_onnx(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int], *,
            input_dtype: Any = np.uint8, doc: str = "", metadata: Mapping[str, str] | None = None,
            weight_dtype: str = "uint8") -> Any:
    """`fn(images) -> logits` (batch dimension free) as an `onnx.ModelProto`: input
    `INPUT_NAME` of shape ("batch",) + input_shape, output `OUTPUT_NAME`; checked by
    `onnx.checker` (with shape inference). Raises `OnnxExportError` for what it cannot express.
    `weight_dtype`: how int8 kernels (`_DQ_WEIGHT`) are stored, see `export_int8`."""
    onnx = require_onnx()
    helper = onnx.helper
    (b,) = jax_export.symbolic_shape(BATCH_DIM)
    shape = tuple(int(d) for d in input_shape)
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((b,) + shape, input_dtype))
    conv = _Converter(b, weight_dtype)
    x = _Val((b,) + shape, np.dtype(input_dtype), name=INPUT_NAME)
    (out,) = conv.run(closed.jaxpr, closed.consts, [x])
    conv.layer = ""
    if out.const is not None:
        conv.fail("a function that ignores its input")
    logits = conv.logical(out)
    conv.nodes.append(helper.make_node("Identity", [logits], [OUTPUT_NAME], name="output"))
    elem = helper.np_dtype_to_tensor_dtype
    graph = helper.make_graph(
        conv.nodes, "jaxaccel",
        [helper.make_tensor_value_info(INPUT_NAME, elem(np.dtype(input_dtype)), [BATCH_DIM, *shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem(out.dtype),
                                       [BATCH_DIM if not _is_int(d) else int(d) for d in out.shape])],
        conv.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              ir_version=ONNX_IR_VERSION, producer_name="jaxaccel",
                              doc_string=doc)
    for k, v in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # a lowering bug, not bad input: still one line, nothing written
        detail = " ".join(str(e).split())
        raise OnnxExportError(f"ONNX export built a graph the ONNX checker rejects ({detail}); "
                              f"please report it") from None
    return model


def save_model(model: Any, path: str | os.PathLike) -> int:
    """Write `model` to `path` through a temporary file renamed into place; its bytes."""
    path = os.fspath(path)
    payload = model.SerializeToString()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)  # never half a model under `path`
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(payload)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _plain(model: Any) -> Any:
    """`model` with plain lax convs and reduce_window pools (conv_impl "xla", no micro-batches);
    an ensemble of stacked members unstacked into one module per member (no vmap)."""
    if isinstance(model, Ensemble):
        return model.map_members(_plain)
    fields = getattr(model, "__dataclass_fields__", {})
    changes = {"conv_impl": "xla"} if "conv_impl" in fields else {}
    if "microbatch" in fields:
        changes["microbatch"] = None
    return model.clone(**changes) if changes else model


def _unstacked(model: Any, variables: Mapping) -> tuple[Any, Mapping]:
    if not isinstance(model, Ensemble) or model.heterogeneous:
        return model, variables
    k = int(jax.tree.leaves(variables["params"])[0].shape[0])
    members = [jax.tree.map(lambda a, i=i: a[i], dict(variables)) for i in range(k)]
    return (dataclasses.replace(model, model=(model.model,) * k),
            {"params": tuple(m["params"] for m in members),
             "batch_stats": tuple(m.get("batch_stats", {}) for m in members)})


def _num_classes(model: Any) -> int:
    return int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)


def export_float(model: Any, variables: Mapping, spec: data.DatasetSpec | str,
                 path: str | os.PathLike) -> dict[str, Any]:
    """Write the eval-mode float model (or ensemble) as ONNX: raw uint8 images of
    `spec.image_shape` in, float32 logits out. Returns {"bytes", "num_classes", "nodes", "opset"}."""
    spec = data.as_spec(spec)
    model, variables = _unstacked(_plain(model), jax.device_get(variables))
    proto = to_onnx(lambda x: model.apply(variables, data.normalize(x, spec), train=False),
                    spec.image_shape, doc="jaxaccel float inference: raw uint8 NHWC images -> logits",
                    metadata={"jaxaccel.kind": "float", "jaxaccel.dataset": spec.name})
    return {"bytes": save_model(proto, path), "num_classes": _num_classes(proto),
            "nodes": len(proto.graph.node), "opset": ONNX_OPSET}


def _act_type(key: str, qp: QParams) -> str:
    if (qp.qmin, qp.qmax) == (0, 255):
        return "uint8"
    if (qp.qmin, qp.qmax) == (-128, 127):
        return "int8"
    raise OnnxExportError(f"ONNX QDQ needs 8-bit activation codes 0..255 or -128..127; layer {key!r} "
                          f"has {qp.qmin}..{qp.qmax}")


def export_int8(model: Any, variables: Mapping, act_qparams: Mapping[str, QParams],
                spec: data.DatasetSpec | str, path: str | os.PathLike, *,
                weight_config: QuantConfig = WEIGHT_CONFIG,
                weight_dtype: str = "uint8") -> dict[str, Any]:
    """Write the int8 network of `int8.convert_int8(variables, act_qparams, weight_config)` as
    an ONNX QDQ graph (see the module docstring). `model` / `variables` are the ones
    `act_qparams` were calibrated on (the BN-folded model when they come from a quantize stage);
    every conv/dense layer must have activation qparams. Returns what `export_float` returns.

    `weight_dtype` stores the int8 kernel codes as "uint8" (codes + 128, zero point 128: the
    same real values) or as "int8". ONNX Runtime runs uint8 x int8 products on AVX2 CPUs without
    VNNI with `vpmaddubsw`, which saturates pairs of products in int16 (its quantization docs
    say so): measured here, cnn_bn's int8 graph then disagreed with jaxaccel on 7% of digits
    test images. uint8 x uint8 does not saturate, hence the default; "int8" is ONNX Runtime's
    usual format, exact on VNNI CPUs.
    """
    spec = data.as_spec(spec)
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not valid; choose one of: "
                         f"{', '.join(WEIGHT_DTYPES)}")
    if isinstance(model, Ensemble):
        raise OnnxExportError(ENSEMBLE_INT8)
    model = _plain(model)
    variables = jax.device_get(dict(variables))
    int8_model = int8_lib.convert_int8(variables, act_qparams, weight_config=weight_config)
    layers = int8_model.layers
    acts = {k: (float(np.asarray(act_qparams[k].scale)), int(np.asarray(act_qparams[k].zero_point)),
                _act_type(k, act_qparams[k])) for k in layers}
    scales = jax.device_get(_weight_scales(
        {k: _get(variables["params"], k.split("/"))["kernel"] for k in layers}, weight_config))
    weights = {k: (np.asarray(layer.kernel, np.int8), tuple(float(s) for s in scales[k]))
               for k, layer in layers.items()}
    probe = jnp.zeros((1,) + tuple(spec.image_shape), jnp.float32)
    plan = int8_lib.fusion_plan(model, int8_model, probe)

    def fn(x):
        params = _with_kernels(variables["params"], {
            k: _DQ_WEIGHT.bind(jnp.asarray(codes), scale=scale) for k, (codes, scale) in weights.items()})

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            key = "/".join(module.path) if module.scope is not None else None
            if context.method_name != "__call__" or key not in layers:
                return next_fun(*args, **kwargs)
            scale, zp, dtype = acts[key]
            y = next_fun(_QDQ.bind(args[0], scale=scale, zero_point=zp, dtype=dtype), *args[1:], **kwargs)
            if key in plan and not isinstance(y, tuple):
                scale, zp, dtype = acts[plan[key]]
                y = _QDQ.bind(y, scale=scale, zero_point=zp, dtype=dtype)
            return y

        with nn.intercept_methods(interceptor):
            return model.apply({**variables, "params": params}, data.normalize(x, spec), train=False)

    proto = to_onnx(fn, spec.image_shape,
                    doc="jaxaccel int8 inference (QDQ, jaxaccel's calibration): raw uint8 NHWC "
                        "images -> logits",
                    metadata={"jaxaccel.kind": "int8", "jaxaccel.dataset": spec.name},
                    weight_dtype=weight_dtype)
    return {"bytes": save_model(proto, path), "num_classes": _num_classes(proto),
            "nodes": len(proto.graph.node), "opset": ONNX_OPSET, "int8_layers": len(layers)}


@functools.partial(jax.jit, static_argnames=("weight_config",))
def _weight_scales(kernels: Mapping[str, jax.Array], weight_config: QuantConfig) -> dict:
    """Each kernel's weight scale per output channel, as `int8.convert_int8` computes it."""
    return {k: jnp.broadcast_to(jnp.asarray(tensor_qparams(w, weight_config).scale, jnp.float32),
                                (w.shape[-1],)) for k, w in kernels.items()}


def _get(tree: Mapping, parts: Sequence[str]) -> Any:
    for p in parts:
        tree = tree[p]
    return tree


def _with_kernels(params: Mapping, kernels: Mapping[str, Any]) -> dict:
    """A copy of `params` with the kernels of `kernels`' module paths replaced."""
    def as_dict(tree):  # new containers, same leaves
        return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

    out = as_dict(params)
    for key, kernel in kernels.items():
        _get(out, key.split("/"))["kernel"] = kernel
    return out
