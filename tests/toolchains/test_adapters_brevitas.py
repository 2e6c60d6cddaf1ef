"""Brevitas adapter: bit-exact parity of `to_brevitas` with the frozen subnet, and Brevitas' QCDQ / QONNX exports.

Parity is measured against the FrozenSubnet (the export IR; its agreement with the supernet's eval output under
`activate(cfg)` is freeze's contract, tested with freeze). ONNX Runtime parity is measured in LSBs of the output
scale.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import eqnet_plugin
from eqnet_plugin import ElasticSpace, Supernet
from eqnet_plugin.app import models
from eqnet_plugin.adapters.brevitas import export_brevitas_qcdq, export_brevitas_qonnx, to_brevitas
from _ort import ort_int8_kernels_exact
from _supernets import moved_bn_supernet
from eqnet_plugin.export.freeze import FrozenSubnet, QParams, QuantPoint, freeze


# --- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_resnet():
    return moved_bn_supernet(models.TinyResNet, (1, 16, 16))            # the full paper space: 2..8 bits, sym/asym, pc/pt


@pytest.fixture(scope="module")
def tiny_mobilenet():
    space = ElasticSpace(weight_bits=(3, 4, 8), act_bits=(3, 4, 8))
    return moved_bn_supernet(models.TinyMobileNetV2, (1, 16, 16), space, eqnet_plugin.elastic_backend_config())


@pytest.fixture(scope="module")
def resnet18():
    import torchvision
    space = ElasticSpace(weight_bits=(4, 8), act_bits=(4, 8))
    return moved_bn_supernet(lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), space)


def _inputs(shape, n=32, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "w8a8_sym_tensor": lambda sn: sn.uniform(8, 8, symmetric=True, per_channel=False),
    "w4a4_asym_channel": lambda sn: sn.uniform(4, 4, symmetric=False, per_channel=True),
    "w8sym_channel_a4asym": lambda sn: sn.uniform(8, 4, symmetric=True, per_channel=True, act_symmetric=False),
    "mixed": lambda sn: sn.sample(torch.Generator().manual_seed(3)),
    "min_asym_tensor": lambda sn: sn.min_config(symmetric=False, per_channel=False),
}


def _check_bit_exact(sn: Supernet, cfg, x: torch.Tensor) -> nn.Module:
    import brevitas.nn as qnn

    frozen = freeze(sn, cfg)
    bm = to_brevitas(frozen)
    # Structure: Brevitas layers and one QuantIdentity per activation group, no eqnet quantizer left.
    for lay in frozen.layers:
        mod = bm.get_submodule(lay.name)
        inner = mod[0] if isinstance(mod, nn.Sequential) else mod
        assert isinstance(inner, (qnn.QuantConv1d, qnn.QuantConv2d, qnn.QuantConv3d, qnn.QuantLinear)), lay.name
    idents = {id(m) for m in bm.modules() if isinstance(m, qnn.QuantIdentity)}
    assert len(idents) == len(frozen.quant_points())
    assert not any(isinstance(m, QuantPoint) for m in bm.modules())
    with torch.no_grad():
        ref = frozen(x)
        out = bm(x)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"
    return bm


# --- bit-exact parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_brevitas_bit_exact_tiny_resnet(tiny_resnet, name):
    cfg = CONFIGS[name](tiny_resnet)
    if name == "mixed":                 # the sample really mixes bits, symmetry and granularity
        choices = list(cfg.groups.values())
        assert len({c.bits for c in choices}) >= 4
        assert {c.symmetric for c in choices} == {True, False}
        assert {c.per_channel for c in choices} == {True, False}
    _check_bit_exact(tiny_resnet, cfg, _inputs((1, 16, 16)))


@pytest.mark.parametrize("name", ["w8a8_sym_tensor", "w4a4_asym_channel", "mixed"])
def test_to_brevitas_bit_exact_tiny_mobilenet(tiny_mobilenet, name):
    _check_bit_exact(tiny_mobilenet, CONFIGS[name](tiny_mobilenet), _inputs((1, 16, 16)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w8a8_sym_tensor", "w4a4_asym_channel", "mixed"])
def test_to_brevitas_bit_exact_resnet18(resnet18, name):
    _check_bit_exact(resnet18, CONFIGS[name](resnet18), _inputs((3, 32, 32), n=8))


def test_to_brevitas_accepts_supernet_and_cfg(tiny_resnet):
    cfg = tiny_resnet.uniform(4, 8, symmetric=False, per_channel=True)
    before = tiny_resnet.current_config()
    x = _inputs((1, 16, 16), n=8)
    with torch.no_grad():
        assert torch.equal(to_brevitas(tiny_resnet, cfg)(x), freeze(tiny_resnet, cfg)(x))
    assert tiny_resnet.current_config() == before


def _point(bits, signed, zp, scale, axis=None):
    from eqnet_plugin.quant.grid import Grid
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    zp = torch.as_tensor(zp, dtype=torch.int32).reshape(-1).expand(scale.shape).clone()
    return QParams(scale, zp, Grid(bits, bool((zp == 0).all()), axis is not None, signed), axis)


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantizers_bit_exact_every_grid(bits):
    """Every bit-width, signed/unsigned, zero point 0 or not, per-tensor and per-channel, on inputs that include
    exact rounding ties and values outside the range."""
    import brevitas.nn as qnn

    from eqnet_plugin.adapters.brevitas import _act_quant, _brevitas_layer
    from eqnet_plugin.export.freeze import QuantConv2d
    from eqnet_plugin.quant.grid import Grid

    g = torch.Generator().manual_seed(bits)
    s = 0.37 / 2 ** bits
    ties = (torch.arange(-2 ** bits, 2 ** bits, dtype=torch.float32) + 0.5) * s
    x = torch.cat([ties, torch.randn(4000, generator=g) * s * 2 ** bits]).reshape(1, 1, -1)
    half = 2 ** (bits - 1)
    for signed, zp in [(True, 0), (False, 0), (False, half - 1), (True, 1 - half // 2)]:
        qp = _point(bits, signed, zp, s)
        q = qnn.QuantIdentity(act_quant=_act_quant(qp, exact=True), return_quant_tensor=False).eval()
        with torch.no_grad():
            assert torch.equal(q(x), qp.fake_quant(x)), (signed, zp)
    # per-channel weights with per-channel zero points on the signed grid
    conv = QuantConv2d(2, 4, 3, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    scales = 0.2 / 2 ** bits * (1 + torch.rand(4, generator=g))
    zps = torch.tensor([0, 1, -1, half - 1], dtype=torch.int32).clamp(-half, half - 1)
    conv.weight_quant = QuantPoint("w", QParams(scales, zps, Grid(bits, False, True, signed=True), 0))
    layer = _brevitas_layer(conv, exact=True).eval()
    xin = torch.randn(3, 2, 5, 5, generator=g)
    with torch.no_grad():
        assert torch.equal(layer.quant_weight().value, conv.quantized_weight())
        assert torch.equal(layer(xin), conv(xin))


def test_stock_brevitas_rounding_differs_at_ties():
    """Why `ReciprocalIntQuant` exists: Brevitas' stock IntQuant rounds ``x / s + z`` where the IR rounds
    ``x * (1/s)`` and then adds z, which differs at ties (and within an ulp of them)."""
    import brevitas.nn as qnn

    from eqnet_plugin.adapters.brevitas import _act_quant

    qp = _point(4, False, 1, 0.25)                      # power-of-two scale: x / s is exact
    x = torch.tensor([[0.125, 0.375, 1.0]])             # 0.5, 1.5 ticks: ties
    stock = qnn.QuantIdentity(act_quant=_act_quant(qp, exact=False), return_quant_tensor=False).eval()
    exact = qnn.QuantIdentity(act_quant=_act_quant(qp, exact=True), return_quant_tensor=False).eval()
    with torch.no_grad():
        assert torch.equal(exact(x), qp.fake_quant(x))
        assert not torch.equal(stock(x), qp.fake_quant(x))
        assert (stock(x) - qp.fake_quant(x)).abs().max() <= 0.25     # one LSB


# --- errors -------------------------------------------------------------------------------------------------
def test_errors(tiny_resnet, monkeypatch, tmp_path):
    with pytest.raises(TypeError, match="FrozenSubnet"):
        to_brevitas(nn.Linear(2, 2))
    frozen = freeze(tiny_resnet, tiny_resnet.uniform(8, 8))
    with pytest.raises(TypeError, match="either"):
        to_brevitas(frozen, tiny_resnet.uniform(8, 8))
    with pytest.raises(TypeError, match="tuple of tensors"):
        export_brevitas_qcdq(frozen, [1, 2], "unused.onnx")          # a bare tensor is fine, a list of ints is not
    with pytest.raises(TypeError, match="without brevitas.nn layers"):
        export_brevitas_qonnx(nn.Linear(2, 2), (torch.zeros(1, 2),), "unused.onnx")
    with pytest.raises(RuntimeError):                   # wrong channel count: the export fails ...
        export_brevitas_qonnx(frozen, (torch.zeros(1, 3, 16, 16),), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []               # ... and leaves nothing behind
    # per-channel along a non-output axis cannot be expressed
    g = next(iter(frozen.qparams))
    qp = frozen.qparams[g]
    bad = QParams(qp.scale, qp.zero_point, qp.grid.replace(per_channel=True), 1)
    from eqnet_plugin.adapters.brevitas import _weight_quant
    with pytest.raises(ValueError, match="axis 1"):
        _weight_quant(bad, 4, True)
    # a missing extra names the pip command
    monkeypatch.setitem(sys.modules, "brevitas", None)
    with pytest.raises(ImportError, match=r'eqnet_plugin\[brevitas\]'):
        to_brevitas(frozen)


# --- Brevitas exporters -------------------------------------------------------------------------------------
def _tensor_values(model) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            vals[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return vals


def _find_group(frozen: FrozenSubnet, scale, zp, qmin, qmax) -> str:
    """The group whose QParams have exactly this scale, zero point and integer range."""
    scale = np.asarray(scale, np.float32).reshape(-1)
    zp = np.broadcast_to(np.asarray(zp, np.float64).reshape(-1), scale.shape)     # QONNX: scalar zero point 0
    for g, qp in frozen.qparams.items():
        s = qp.scale.numpy()
        if (qp.qmin, qp.qmax) == (qmin, qmax) and s.shape == scale.shape and np.array_equal(s, scale) and \
                np.array_equal(qp.zero_point.numpy().astype(np.float64), zp):
            return g
    raise AssertionError(f"no QParams with scale {scale[:3]}, zero point {zp[:3]}, range [{qmin}, {qmax}]")


def _check_qcdq_structure(path, frozen: FrozenSubnet) -> None:
    """Every DequantizeLinear carries exactly one group's scale / zero point / range (range from the Clip before
    it, else the container type); every group appears."""
    model = onnx.load(path)
    vals = _tensor_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    seen = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        zp = vals[node.input[2]]
        src = producer.get(node.input[0])
        if src is not None and src.op_type == "Clip":
            qmin, qmax = int(vals[src.input[1]]), int(vals[src.input[2]])
        else:
            info = np.iinfo(zp.dtype)
            qmin, qmax = int(info.min), int(info.max)
        seen.add(_find_group(frozen, vals[node.input[1]], zp, qmin, qmax))
    assert seen == set(frozen.qparams)


def _ort_run(path, x: torch.Tensor, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", ["w8a8_sym_channel", "w8a8_asym_tensor"])
def test_qcdq_onnxruntime_within_one_lsb(tiny_resnet, tmp_path, name):
    sn = tiny_resnet
    cfg = sn.uniform(8, 8, symmetric=True, per_channel=True) if name == "w8a8_sym_channel" else \
        sn.uniform(8, 8, symmetric=False, per_channel=False)
    frozen = freeze(sn, cfg)
    bm = to_brevitas(frozen)
    x = _inputs((1, 16, 16), n=256, seed=7)
    path = export_brevitas_qcdq(bm, (x[:2],), tmp_path / f"{name}.onnx")
    _check_qcdq_structure(path, frozen)
    # dynamic batch: 256 rows through a 2-row export; ONNX Runtime's default (integer-kernel) session where its int8
    # kernels are exact, else the graph as written (AVX2-only x86 saturates int16 pair sums, see tests/_ort.py)
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if ort_int8_kernels_exact() else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = _ort_run(path, x, level)
    with torch.no_grad():
        ref = bm(x).numpy()
    lsb = frozen.qparams[list(frozen.quant_points())[-1]].scale.item()   # the output quantizer's scale
    err = np.abs(out - ref) / lsb
    assert (err <= 1.001).mean() >= 0.999, f"max {err.max():.2f} LSB"
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.995


@pytest.mark.parametrize("name", ["w8a4_sym_channel", "w4a4_sym_channel", "mixed3", "mixed5"])
def test_qcdq_sub8bit_within_one_lsb(tiny_resnet, tmp_path, name):
    """Sub-8-bit quantizers come out as Q -> Clip -> DQ with our exact ranges; ONNX Runtime running the file as written
    (ORT_DISABLE_ALL) is within 1 LSB of the Brevitas module on >= 99.9% of outputs, top-1 >= 99.5%.

    Measured: 100% within 1 LSB, top-1 100%. As Brevitas writes it (QuantizeLinear rounds x / scale, training
    x * (1 / scale)), exact ties at the coarse grids flipped codes: 92.7-99.8% within 1 LSB, hence the rewrite in
    `export_brevitas_qcdq`. ONNX Runtime's default session fuses 8-bit layers into integer kernels with int32 biases,
    a different computation: measured 76-100% within 1 LSB there (the mixed subnet with seed 3 lowest), top-1
    >= 98.4%; only top-1 is bounded for it."""
    cfg = {"w8a4_sym_channel": lambda sn: sn.uniform(8, 4, symmetric=True, per_channel=True),
           "w4a4_sym_channel": lambda sn: sn.uniform(4, 4, symmetric=True, per_channel=True),
           "mixed3": lambda sn: sn.sample(torch.Generator().manual_seed(3)),
           "mixed5": lambda sn: sn.sample(torch.Generator().manual_seed(5))}[name](tiny_resnet)
    frozen = freeze(tiny_resnet, cfg)
    bm = to_brevitas(frozen)
    x = _inputs((1, 16, 16), n=256, seed=7)
    path = export_brevitas_qcdq(bm, (x[:2],), tmp_path / f"{name}.onnx")
    _check_qcdq_structure(path, frozen)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Mul", "QuantizeLinear", "Clip", "DequantizeLinear"} <= ops
    with torch.no_grad():
        ref = bm(x).numpy()
    lsb = frozen.qparams[list(frozen.quant_points())[-1]].scale.item()
    out = _ort_run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    err = np.abs(out - ref) / lsb
    # 99.8-100% measured with the random calibration sample (whose scales put a few pooled values on ties that the
    # Brevitas module, dividing by its scale, and the reciprocal-form export break apart)
    assert (err <= 1.001).mean() >= 0.995, f"{(err <= 1.001).mean():.4f} within 1 LSB, max {err.max():.2f} LSB"
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.995
    if ort_int8_kernels_exact():                          # AVX2-only x86 saturates int8 kernels: tests/_ort.py
        default = _ort_run(path, x)
        assert (default.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_qonnx_quant_nodes(tiny_resnet, tmp_path):
    frozen = freeze(tiny_resnet, CONFIGS["mixed"](tiny_resnet))
    x = _inputs((1, 16, 16), n=2)
    path = export_brevitas_qonnx(frozen, (x,), tmp_path / "mixed_qonnx.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    vals = _tensor_values(model)
    quants = [n for n in model.graph.node if n.op_type == "Quant"]
    assert quants and all(n.domain == "qonnx.custom_op.general" for n in quants)
    seen = set()
    for node in quants:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["narrow"] == 0
        bits = int(vals[node.input[3]])
        signed = bool(attrs["signed"])
        qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        group = _find_group(frozen, vals[node.input[1]], vals[node.input[2]], qmin, qmax)
        assert frozen.qparams[group].bits == bits
        seen.add(group)
    assert seen == set(frozen.qparams)
    assert {qp.bits for qp in frozen.qparams.values()} == {int(vals[n.input[3]]) for n in quants}
