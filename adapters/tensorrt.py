"""TensorRT explicit-quantization ONNX export of a frozen subnet, and a checker for TensorRT's Q/DQ rules.

TensorRT (from its documentation and onnx-tensorrt's importer; see docs/targets.md) reads Q/DQ networks under these
rules; `check_tensorrt_onnx` names each violation by its rule id:

=========================  ================================================================================
rule id                    rule
=========================  ================================================================================
``opset``                  default-domain opset >= 13 (>= 21 for INT4)
``domain``                 standard ONNX QuantizeLinear/DequantizeLinear (not com.microsoft)
``dtype``                  INT8 Q/DQ (no UINT8; a Q without zero point outputs UINT8)
``int4``                   INT4 only as weight-only: DQ of a constant initializer, opset >= 21, even last dim
``zero-point``             zero point absent or all zeros (symmetric quantization)
``scale``                  scales are build-time constants, positive and finite
``per-channel-activation`` per-axis (1-D) scales only on constant weights
``axis``                   per-channel weights along the output-channel axis (Conv 0, Gemm transB=1 0, ...)
``qdq-pair``               no op between Q and DQ (e.g. no Clip); a DQ reads a Q or a constant weight
``residual-add``           both inputs of an Add of two activations come from DequantizeLinear
``no-qdq``                 the model holds Q/DQ nodes at all (is explicitly quantized)
=========================  ================================================================================

`export_to_tensorrt` refuses subnets TensorRT cannot run exactly (`tensorrt_subnet_problems`, rule ids
``zero-point``, ``activation-bits``, ``unsigned-activation``, ``axis``): asymmetric quantizers (nonzero zero point),
sub-8-bit activations (they would need Clip between Q and DQ) and, by default, activations on the unsigned grid.
Per-tensor weights are accepted (TensorRT's scale may be a scalar for weights too). Symmetric weights of any
bit-width are exact as INT8 codes (a b-bit grid is a subset of the INT8 grid), so sub-8-bit weights are accepted;
at opset >= 21 weights of <= 4 bits are written as INT4 where TensorRT allows it (even last dimension: in practice
Linear layers, not 3x3/1x1 convolutions).

Unsigned activations (after ReLU, symmetric, zero point 0 on [0, 2^b - 1]): TensorRT's INT8 grid is [-128, 127], so
a scale-`s` unsigned 8-bit cell has no exact INT8 equivalent. `unsigned_activations` (an `UnsignedActivations`)
chooses: ``REFUSE`` (the one default) raises; ``RESCALE``, an explicit opt-in that the CLI and the demo never use:
INT8 with scale 2 s (covers the same range, drops the lowest bit, so the engine is close to but not exactly the trained
subnet). Keeping the scale and
saturating at 127 s is not offered: calibrated post-ReLU ranges use the whole [0, 255] grid. The exact route is a
supernet whose activation quantizers use the signed grid (a ReLU output then only uses codes 0..127): calibrate it with
``Supernet.calibrate(batches, signed_activations=True)`` (``eqnet train --signed-activations``) before training.

With torch.ao's placement both inputs of every residual add are fake-quantized outputs of the previous ops (the
conv branch's quantizer and the identity/downsample quantizer), so the ``residual-add`` rule holds without adding
quantizers that training did not have; the export checks it and refuses models where it does not hold.
"""
from __future__ import annotations

import os

import numpy as np

from eqnet_plugin.export.ir import QParams, as_frozen

from ._onnx import constant_tensors, save_model_atomic
from ._policy import UnsignedActivations
from .onnx_qdq import INT4_OPSET, MIN_QDQ_OPSET, Encoding, build_qdq_model

__all__ = ["export_to_tensorrt", "check_tensorrt_onnx", "assert_tensorrt_onnx", "tensorrt_subnet_problems",
           "TensorRTCompatibilityError", "UnsignedActivations", "RULES"]


def _unsigned_policy(value) -> UnsignedActivations:
    if not isinstance(value, UnsignedActivations):
        raise TypeError(f"unsigned_activations must be an UnsignedActivations (REFUSE or RESCALE), got {value!r}; "
                        "e.g. unsigned_activations=UnsignedActivations.RESCALE")
    return value

RULES = ("opset", "domain", "dtype", "int4", "zero-point", "scale", "per-channel-activation", "axis", "qdq-pair",
         "residual-add", "no-qdq")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_INT8, _UINT8, _INT4, _UINT4 = 3, 2, 22, 21                  # onnx.TensorProto data types
_TYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 10: "FLOAT16", 16: "BFLOAT16", 21: "UINT4", 22: "INT4",
               17: "FLOAT8E4M3FN", 6: "INT32"}
