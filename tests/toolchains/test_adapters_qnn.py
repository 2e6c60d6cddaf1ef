"""QNN adapter: fp32 ONNX + AIMET encodings (0.6.1 / 1.0.0 / 2.0.0), proven by loading them into aimet-onnx's
QuantizationSimModel and comparing its ONNX Runtime output with the FrozenSubnet (1 LSB of the output scale)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from eqnet_plugin import ElasticSpace, Supernet, elastic_backend_config, prepare_qat
from eqnet_plugin.adapters import qnn
from eqnet_plugin.adapters.qnn import (ENCODING_VERSIONS, aimet_quantsim, build_encodings, encoding_entry,
                                       export_qnn, qnn_rule_violations)
from eqnet_plugin.app.data import digits_splits
from eqnet_plugin.export.freeze import QParams, freeze
from eqnet_plugin.app.models import TinyMobileNetV2, TinyResNet
from eqnet_plugin.quant.grid import Grid
from eqnet_plugin.quant.space import QuantChoice


SPACE = ElasticSpace(weight_bits=(3, 4, 8), act_bits=(3, 8))
LSB_TOL = 1 + 1e-3          # "within 1 LSB", allowing float noise in the comparison itself


@pytest.fixture(scope="module")
def aq():
    """aimet_onnx.quantsim, imported once per module (slow import)."""
    from aimet_onnx import quantsim
    logging.getLogger("Quant").setLevel(logging.WARNING)
    return quantsim


@pytest.fixture(scope="module")
def digits():
    return digits_splits(image_size=16).train.tensors[0][:160]          # (160, 1, 16, 16)


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """BN statistics and affine parameters moved off their defaults, so the fold is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.6, 1.4, generator=g)
                m.weight.uniform_(0.7, 1.3, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def _supernet(model: nn.Module, x: torch.Tensor, backend_config=None, space=SPACE) -> tuple[Supernet, tuple]:
    ex = (x[:2],)
    sn = Supernet(prepare_qat(model, ex, space=space, backend_config=backend_config))
    sn.calibrate([x[:32]])
    return sn, ex


@pytest.fixture(scope="module")
def tiny_resnet(digits):
    torch.manual_seed(0)
    return _supernet(_perturbed(TinyResNet(widths=(8, 16, 32)), 0), digits)


@pytest.fixture(scope="module")
def tiny_mbv2(digits):
    torch.manual_seed(1)
    return _supernet(_perturbed(TinyMobileNetV2(), 1), digits, elastic_backend_config())


def _shared_groups(sn: Supernet) -> set[str]:
    """Groups whose quantizer torch.ao reuses for several tensors (a ReLU output and the pool after it)."""
    mods = [m for _, m in sn.model.named_modules(remove_duplicate=False)]
    return {g for g, fq in sn.groups.items() if sum(m is fq for m in mods) > 1}


def _configs(sn: Supernet, name: str) -> tuple:
    """(cfg, strict) by name."""
    if name == "w8a8_pc":
        return sn.uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False), True
    if name == "w8a8_pt":
        return sn.uniform(8, 8, symmetric=True, per_channel=False, act_symmetric=False), True
    if name == "w4a8_pc":
        return sn.uniform(4, 8, symmetric=True, per_channel=True, act_symmetric=False), True
    if name == "w4a8_pt":
        return sn.uniform(4, 8, symmetric=True, per_channel=False, act_symmetric=False), True
    if name == "w8a8_pt_symact":
        return sn.uniform(8, 8, symmetric=True, per_channel=False, act_symmetric=True), True
    # mixed 3/4/8 bits, random symmetry and granularity; the pool's shared group stays 8-bit (see
    # test_every_aimet_quantizer_equals_qparams for why)
    cfg = sn.sample(generator=torch.Generator().manual_seed(int(name[-1])))
    return cfg.replace(**{g: QuantChoice(8, cfg[g].symmetric, False) for g in _shared_groups(sn)}), False


def _output_scale(frozen, out) -> float:
    g = next(g for g, ts in out.tensors.items() if "output" in ts)
    return float(frozen.qparams[g].scale)


