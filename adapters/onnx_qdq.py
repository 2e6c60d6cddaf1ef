"""Generic ONNX Q/DQ export of a frozen subnet, for ONNX Runtime.

Every quantized tensor of the `FrozenSubnet` becomes explicit QuantizeLinear / DequantizeLinear nodes at exactly the
place torch.ao put the fake-quant we trained with (the markers of `adapters._onnx.export_marked`):

* weights: the integer codes are computed here with `QParams.quantize` (the arithmetic of training) and stored as an
  int8 (or int4) initializer feeding one DequantizeLinear (per-channel: 1-D scale and zero point with ``axis``). This
  is the pattern ONNX Runtime's own quantizer writes, so Conv/Gemm fuse into QLinearConv/QGemm, and the weights are
  bit-exact whatever their bit-width (codes of a b-bit grid are valid int8 codes).
  With ``low_bit=LowBit.INT4`` (opset >= 21) weights of <= 4 bits are stored as INT4.
* activations: ``QuantizeLinear -> DequantizeLinear`` with a scalar scale and a zero point whose type is the grid's
  (uint8 for the unsigned grid, int8 for the signed one). Sub-8-bit grids keep the 8-bit container and add a
  ``Clip(qmin, qmax)`` between Q and DQ. They are not written as INT4/UINT4 even with ``LowBit.INT4``: ONNX
  Runtime 1.32 fuses ``DQ(uint4) -> Conv`` into a QLinearConv that rejects 4-bit inputs (the default session fails
  to load the model), its MaxPool rejects uint4 inputs, and ONNX Clip has no 4-bit types for 2/3-bit grids.

torch's exporters reject or silently drop sub-8-bit ranges (see docs/targets.md), and ONNX Runtime's
`quantize_static` places Q/DQ by its own rules (e.g. it does not re-quantize after an average pool as torch.ao
does), so the nodes are written here explicitly.

ONNX's QuantizeLinear computes ``round(x / scale)`` where training computes ``round(x * (1 / scale))``; the two
differ on exact rounding ties. Sub-8-bit activations (which carry a Clip, so ONNX Runtime never fuses them) and the
re-quantization after a global pool (where ties are frequent) are therefore written as ``Mul(x, 1 / scale) ->
QuantizeLinear(scale 1) -> [Clip] -> DequantizeLinear(scale)``, which rounds exactly as training does. The global
pool itself is `ExactGlobalAvgPool` (float64 sum, ``Cast -> ReduceSum -> Div -> Cast``), so its value does not
depend on the summation order either. Remaining differences come from convolutions summing in another order and
tipping a value across a rounding boundary, which is why parity is measured in LSBs (tests).

``rounding=Rounding.INTEGER_KERNELS`` writes instead the form ONNX Runtime fuses at every bit-width: plain
``QuantizeLinear -> Clip(int) -> DequantizeLinear`` (no reciprocal Mul, no float bias Add; ORT runs the Clip on the
uint8/int8 codes between QLinearConv/QLinearAdd kernels), sub-8-bit weight codes stored times ``2**(8 - bits)`` at
scale ``s / 2**(8 - bits)`` (the same values; ORT's int32 bias is then rounded as finely as at 8 bits), float
Relu/ReLU6 clamps folded into the integer Clip, and the float64 pool only where an activation grid is sub-8-bit.
Run as written (ORT_DISABLE_ALL) it computes the subnet like the default form; ORT's default session runs its own
integer arithmetic (int32 bias, integer requantization), which moves sub-8-bit outputs by more LSBs than at 8 bits.

Shared quantizers: torch.ao re-uses one fake-quant for an op's input and output (ReLU -> average pool -> ...); each
use gets its own Q/DQ pair with the same scale and zero point, as in training.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from eqnet_plugin.export.ir import FrozenLayer, FrozenSubnet, QParams, as_frozen

from ._onnx import POOL_OUTPUT_OPS, constants, export_marked, replace_markers, save_model_atomic
from ._policy import LowBit

__all__ = ["export_onnx", "build_qdq_model", "generic_encoding", "int_tensor", "Encoding", "LowBit", "Rounding"]
MIN_QDQ_OPSET = 13          # per-axis QuantizeLinear/DequantizeLinear
INT4_OPSET = 21             # INT4/UINT4 tensor types


class Rounding(enum.Enum):
    """Which arithmetic `export_onnx` writes sub-8-bit activations and global pools in.

    TRAINING: rounds exactly as training (reciprocal-form Q, float64 global pool, float bias Adds for sub-8-bit
        layers); ONNX Runtime runs it graph-as-written in float (its reference parity is the tests'), sub-8-bit
        layers are not fused into integer kernels.
    INTEGER_KERNELS: every layer in the pattern ONNX Runtime fuses into its INT8 kernels (QLinearConv, QGemm,
        QLinearAdd, QLinearGlobalAveragePool), the sub-8-bit range as an integer Clip between Q and DQ (ONNX
        Runtime's Clip runs on uint8/int8 codes); ``x / scale`` rounding and a float32 pool, i.e. the arithmetic of
        ONNX Runtime's default session for 8-bit layers, for every bit-width.
    """
    TRAINING = "training"
    INTEGER_KERNELS = "integer_kernels"


@dataclass(frozen=True)
class Encoding:
    """How one quantized tensor is written in ONNX.

    Attributes:
        dtype: ONNX TensorProto type of the integer tensor (INT8, UINT8, INT4, UINT4).
        scale: float32 array, shape () per-tensor or (C,) per-channel.
        zero_point: integer array of the same shape (values in the `dtype` range).
        axis: channel axis for per-channel tensors, else None.
        clip: integer range to Clip to between Q and DQ (sub-8-bit grids in 8-bit containers), else None.
        reciprocal: write an activation's Q as ``Mul(x, 1/scale) -> QuantizeLinear(scale 1)``, which rounds
            ``x * (1 / scale)`` exactly as training does, instead of ONNX's ``x / scale`` (the two differ on ties).
        code_shift: weights only: codes stored times ``2**code_shift`` (`scale` and `zero_point` already account for
            it): a b-bit grid written as 8-bit codes with a finer step, the same values, so that a runtime rounding
            the bias at ``s_in * s_w`` (ONNX Runtime's integer kernels) rounds it as finely as for 8-bit weights.
    """

    dtype: int
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    clip: tuple[int, int] | None = None
    reciprocal: bool = False
    code_shift: int = 0


def _onnx_int_types():
    from onnx import TensorProto
    return {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
            (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}


def int_tensor(name: str, dtype: int, values: np.ndarray):
    """An integer initializer of ONNX type `dtype` (INT8/UINT8 via raw bytes; INT4/UINT4 packed by onnx)."""
    from onnx import TensorProto, helper, numpy_helper

    if dtype in (TensorProto.INT8, TensorProto.UINT8):
        np_dtype = np.int8 if dtype == TensorProto.INT8 else np.uint8
        return numpy_helper.from_array(np.asarray(values).astype(np_dtype), name)
    values = np.asarray(values)
    return helper.make_tensor(name, dtype, list(values.shape), values.reshape(-1).astype(np.int64).tolist())


def _np_array(values: torch.Tensor, per_channel: bool, dtype) -> np.ndarray:
    arr = values.detach().cpu().numpy().astype(dtype)
    return arr if per_channel else arr.reshape(())


def generic_encoding(qp: QParams, is_weight: bool, low_bit: LowBit = LowBit.CLIP, opset: int = 17) -> Encoding:
    """The `Encoding` `export_onnx` uses for `qp` (see module docstring).

    ``LowBit.INT4`` stores weights of <= 4 bits as INT4 (opset >= 21). Activations always use 8-bit containers:
    ONNX Runtime 1.32 fuses ``DQ(uint4) -> Conv`` into a QLinearConv that rejects 4-bit inputs (invalid graph at
    the default optimization level), and its MaxPool rejects uint4 inputs.
    """
    types = _onnx_int_types()
    use_int4 = is_weight and low_bit is LowBit.INT4 and opset >= INT4_OPSET and qp.bits <= 4
    container = 4 if use_int4 else 8
    dtype = types[(container, qp.signed)]
    clip = (qp.qmin, qp.qmax) if qp.bits < container and not is_weight else None   # weights: codes are constants
    zp_np = np.int8 if qp.signed else np.uint8
    return Encoding(dtype, _np_array(qp.scale, qp.per_channel, np.float32),
                    _np_array(qp.zero_point, qp.per_channel, zp_np), qp.axis, clip,
                    reciprocal=clip is not None)


def _split_bias(node, bias: np.ndarray, weight_rank: int, new_inits: dict) -> list:
    """Rewrite ``Conv/Gemm(x, W, b)`` as ``Add(Conv/Gemm(x, W), b)``; returns [the new Add node]."""
    from onnx import helper, numpy_helper

    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = bias * np.float32(attrs.get("beta", 1.0))                      # (C,) broadcasts over (N, C)
    else:
        bias = bias.reshape((-1,) + (1,) * (weight_rank - 2))                 # (C, 1, 1) for 2-D convs
    name = f"{node.output[0]}.bias"
    new_inits[name] = numpy_helper.from_array(bias.astype(np.float32), name)
    out = node.output[0]
    node.output[0] = f"{out}.no_bias"
    del node.input[2:]
    return [helper.make_node("Add", [node.output[0], name], [out], name=f"{out}.add_bias")]


def build_qdq_model(frozen: FrozenSubnet, example_inputs: tuple, opset: int,
                    encode: Callable[[str, QParams, bool], Encoding],
                    float_bias_add: Callable[[FrozenLayer], bool] | None = None, exact_pool: bool = False):
    """Export `frozen` with Q/DQ nodes written by ``encode(group, qparams, is_weight)``; returns the onnx.ModelProto.

    Weight groups become integer initializers + DequantizeLinear; activation groups become QuantizeLinear
    (-> Clip) -> DequantizeLinear. Unused float weight initializers are removed. Layers for which
    ``float_bias_add(layer)`` is true get their bias as a separate float Add after the Conv/Gemm (see
    `export_onnx`). ``exact_pool=True`` keeps `ExactGlobalAvgPool` as its float64 ONNX ops and quantizes a pool's
    output in the reciprocal form (see `Encoding`); otherwise global pools become GlobalAveragePool.
    """
    from onnx import helper

    if opset < MIN_QDQ_OPSET:
        raise ValueError(f"opset {opset} is too old for per-channel Q/DQ; use opset >= {MIN_QDQ_OPSET}")
    model = export_marked(frozen, example_inputs, opset=opset, exact_pool=exact_pool)
    graph = model.graph
    producer_op = {o: n.op_type for n in graph.node for o in n.output}
    constant = constants(graph)
    layer_of_weight = frozen.weight_groups()
    new_inits: dict[str, object] = {}
    encodings: dict[str, Encoding] = {}
    weight_outputs: dict[str, FrozenLayer] = {}

    def qparams_inits(group: str, enc: Encoding) -> tuple[str, str]:
        s_name, z_name = f"{group}.scale", f"{group}.zero_point"
        if s_name not in new_inits:
            new_inits[s_name] = helper.make_tensor(s_name, 1, list(enc.scale.shape), enc.scale.reshape(-1).tolist())
            new_inits[z_name] = int_tensor(z_name, enc.dtype, enc.zero_point)
        return s_name, z_name

    def make_nodes(group: str, src: str, dst: str) -> list:
        if group not in frozen.qparams:
            raise KeyError(f"marker for unknown group {group!r}; the FrozenSubnet and its graph disagree")
        qp = frozen.qparams[group]
        is_weight = frozen.is_weight(group)
        enc = encodings.setdefault(group, encode(group, qp, is_weight))
        axis = {} if enc.axis is None else {"axis": int(enc.axis)}
        s_name, z_name = qparams_inits(group, enc)
        if is_weight:
            w = constant(src)
            if w is None:
                raise RuntimeError(f"weight marker {group!r} does not read a constant ({src!r}); please report the "
                                   "model (weights computed in the graph are not supported)")
            codes = qp.quantize(torch.from_numpy(w.copy())).numpy()             # int32 codes on qp's grid
            codes = codes * (1 << enc.code_shift)
            q_name = f"{group}.weight_quantized"
            new_inits[q_name] = int_tensor(q_name, enc.dtype, codes)
            weight_outputs[dst] = layer_of_weight[group]
            return [helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dst], name=f"{dst}.dq", **axis)]
        q_out = f"{dst}.q"
        nodes = []
        if enc.reciprocal or (exact_pool and producer_op.get(src) in POOL_OUTPUT_OPS):
            # x * (1/s) rounded, as in training (ONNX's x / s rounds ties, frequent after a pool, differently)
            r_name, one = f"{group}.inv_scale", "eqnet.one"
            new_inits.setdefault(r_name, helper.make_tensor(r_name, 1, list(enc.scale.shape),
                                                            (np.float32(1) / enc.scale).reshape(-1).tolist()))
            new_inits.setdefault(one, helper.make_tensor(one, 1, [], [1.0]))
            nodes.append(helper.make_node("Mul", [src, r_name], [f"{dst}.scaled"], name=f"{dst}.scale"))
            src, s_name = f"{dst}.scaled", one
        nodes.append(helper.make_node("QuantizeLinear", [src, s_name, z_name], [q_out], name=f"{dst}.quantize",
                                      **axis))
        if enc.clip is not None:
            lo, hi = f"{group}.qmin", f"{group}.qmax"
            if lo not in new_inits:
                new_inits[lo] = int_tensor(lo, enc.dtype, np.array(enc.clip[0]))
                new_inits[hi] = int_tensor(hi, enc.dtype, np.array(enc.clip[1]))
            nodes.append(helper.make_node("Clip", [q_out, lo, hi], [f"{dst}.clip"], name=f"{dst}.clip"))
            q_out = f"{dst}.clip"
        nodes.append(helper.make_node("DequantizeLinear", [q_out, f"{group}.scale", z_name], [dst],
                                      name=f"{dst}.dequantize", **axis))
        return nodes

    replace_markers(model, make_nodes)
    if float_bias_add is not None:
        nodes = []
        for node in graph.node:
            nodes.append(node)
            lay = weight_outputs.get(node.input[1]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 \
                else None
            if lay is None or len(node.input) < 3 or not node.input[2] or not float_bias_add(lay):
                continue
            bias = constant(node.input[2])
            if bias is not None:
                rank = frozen.layer_module(lay.name).weight.dim()
                nodes.extend(_split_bias(node, bias, rank, new_inits))
        del graph.node[:]
        graph.node.extend(nodes)
    graph.initializer.extend(new_inits.values())
    _drop_unused(graph)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = opset
    return model


def _drop_unused(graph) -> None:
    """Remove nodes and initializers that no graph output depends on (e.g. float weights replaced by codes)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    needed: set[str] = set()
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:                      # bounded: each name is expanded once
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        i = producer.get(name)
        if i is not None and i not in live:
            live.add(i)
            stack.extend(x for x in nodes[i].input if x)
    keep_inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(n for i, n in enumerate(nodes) if i in live)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)


def _int_type(value: np.ndarray) -> int:
    from onnx import TensorProto
    return TensorProto.INT8 if value.dtype == np.int8 else TensorProto.UINT8


def _drop_redundant_clamps(model) -> int:
    """Bypass each float Relu / Clip whose only consumer is a QuantizeLinear followed by an integer Clip that
    already clamps at least as far (``lo <= (qmin - zp) * s`` and ``hi >= (qmax - zp) * s``): the codes are the same
    (a clamped value rounds to a code beyond the integer Clip's bound), and ONNX Runtime, which removes a Relu/Clip
    before Q only when it covers the whole 8-bit container, can then fuse the layer (MobileNetV2's ReLU6 at
    sub-8-bit grids). A float Clip whose upper bound lies inside the grid moves that bound onto the integer Clip
    (``round(min(x, hi) / s) = min(round(x / s), round(hi / s))``). Returns the number of nodes bypassed."""
    from ._onnx import constants

    graph = model.graph
    const = constants(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    bypass = {}
    for q in graph.node:
        users = consumers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []
        clamp = producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if len(users) != 1 or users[0].op_type != "Clip" or clamp is None or clamp.op_type not in ("Relu", "Clip") \
                or len(consumers.get(clamp.output[0], [])) != 1 or clamp.output[0] in graph_outputs:
            continue
        scale, zp = const(q.input[1]), const(q.input[2]) if len(q.input) > 2 else np.zeros((), np.uint8)
        qmin, qmax = const(users[0].input[1]), const(users[0].input[2])
        if scale is None or zp is None or qmin is None or qmax is None or scale.size != 1:
            continue
        lo_q = (float(qmin) - float(zp)) * float(scale)
        hi_q = (float(qmax) - float(zp)) * float(scale)
        if clamp.op_type == "Relu":
            lo, hi = 0.0, np.inf
        else:
            lo_v = const(clamp.input[1]) if len(clamp.input) > 1 and clamp.input[1] else np.array(-np.inf)
            hi_v = const(clamp.input[2]) if len(clamp.input) > 2 and clamp.input[2] else np.array(np.inf)
            if lo_v is None or hi_v is None:
                continue
            lo, hi = float(lo_v), float(hi_v)
        if lo <= lo_q and hi >= hi_q:
            bypass[clamp.output[0]] = clamp.input[0]
        elif clamp.op_type == "Clip" and lo <= lo_q:
            # round(min(x, hi) / s) = min(round(x / s), round(hi / s)): move the bound onto the integer Clip
            code = int(np.clip(np.rint(np.float32(hi) / scale.astype(np.float32)) + int(zp), int(qmin), int(qmax)))
            name = f"{users[0].output[0]}.qmax_tight"
            graph.initializer.append(int_tensor(name, _int_type(qmax), np.array(code)))
            users[0].input[2] = name
            bypass[clamp.output[0]] = clamp.input[0]
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in bypass:
                n.input[i] = bypass[name]
    _drop_unused(graph)
    return len(bypass)


def export_onnx(frozen, example_inputs: tuple, path: str | os.PathLike, *, cfg=None, opset: int | None = None,
                low_bit: LowBit = LowBit.CLIP, rounding: Rounding = Rounding.TRAINING) -> str:
    """Write `frozen` as an ONNX model with Q/DQ nodes at every quantized tensor, runnable by ONNX Runtime.

    Args:
        frozen: a `FrozenSubnet`, or a `Supernet` (with `cfg`, default its active subnet).
        example_inputs: tuple of input tensors for tracing (the batch dimension is exported as dynamic).
        path: output file; written atomically (nothing is left behind on error).
        cfg: the subnet, when `frozen` is a Supernet.
        opset: ONNX opset (default 17, or 21 for ``LowBit.INT4``).
        low_bit: ``LowBit.CLIP``: sub-8-bit activations in 8-bit containers with Clip between Q and DQ, sub-8-bit
            weights as int8 codes; ``LowBit.INT4``: in addition, weights of <= 4 bits stored as INT4 (opset >= 21).
            Activations keep 8-bit containers in both modes (see `generic_encoding`).
        rounding: ``Rounding.TRAINING`` rounds as training does (the parity-tested form);
            ``Rounding.INTEGER_KERNELS`` writes every layer, sub-8-bit ones included, in the pattern ONNX Runtime
            fuses into INT8 kernels (same speed at every bit-width; ONNX Runtime's integer arithmetic, see `Rounding`).
    Returns:
        `path` as a string.
    Raises:
        TypeError: `low_bit` is not a `LowBit` or `rounding` not a `Rounding`.
        ValueError: ``LowBit.INT4`` with opset < 21.

    Numerics: ONNX Runtime executing the graph as written (``GraphOptimizationLevel.ORT_DISABLE_ALL``) computes
    the subnet's arithmetic; results differ from torch only where a convolution's float summation order tips a
    value across a rounding boundary (the tests measure this in output LSBs; pools and sub-8-bit activations are
    written to round exactly as training, see the module docstring). Its default
    session instead runs integer kernels (QLinearConv, QLinearAdd, QLinearGlobalAveragePool) and first rounds float
    biases to int32 at scale ``s_in * s_w`` (its WeightBiasQuantization pass): fast for 8-bit layers, and a small
    but real change of arithmetic (docs/targets.md has the measured top-1 agreement). Pass
    ``disabled_optimizers=["WeightBiasQuantization"]`` to ``InferenceSession`` to keep float biases. Layers with a
    sub-8-bit input or weight grid (no integer kernels exist for them) get their bias as a separate float Add,
    which that pass leaves alone.

    Example:
        >>> export_onnx(freeze(sn, cfg), (torch.randn(1, 3, 224, 224),), "runs/subnet.onnx")  # doctest: +SKIP
    """
    if not isinstance(low_bit, LowBit):
        raise TypeError(f"low_bit must be a LowBit (CLIP or INT4), got {low_bit!r}; e.g. low_bit=LowBit.INT4")
    if not isinstance(rounding, Rounding):
        raise TypeError(f"rounding must be a Rounding (TRAINING or INTEGER_KERNELS), got {rounding!r}; e.g. "
                        "rounding=Rounding.INTEGER_KERNELS")
    if opset is None:
        opset = INT4_OPSET if low_bit is LowBit.INT4 else 17
    if low_bit is LowBit.INT4 and opset < INT4_OPSET:
        raise ValueError(f"LowBit.INT4 needs the INT4/UINT4 types of opset {INT4_OPSET}; pass opset="
                         f"{INT4_OPSET} (or LowBit.CLIP for 8-bit containers)")
    frozen = as_frozen(frozen, cfg)

    def low_bit_layer(lay: FrozenLayer) -> bool:
        groups = [lay.weight_group] + ([lay.input_group] if lay.input_group else [])
        return any(frozen.qparams[g].bits < 8 for g in groups)

    exact = rounding is Rounding.TRAINING

    def encode(group: str, qp: QParams, is_weight: bool) -> Encoding:
        enc = generic_encoding(qp, is_weight, low_bit, opset)
        if exact:
            return enc
        if is_weight and qp.bits < 8 and enc.dtype in (TensorProto.INT8, TensorProto.UINT8):
            k = 8 - qp.bits          # b-bit codes * 2^k stay in the 8-bit range; scale / 2^k is exact
            return replace(enc, scale=(enc.scale / np.float32(2 ** k)).astype(np.float32),
                           zero_point=(enc.zero_point.astype(np.int32) << k).astype(enc.zero_point.dtype),
                           code_shift=k)
        return replace(enc, reciprocal=False)

    from onnx import TensorProto

    # the exact (float64) pool and its reciprocal-form Q where a sub-8-bit grid makes its rounding ties matter; an
    # all-8-bit subnet keeps the pool ONNX Runtime fuses into QLinearGlobalAveragePool
    exact_pool = exact or any(frozen.qparams[g].bits < 8 for g in frozen.qparams if not frozen.is_weight(g))
    model = build_qdq_model(frozen, example_inputs, opset, encode,
                            float_bias_add=low_bit_layer if exact else None, exact_pool=exact_pool)
    if not exact:
        _drop_redundant_clamps(model)
    return save_model_atomic(model, path)