_FP8 = (17, 18, 19, 20)


class TensorRTCompatibilityError(ValueError):
    """A subnet or ONNX model breaks TensorRT's explicit-quantization rules; `.problems` lists them."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:20]) + ("\n  ..." if len(self.problems) > 20 else "")
        super().__init__(f"{what} ({len(self.problems)} problem(s)):\n  {shown}")


# --- subnet rules ----------------------------------------------------------------------------------------------
def tensorrt_subnet_problems(frozen, opset: int = 17,
                             unsigned_activations: UnsignedActivations = UnsignedActivations.REFUSE) -> list[str]:
    """Why TensorRT cannot run subnet `frozen` exactly (empty list: it can).

    Args:
        frozen: FrozenSubnet, or Supernet (its active subnet).
        opset: the opset the export would use.
        unsigned_activations: see module docstring; only ``REFUSE`` reports unsigned activation grids.
    """
    unsigned_activations = _unsigned_policy(unsigned_activations)
    frozen = as_frozen(frozen)
    problems = []
    if opset < MIN_QDQ_OPSET:
        problems.append(f"opset: opset {opset} < {MIN_QDQ_OPSET}; TensorRT's Q/DQ import needs opset >= 13")
    for g, qp in frozen.qparams.items():
        kind = "weight" if frozen.is_weight(g) else "activation"
        asymmetric = bool((qp.zero_point != 0).any())
        if asymmetric:
            problems.append(f"zero-point: {kind} group {g!r} is asymmetric (zero point "
                            f"{qp.zero_point.flatten()[:4].tolist()}); TensorRT needs zero point 0: export a symmetric "
                            "subnet (e.g. Supernet.uniform(..., symmetric=True) or the TensorRT search profile)")
        if kind == "activation":
            if qp.bits != 8:
                problems.append(f"activation-bits: activation group {g!r} is {qp.bits}-bit; TensorRT runs INT8 "
                                "activations only (sub-8-bit grids need a Clip between Q and DQ, which TensorRT "
                                "rejects): use 8-bit activations for a TensorRT subnet")
            elif not qp.signed and not asymmetric and unsigned_activations is UnsignedActivations.REFUSE:
                problems.append(f"unsigned-activation: activation group {g!r} uses the unsigned grid "
                                f"[{qp.qmin}, {qp.qmax}] (data >= 0, e.g. after ReLU); TensorRT's INT8 is [-128, 127]. "
                                "Pass unsigned_activations=UnsignedActivations.RESCALE (INT8 at scale*2: one bit "
                                "less resolution, "
                                "not bit-exact), or calibrate the supernet with signed_activations=True before "
                                "training (Supernet.calibrate / `eqnet train --signed-activations`): exact")
            if qp.per_channel:
                problems.append(f"per-channel-activation: activation group {g!r} is per-channel")
        elif qp.per_channel and qp.axis != 0:
            problems.append(f"axis: weight group {g!r} is per-channel along axis {qp.axis}; TensorRT needs the "
                            "output-channel axis 0")
    return problems


def _trt_encoding(qp: QParams, is_weight: bool, int4_ok: bool, unsigned_activations: UnsignedActivations
                  ) -> Encoding:
    per_channel = qp.per_channel
    scale = qp.scale.detach().cpu().numpy().astype(np.float32)
    if not is_weight and not qp.signed:
        scale = scale * np.float32(2.0) if unsigned_activations is UnsignedActivations.RESCALE else scale
    scale = scale if per_channel else scale.reshape(())
    dtype = _INT4 if (is_weight and int4_ok and qp.bits <= 4) else _INT8
    zp = np.zeros(scale.shape, dtype=np.int8)
    return Encoding(dtype, scale, zp, qp.axis if per_channel else None, None)


def export_to_tensorrt(frozen, example_inputs: tuple, path: str | os.PathLike, *, cfg=None, opset: int = 17,
                       unsigned_activations: UnsignedActivations = UnsignedActivations.REFUSE) -> str:
    """Write subnet `frozen` as a TensorRT explicit-quantization ONNX model (see module docstring).

    Args:
        frozen: a `FrozenSubnet`, or a `Supernet` (with `cfg`, default its active subnet).
        example_inputs: tuple of input tensors for tracing (batch dimension exported as dynamic).
        path: output file, written atomically after the model passes `check_tensorrt_onnx`.
        cfg: the subnet, when `frozen` is a Supernet.
        opset: 17 (INT8 everywhere) or >= 21 (weights of <= 4 bits as INT4 where the last dim is even).
        unsigned_activations: `UnsignedActivations` for activations on the unsigned grid.
    Returns:
        `path` as a string.
    Raises:
        TensorRTCompatibilityError: the subnet breaks a TensorRT rule (message lists every rule and the fix), or the
            exported graph does (e.g. a residual add with an unquantized input); nothing is written.
    """
    frozen = as_frozen(frozen, cfg)
    problems = tensorrt_subnet_problems(frozen, opset, unsigned_activations)
    if problems:
        raise TensorRTCompatibilityError("TensorRT cannot run this subnet", problems)
    layer_of = {lay.weight_group: lay for lay in frozen.layers}

    def encode(group: str, qp: QParams, is_weight: bool) -> Encoding:
        int4_ok = False
        if is_weight and opset >= INT4_OPSET:
            shape = frozen.layer_module(layer_of[group].name).weight.shape
            int4_ok = shape[-1] % 2 == 0
        return _trt_encoding(qp, is_weight, int4_ok, unsigned_activations)

    model = build_qdq_model(frozen, example_inputs, opset, encode)
    violations = check_tensorrt_onnx(model)
    if violations:
        raise TensorRTCompatibilityError("the exported graph breaks TensorRT's Q/DQ rules", violations)
    return save_model_atomic(model, path)


# --- ONNX checker ------------------------------------------------------------------------------------------------
class _Graph:
    """Constants, producers and consumers of an ONNX graph."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._tensor = constant_tensors(g)
        self._np = numpy_helper

    def constant(self, name: str):
        """(array, onnx data type) of a constant tensor, or None."""
        t = self._tensor(name)
        return None if t is None else (self._np.to_array(t), t.data_type)

    def is_initializer(self, name: str) -> bool:
        """A weight-like constant: an initializer (possibly through Identity), not a computed tensor."""
        return self.constant(name) is not None