def _parity(y: np.ndarray, ref: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    """(fraction within 1 LSB, max LSB, top-1 agreement, top-1 agreement where the reference's top-2 margin
    exceeds 2 LSB). The models here are untrained, so their logits often tie on the 8-bit output grid; an
    allowed 1-LSB error flips such a tie, so the decisive samples carry the top-1 criterion."""
    lsb = np.abs(y - ref) / scale
    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) / scale > 2 + 1e-3
    agree = y.argmax(1) == ref.argmax(1)
    return float((lsb <= LSB_TOL).mean()), float(lsb.max()), float(agree.mean()), float(agree[decisive].mean())


def _assert_parity(run, frozen, out, inputs: dict, what: str) -> list[str]:
    """`inputs`: kind -> (x, reference output of `frozen`)."""
    lines = []
    scale = _output_scale(frozen, out)
    for kind, (x, ref) in inputs.items():
        frac, mx, top1, top1_decisive = _parity(run(x.numpy()), ref, scale)
        lines.append(f"{what} {kind}: within 1 LSB {frac:.4%}, max {mx:.2f} LSB, top-1 {top1:.2%} "
                     f"(decisive {top1_decisive:.2%})")
        assert frac >= 0.999 and top1_decisive >= 0.995, lines[-1]
    return lines


def _inputs(frozen, digits: torch.Tensor, n: int = 128) -> dict:
    """digits and random inputs with the frozen subnet's outputs."""
    rand = torch.randn(n, *digits.shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return {kind: (x, frozen(x).numpy()) for kind, x in (("digits", digits[:n]), ("random", rand))}


def _check_names(frozen, out, version: str) -> None:
    """Every encoding names an ONNX tensor, every group has an encoding, weights are '<layer>.weight' initializers."""
    model = onnx.load(out.onnx_path)
    g = model.graph
    graph_names = ({t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.initializer}
                   | {i.name for i in g.input})
    with open(out.encodings_path) as f:
        doc = json.load(f)
    assert doc["version"] == version
    assert set(out.tensors) == set(frozen.qparams)
    names = qnn._encoding_names(doc)
    assert len(names) == len(set(names))
    assert set(names) == {t for ts in out.tensors.values() for t in ts}
    assert set(names) <= graph_names
    inits = {i.name for i in g.initializer}
    for lay in frozen.layers:
        assert out.tensors[lay.weight_group] == (f"{lay.name}.weight",)
        assert f"{lay.name}.weight" in inits
    if version != "2.0.0":
        params = doc["param_encodings"] if version == "0.6.1" else [e["name"] for e in doc["param_encodings"]]
        assert set(params) == {f"{lay.name}.weight" for lay in frozen.layers}
    for grp, ts in out.tensors.items():
        if not frozen.is_weight(grp):
            assert all(t in ("input", "output") or t.startswith(grp) for t in ts), (grp, ts)


# --- encodings: conventions, checked by AIMET's own parser -----------------------------------------------------
def _qp(bits, signed, zp, scale, axis=None, symmetric=True) -> QParams:
    return QParams(torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32),
                   Grid(bits, symmetric, axis is not None, signed), axis)


CASES = {   # name: (QParams, is_param)
    "w8_sym_pc": (_qp(8, True, [0, 0, 0], [0.01, 0.02, 0.05], axis=0), True),
    "w4_sym_pt": (_qp(4, True, [0], [0.1]), True),
    "w3_asym_pc": (_qp(3, True, [1, -2, 0], [0.1, 0.2, 0.3], axis=0, symmetric=False), True),
    "a8_asym": (_qp(8, False, [37], [0.03], symmetric=False), False),
    "a4_sym_signed_data": (_qp(4, True, [0], [0.25]), False),
}


@pytest.mark.parametrize("version", ENCODING_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_encoding_entry_matches_aimet_parser(aq, case, version):
    qp, is_param = CASES[case]
    entry = encoding_entry(qp, is_param=is_param, version=version, name="t")
    c = qp.scale.numel()
    enc = aq.EncodingBase.from_qnn_encoding_dict(entry)
    # AIMET's semantics: x_q = clamp(round(x / scale - offset), qmin, qmax); x_hat = (x_q + offset) * scale
    x = torch.randn(c, 257, generator=torch.Generator().manual_seed(0)).numpy() * 2.0       # (C, N)
    s, o = enc.scale.reshape(-1, 1), enc.offset.reshape(-1, 1)
    aimet = (np.clip(np.round(x / s - o), enc.qmin, enc.qmax) + o) * s
    ours = qp.fake_quant(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(aimet, ours, rtol=0, atol=1e-6)
    assert enc.bitwidth == qp.bits
    # the documented conventions, stated literally
    unsigned_offset = -(qp.zero_point.numpy() - qp.qmin)
    signed = is_param and bool((qp.zero_point == 0).all())
    if version == "0.6.1":
        assert [e["offset"] for e in entry] == unsigned_offset.tolist()
        assert all(e["is_symmetric"] == str(signed) and e["dtype"] == "int" for e in entry)
        for e in entry:
            assert e["min"] == pytest.approx(e["offset"] * e["scale"])
            assert e["max"] == pytest.approx((e["offset"] + 2 ** qp.bits - 1) * e["scale"])
    elif version == "1.0.0":
        assert entry["offset"] == unsigned_offset.tolist() and entry["is_sym"] is signed
        assert entry["enc_type"] == ("PER_CHANNEL" if c > 1 else "PER_TENSOR")
    else:
        assert entry["output_dtype"] == f"{'' if signed else 'u'}int{qp.bits}"
        assert ("axis" in entry) == (c > 1)
    if case == "w8_sym_pc" and version != "2.0.0":
        assert unsigned_offset.tolist() == [-128] * 3                     # signed symmetric: offset -2^(b-1)


def test_build_encodings_rejects_bad_input():
    qp, _ = CASES["a8_asym"]
    with pytest.raises(ValueError, match="choose one of"):
        build_encodings({}, {"x": qp}, "0.7")
    with pytest.raises(ValueError, match="both weights and activations"):
        build_encodings({"x": qp}, {"x": qp}, "1.0.0")


# --- export + AIMET QuantSim parity ------------------------------------------------------------------------------
PARITY = [("tiny_resnet", "w8a8_pc"), ("tiny_resnet", "w4a8_pt"), ("tiny_resnet", "mixed0"),
          ("tiny_mbv2", "w4a8_pc"), ("tiny_mbv2", "w8a8_pt_symact"), ("tiny_mbv2", "mixed1")]


@pytest.mark.parametrize("model,cfg_name", PARITY)
def test_aimet_quantsim_parity(request, aq, digits, tmp_path, model, cfg_name):
    sn, ex = request.getfixturevalue(model)
    cfg, strict = _configs(sn, cfg_name)
    frozen = freeze(sn, cfg)
    assert (qnn_rule_violations(frozen) == []) == strict
    inputs = _inputs(frozen, digits)
    report = []
    for version in ENCODING_VERSIONS:
        out = export_qnn(frozen, ex, tmp_path / version, encoding_version=version, strict=strict)
        _check_names(frozen, out, version)
        sim, _ = aimet_quantsim(out.onnx_path, out.encodings_path, threads=2)
        report += _assert_parity(lambda x: sim.session.run(None, {"input": x})[0], frozen, out, inputs,
                                 f"{model} {cfg_name} {version} QuantSim")
        if {q.bits for q in frozen.qparams.values()} <= {4, 8}:
            # AIMET's other consumer of the file: a QDQ model (ONNX has no 3/5/6/7-bit types, hence only 4/8)
            qdq = aq.encodings_to_onnx_qdq(out.onnx_path, out.encodings_path)
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # float Q/DQ, no int kernels
            sess = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"])
            report += _assert_parity(lambda x: sess.run(None, {"input": x})[0], frozen, out, inputs,
                                     f"{model} {cfg_name} {version} encodings_to_onnx_qdq")
    print("\n".join(report))


def test_strict_load_matches_aimet_default_config(aq, tiny_resnet, tmp_path):
    """W8A8 (symmetric per-channel weights, asymmetric activations) equals AIMET's default per-channel settings,
    so even a strict load (every setting compared) accepts the file in every version."""
    sn, ex = tiny_resnet
    frozen = freeze(sn, _configs(sn, "w8a8_pc")[0])
    for version in ENCODING_VERSIONS:
        out = export_qnn(frozen, ex, tmp_path / version, encoding_version=version)
        _, mismatches = aimet_quantsim(out.onnx_path, out.encodings_path, strict=True, threads=2)
        assert mismatches == []


def test_every_aimet_quantizer_equals_qparams(aq, tiny_resnet, digits, tmp_path):
    """Each quantizer of the loaded sim, fed its own input, reproduces QParams.fake_quant of that input; codes
    differ only at exact .5 ties (AIMET rounds them away from zero, torch to even). With 3-bit activations the
    average pool (which torch.ao requantizes with the ReLU's scale) lands on such ties often (~3% of its codes
    here), which is why end-to-end parity needs an 8-bit pool input (`_configs` keeps the shared group at 8)."""
    sn, ex = tiny_resnet
    frozen = freeze(sn, sn.uniform(8, 3, symmetric=True, per_channel=True, act_symmetric=False))
    out = export_qnn(frozen, ex, tmp_path / "m", encoding_version="2.0.0", strict=False)
    sim, _ = aimet_quantsim(out.onnx_path, out.encodings_path, threads=2)
    stats = _quantizer_check(sim, frozen, out, digits[:64])
    pool = out.tensors[next(iter(_shared_groups(sn)))][1]
    print(f"pool output {pool}: {stats[pool]:.2%} of codes at .5 ties rounded differently")
    assert stats[pool] > 0                   # the phenomenon this test documents does occur here


def _quantizer_check(sim, frozen, out, x: torch.Tensor) -> dict[str, float]:
    """Run the sim once, fetching every enabled QcQuantizeOp's input and output; assert each output equals
    QParams.fake_quant(input) except at .5 ties (differing by exactly one code). Returns tensor -> tie fraction."""
    qp_of = {t: frozen.qparams[g] for g, ts in out.tensors.items() for t in ts}
    model = onnx.ModelProto()
    model.CopyFrom(sim.model.model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "QcQuantizeOp" and n.input[0] in qp_of]
    assert {n.input[0] for n in nodes} == set(qp_of)
    have = {o.name for o in model.graph.output}
    for name in {t for n in nodes for t in (n.input[0], n.output[0])} - have - set(inits) - {"input"}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(model.SerializeToString(), sim._ort_session_options,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = {**inits, "input": x.numpy(), **dict(zip(names, sess.run(names, {"input": x.numpy()})))}
    ties = {}
    for n in nodes:
        qp, inp, res = qp_of[n.input[0]], torch.tensor(got[n.input[0]]), got[n.output[0]]
        scale = qp._broadcast(inp)[0].numpy()
        ours = qp.fake_quant(inp).numpy()
        diff = np.abs(res - ours) / scale                                    # in codes
        frac = (inp.numpy() / scale) % 1.0
        off = diff > 1e-3
        assert diff.max() <= 1 + 1e-3, (n.input[0], float(diff.max()))
        assert np.all(np.abs(frac[off] - 0.5) < 1e-3), n.input[0]          # every difference is a tie
        ties[n.input[0]] = float(off.mean())
    return ties


# --- names, strictness, files -------------------------------------------------------------------------------
def test_names_are_stable_across_subnets(tiny_mbv2, tmp_path):
    sn, ex = tiny_mbv2
    a = export_qnn(freeze(sn, _configs(sn, "w8a8_pc")[0]), ex, tmp_path / "a")
    b = export_qnn(freeze(sn, _configs(sn, "mixed2")[0]), ex, tmp_path / "b", strict=False)
    assert a.tensors == b.tensors
    ga, gb = onnx.load(a.onnx_path).graph, onnx.load(b.onnx_path).graph
    assert [(list(n.input), list(n.output)) for n in ga.node] == [(list(n.input), list(n.output)) for n in gb.node]
    shared = _shared_groups(sn)
    assert shared and all(len(a.tensors[g]) == 2 and a.tensors[g][1] == f"{g}__1" for g in shared)


@pytest.mark.parametrize("cfg_kw,rule", [
    (dict(w_bits=8, a_bits=3, act_symmetric=False), "activations are 8 or 16 bit"),
    (dict(w_bits=3, a_bits=8, act_symmetric=False), "weights are 4 or 8 bit"),
    (dict(w_bits=8, a_bits=8, symmetric=False, act_symmetric=False), "weights are symmetric"),
])
def test_strict_refuses_what_htp_cannot_run(tiny_resnet, tmp_path, cfg_kw, rule):
    sn, ex = tiny_resnet
    frozen = freeze(sn, sn.uniform(**cfg_kw))
    with pytest.raises(ValueError, match=rule) as err:
        export_qnn(frozen, ex, tmp_path / "x")
    assert "strict=False" in str(err.value)
    assert os.listdir(tmp_path) == []
    out = export_qnn(frozen, ex, tmp_path / "x", strict=False)
    assert os.path.exists(out.onnx_path) and os.path.exists(out.encodings_path)


def test_paths_inputs_and_bad_arguments(tiny_resnet, tmp_path):
    sn, ex = tiny_resnet
    cfg = _configs(sn, "w8a8_pc")[0]
    out = export_qnn(sn, ex, tmp_path, cfg=cfg)                          # Supernet with cfg=, folder
    assert out.onnx_path == str(tmp_path / "model.onnx") and out.encodings_path == str(tmp_path / "model.encodings")
    out2 = export_qnn(freeze(sn, cfg), ex, tmp_path / "sub" / "net.onnx")  # prefix given with .onnx
    assert out2.onnx_path.endswith("sub/net.onnx") and out2.encodings_path.endswith("sub/net.encodings")
    with open(out.encodings_path) as f1, open(out2.encodings_path) as f2:
        assert json.load(f1) == json.load(f2)
    static = export_qnn(sn, ex, tmp_path / "static", cfg=cfg, dynamic_batch=False)
    dims = onnx.load(static.onnx_path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == list(ex[0].shape)
    with pytest.raises(ValueError, match="choose one of"):
        export_qnn(sn, ex, tmp_path / "v", cfg=cfg, encoding_version="1.0")
    with pytest.raises(TypeError, match="FrozenSubnet"):
        export_qnn(torch.nn.Linear(2, 2), ex, tmp_path / "t")


def test_atomic_write(tiny_resnet, tmp_path, monkeypatch):
    sn, ex = tiny_resnet
    frozen = freeze(sn, _configs(sn, "w8a8_pc")[0])

    def boom(*a, **k):
        raise OSError("disk full")

    # 1) failure while writing: nothing at all is left in the folder
    with monkeypatch.context() as m:
        m.setattr(qnn.json, "dump", boom)
        with pytest.raises(OSError, match="disk full"):
            export_qnn(frozen, ex, tmp_path / "m")
    assert os.listdir(tmp_path) == []

    # 2) failure between the two renames: the previous pair stays intact, no temporary folder remains
    old = export_qnn(frozen, ex, tmp_path / "m")
    before = {p: open(p, "rb").read() for p in old[:2]}
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".encodings"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(qnn.os, "replace", replace)
        with pytest.raises(OSError, match="rename failed"):
            export_qnn(freeze(sn, _configs(sn, "w4a8_pt")[0]), ex, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m.encodings", "m.onnx"]
    assert {p: open(p, "rb").read() for p in old[:2]} == before


# --- torchvision ResNet-18 ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_resnet18_quantizers_and_parity(aq, digits, tmp_path):
    """ResNet-18 is deep enough that float summation order alone moves its 8-bit outputs by several LSB (measured
    here: the FrozenSubnet run one image at a time vs batched agrees within 1 LSB on only ~88-99% of outputs, max
    3-5 LSB), so end-to-end '1 LSB' cannot be met by any second runtime. The proof is per quantizer (every AIMET
    quantizer equals QParams.fake_quant of its own input, ties aside); end to end only a sanity bound is asserted."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(digits[:48], size=32, mode="bilinear").repeat(1, 3, 1, 1)   # (48, 3, 32, 32)
    sn, ex = _supernet(_perturbed(resnet18(num_classes=10), 2), x[:8],
                       space=ElasticSpace(weight_bits=(4, 8), act_bits=(8,)))
    report = []
    for cfg_name, versions in (("w8a8_pc", ENCODING_VERSIONS), ("w4a8_pt", ("1.0.0",))):
        cfg, strict = _configs(sn, cfg_name)
        frozen = freeze(sn, cfg)
        inputs = _inputs(frozen, x[16:], n=32)
        for version in versions:
            out = export_qnn(frozen, ex, tmp_path / f"{cfg_name}_{version}", encoding_version=version, strict=strict)
            _check_names(frozen, out, version)
            sim, _ = aimet_quantsim(out.onnx_path, out.encodings_path, threads=2)
            ties = _quantizer_check(sim, frozen, out, x[16:24])
            report.append(f"resnet18 {cfg_name} {version}: {len(ties)} quantizers equal QParams, max tie share "
                          f"{max(ties.values()):.3%}")
            scale = _output_scale(frozen, out)
            for kind, (a, ref) in inputs.items():
                y = sim.session.run(None, {"input": a.numpy()})[0]
                frac, mx, top1, top1_decisive = _parity(y, ref, scale)
                rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                report.append(f"  {kind}: within 1 LSB {frac:.2%}, max {mx:.1f} LSB, relative L2 {rel:.2%}, top-1 "
                              f"{top1:.2%} (decisive {top1_decisive:.2%})")
                # a sanity bound only (float-order noise, see docstring); a wrong encoding breaks it by far
                assert rel <= 0.05 and top1 >= 0.85, report[-1]
    print("\n".join(report))


@pytest.mark.slow
def test_trained_resnet18_end_to_end_parity(aq, tmp_path, trained_torchvision):
    """The issue's bar end to end on a trained ResNet-18 (30 Adam steps on digits, `trained_torchvision`): AIMET
    QuantSim loaded with our encodings (each version) within 1 LSB of the frozen subnet on >= 99.9% of outputs, top-1
    >= 99.5% where the reference's top two logits are more than 2 LSB apart (ties on the 8-bit output grid aside).
    Measured: 100% within 1 LSB (max 1 LSB) for W8A8 per-channel in all three versions and W4A8 per-tensor; raw top-1
    98.4-100%, 100% on the decisive samples."""
    sp = digits_splits(image_size=32)
    x = sp.train.tensors[0][:48].repeat(1, 3, 1, 1)                                     # (48, 3, 32, 32)
    test = sp.test.tensors[0][:128].repeat(1, 3, 1, 1)
    sn, ex = _supernet(trained_torchvision("resnet18"), x, space=ElasticSpace(weight_bits=(4, 8), act_bits=(8,)))
    report = []
    for cfg_name, versions in (("w8a8_pc", ENCODING_VERSIONS), ("w4a8_pt", ("1.0.0",))):
        cfg, strict = _configs(sn, cfg_name)
        frozen = freeze(sn, cfg)
        inputs = _inputs(frozen, test)
        for version in versions:
            out = export_qnn(frozen, ex, tmp_path / f"{cfg_name}_{version}", encoding_version=version, strict=strict)
            sim, _ = aimet_quantsim(out.onnx_path, out.encodings_path, threads=2)
            report += _assert_parity(lambda a: sim.session.run(None, {"input": a})[0], frozen, out, inputs,
                                     f"trained resnet18 {cfg_name} {version} QuantSim")
    print("\n".join(report))