def _name(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _attr(node, key: str, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def _expected_axis(consumer) -> int | None:
    """The output-channel axis of the weight input of `consumer`, or None when it is not a weighted op."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return -1
    return None


def _qdq_type(node, g: _Graph) -> int | None:
    """ONNX data type of the integer side of a Q or DQ node."""
    if len(node.input) > 2 and node.input[2]:
        c = g.constant(node.input[2])
        if c is not None:
            return c[1]
    if node.op_type == "QuantizeLinear":
        out = _attr(node, "output_dtype", 0)
        return out or _UINT8                   # ONNX: no zero point and no output_dtype -> uint8
    c = g.constant(node.input[0])
    if c is not None:
        return c[1]
    src = g.producer.get(node.input[0])
    return _qdq_type(src, g) if src is not None and src.op_type == "QuantizeLinear" else None


def check_tensorrt_onnx(model_or_path) -> list[str]:
    """Every violation of TensorRT's explicit-quantization rules in an ONNX model (empty list: none found).

    Each entry starts with its rule id (see the module docstring), e.g. ``"zero-point: node 'x.quantize': ..."``.

    Args:
        model_or_path: an `onnx.ModelProto` or a path to an .onnx file.
    """
    import onnx

    model = onnx.load(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    g = _Graph(model)
    out: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_QDQ_OPSET:
        out.append(f"opset: default-domain opset {opset} < {MIN_QDQ_OPSET}")
    qdq = [n for n in g.nodes if n.op_type in _QDQ]
    if not qdq:
        out.append("no-qdq: the model has no QuantizeLinear/DequantizeLinear nodes (not explicitly quantized)")
    for n in qdq:
        out.extend(_check_qdq_node(n, g, opset))
    out.extend(_check_adds(g))
    return out


def _check_qdq_node(n, g: _Graph, opset: int) -> list[str]:
    out: list[str] = []
    who = f"node {_name(n)!r} ({n.op_type})"
    if n.domain not in ("", "ai.onnx"):
        out.append(f"domain: {who} is in domain {n.domain!r}; TensorRT reads standard ONNX Q/DQ only")
    # scale
    scale = g.constant(n.input[1]) if len(n.input) > 1 else None
    if scale is None:
        out.append(f"scale: {who} scale {n.input[1] if len(n.input) > 1 else '?'!r} is not a build-time constant")
        scale_arr = None
    else:
        scale_arr = scale[0].astype(np.float64)
        if not np.all(np.isfinite(scale_arr)) or np.any(scale_arr <= 0):
            out.append(f"scale: {who} has non-positive or non-finite scale values (min {scale_arr.min():.3g})")
    # zero point and type
    dtype = _qdq_type(n, g)
    if len(n.input) > 2 and n.input[2]:
        zp = g.constant(n.input[2])
        if zp is None:
            out.append(f"zero-point: {who} zero point is not a constant")
        elif np.any(zp[0].astype(np.int64) != 0):
            out.append(f"zero-point: {who} has nonzero zero point {zp[0].flatten()[:4].tolist()} (asymmetric); "
                       "TensorRT needs zero point 0")
    data_is_const = g.is_initializer(n.input[0])
    if dtype in (_UINT8, _UINT4):
        out.append(f"dtype: {who} uses {_TYPE_NAMES[dtype]}; TensorRT's Q/DQ are signed INT8 (INT4 weights)"
                   + (" - a QuantizeLinear without zero point outputs UINT8" if n.op_type == "QuantizeLinear"
                      and not (len(n.input) > 2 and n.input[2]) else ""))
    elif dtype == _INT4:
        if n.op_type != "DequantizeLinear" or not data_is_const:
            out.append(f"int4: {who} quantizes a computed tensor to INT4; TensorRT's INT4 is weight-only "
                       "(DequantizeLinear of a constant weight)")
        else:
            w = g.constant(n.input[0])[0]
            if opset < INT4_OPSET:
                out.append(f"int4: {who} uses INT4 at opset {opset}; INT4 needs opset >= {INT4_OPSET}")
            if w.ndim == 0 or w.shape[-1] % 2:
                out.append(f"int4: {who} INT4 weight shape {tuple(w.shape)} has an odd last dimension")
    elif dtype not in (_INT8,) + _FP8 and dtype is not None:
        out.append(f"dtype: {who} uses type {_TYPE_NAMES.get(dtype, dtype)}; TensorRT's Q/DQ are INT8/FP8/INT4")
    # granularity
    if scale_arr is not None and scale_arr.size > 1:
        if not data_is_const:
            out.append(f"per-channel-activation: {who} has a per-channel scale ({scale_arr.size} values) on a "
                       "computed tensor; TensorRT allows per-axis scales only on weights")
        else:
            out.extend(_check_weight_axis(n, g, who))
    # Q -> DQ pairing
    if n.op_type == "QuantizeLinear":
        for c in g.consumers.get(n.output[0], []):
            if c.op_type != "DequantizeLinear":
                out.append(f"qdq-pair: {who} feeds {c.op_type} {_name(c)!r}; TensorRT allows no op between Q and DQ")
    else:
        src = g.producer.get(n.input[0])
        if not data_is_const and (src is None or src.op_type != "QuantizeLinear"):
            what = "a graph input" if src is None else f"{src.op_type} {_name(src)!r}"
            out.append(f"qdq-pair: {who} reads {what}, not a QuantizeLinear or a constant weight")
    return out


def _check_weight_axis(n, g: _Graph, who: str) -> list[str]:
    axis = _attr(n, "axis", 1)
    rank = g.constant(n.input[0])[0].ndim
    dq_out = n.output[0]
    if n.op_type == "QuantizeLinear":          # float weight -> Q -> DQ -> layer
        dqs = [c for c in g.consumers.get(dq_out, []) if c.op_type == "DequantizeLinear"]
        dq_out = dqs[0].output[0] if dqs else dq_out
    out = []
    for c in g.consumers.get(dq_out, []):
        want = _expected_axis(c)
        if want is None or (len(c.input) > 1 and c.input[1] != dq_out):
            continue
        if axis % max(rank, 1) != want % max(rank, 1):
            out.append(f"axis: {who} quantizes the {c.op_type} {_name(c)!r} weight per-channel along axis {axis}; "
                       f"TensorRT needs the output-channel axis {want}")
    return out


def _check_adds(g: _Graph) -> list[str]:
    out = []
    for n in g.nodes:
        if n.op_type not in ("Add", "Sum") or len(n.input) < 2:
            continue
        inputs = [i for i in n.input if i and not g.is_initializer(i)]
        if len(inputs) < 2:
            continue                            # a bias add (one constant input) is not a residual add
        srcs = [g.producer.get(i) for i in inputs]
        if not any(src is not None and src.op_type == "DequantizeLinear" for src in srcs):
            continue                            # an add of float tensors (e.g. a transformer's) runs in float
        for i in inputs:
            src = g.producer.get(i)
            if src is None or src.op_type != "DequantizeLinear":
                what = "a graph input" if src is None else f"{src.op_type} {_name(src)!r}"
                out.append(f"residual-add: {n.op_type} {_name(n)!r} input {i!r} comes from {what}, not a "
                           "DequantizeLinear; TensorRT fuses residual adds only when both inputs are quantized")
    return out


def assert_tensorrt_onnx(model_or_path) -> None:
    """Raise `TensorRTCompatibilityError` listing every violation found by `check_tensorrt_onnx`."""
    problems = check_tensorrt_onnx(model_or_path)
    if problems:
        raise TensorRTCompatibilityError("the ONNX model breaks TensorRT's Q/DQ rules", problems)
