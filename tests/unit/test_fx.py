"""torch.ao FX integration end to end: placement vs torch.ao's default QAT mapping, the ReLU6 backend config,
switching every cell, finite training passes, exact reference conversion, serialization, and trace errors.

Models: torchvision resnet18 and mobilenet_v2 (num_classes=10, weights=None, 3x32x32, marked slow) and the compact
TinyResNet / TinyMobileNetV2 (1x16x16). Each model is prepared and calibrated once per module (`case` fixture).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from eqnet_plugin.quant.bn_fold import fold_weight
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from eqnet_plugin import ElasticFakeQuantize, Supernet, elastic_backend_config, elastic_qconfig_mapping
from eqnet_plugin.frontends.fx import (PlacementError, TraceError, check_placement, convert_reference, fake_quant_placement,
                             prepare_qat)
from eqnet_plugin.app.models import TinyMobileNetV2, TinyResNet
from eqnet_plugin.quant.primitives import int_range

TORCHVISION = ("resnet18", "mobilenet_v2")
N_PARITY = 20


def _build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=10), (3, 32, 32)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(weights=None, num_classes=10), (3, 32, 32)
    if name == "tiny_resnet":
        return TinyResNet(num_classes=10, in_channels=1, widths=(8, 16, 32)), (1, 16, 16)
    return TinyMobileNetV2(num_classes=10, in_channels=1), (1, 16, 16)


def _prepare(model: nn.Module, mapping: QConfigMapping, ex: tuple, backend_config=None) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), mapping, ex, backend_config=backend_config)


@dataclass
class Case:
    name: str
    model: nn.Module                  # the float model (untouched)
    ex: tuple                         # example inputs (1, C, H, W)
    plain: torch.fx.GraphModule       # prepare_qat_fx(model, elastic_qconfig_mapping(), ex): no backend_config
    default: torch.fx.GraphModule     # prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), ex)
    backend_config: object            # elastic_backend_config() for MobileNets, else None
    sn: Supernet                      # calibrated supernet over plain (ResNets) / the backend-config graph
    x: torch.Tensor                   # (2, C, H, W) evaluation input


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) for n in TORCHVISION]
                + ["tiny_resnet", "tiny_mobilenet_v2"])
def case(request) -> Case:
    name = request.param
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, shape = _build(name)
    g = torch.Generator().manual_seed(1)
    ex = (torch.randn(1, *shape, generator=g),)
    plain = _prepare(model, elastic_qconfig_mapping(), ex)
    default = _prepare(model, get_default_qat_qconfig_mapping("x86"), ex)
    bc = elastic_backend_config() if "mobilenet" in name else None
    gm = _prepare(model, elastic_qconfig_mapping(), ex, bc) if bc is not None else copy.deepcopy(plain)
    sn = Supernet(gm)
    sn.calibrate([torch.randn(4, *shape, generator=g), (torch.randn(4, *shape, generator=g), None)])
    return Case(name, model, ex, plain, default, bc, sn, torch.randn(2, *shape, generator=g))


def _fq_modules(gm: torch.fx.GraphModule) -> list[FakeQuantizeBase]:
    return [m for m in gm.modules() if isinstance(m, FakeQuantizeBase)]


# --- placement -------------------------------------------------------------------------------------------------
def test_placement_equals_torch_default_mapping(case):
    """Plain prepare_qat_fx(model, elastic_qconfig_mapping(), ex): fake-quants exactly where torch.ao's own go."""
    want, got = fake_quant_placement(case.default), fake_quant_placement(case.plain)
    assert got == want and got["weights"] and got["activations"]
    assert all(isinstance(m, ElasticFakeQuantize) for m in _fq_modules(case.plain))
    n_weighted = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in case.model.modules())
    assert len(got["weights"]) == n_weighted                                # every Conv/Linear is quantized
    sn = Supernet(case.plain)
    assert len(sn.weight_groups) == n_weighted and len(sn.layers) == n_weighted
    assert len(sn.groups) == len({id(m) for m in _fq_modules(case.plain)})   # distinct objects, once each


def _relu6_observed_on_both_sides(gm: torch.fx.GraphModule) -> list[str]:
    """ReLU6/Hardtanh nodes whose input and output are observed by the same fake-quant object."""
    mods = dict(gm.named_modules(remove_duplicate=False))

    def fq_of(node):
        m = mods.get(node.target) if isinstance(node, torch.fx.Node) and node.op == "call_module" else None
        return m if isinstance(m, FakeQuantizeBase) else None

    found = []
    for n in gm.graph.nodes:
        mod = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(mod, (nn.ReLU6, nn.Hardtanh)) or (n.op == "call_function" and n.target in (F.relu6,
                                                                                              F.hardtanh)):
            before = fq_of(n.args[0])
            if before is not None and any(fq_of(u) is before for u in n.users):
                found.append(n.name)
    return found


def test_backend_config_removes_double_observation_around_relu6(case):
    if "mobilenet" not in case.name:
        assert case.backend_config is None and not _relu6_observed_on_both_sides(case.plain)
        return
    assert _relu6_observed_on_both_sides(case.default)                       # torch.ao's own behaviour
    assert _relu6_observed_on_both_sides(case.plain)                         # drop-in: same placement
    assert not _relu6_observed_on_both_sides(case.sn.model)                  # elastic_backend_config() fixes it
    assert len(case.sn.layers) == len(Supernet(case.plain).layers)


# --- cells -----------------------------------------------------------------------------------------------------
def test_every_group_switches_through_all_its_cells(case):
    """Each quantizer takes every cell it holds; its output is torch's fake-quant with that cell's qparams."""
    sn, g = case.sn, torch.Generator().manual_seed(2)
    weights = {lay.weight: sn.model.get_submodule(lay.name).weight.detach() for lay in sn.layers}
    before = sn.current_config()
    for name, fq in sn.groups.items():
        probe = weights[name][:, :2] if fq.is_weight else torch.randn(2, 3, 4, 4, generator=g)
        for bits in fq.bit_choices:
            for sym in fq.sym_choices:
                for pc in fq.pc_choices:
                    fq.set_cell(bits, sym, pc)
                    assert fq.cell == (bits, sym, pc)
                    assert (fq.quant_min, fq.quant_max) == int_range(bits, signed=fq.is_weight)
                    s, z = fq.calculate_qparams()
                    out = fq(probe)
                    ref = (torch.fake_quantize_per_channel_affine(probe, s, z, 0, fq.quant_min, fq.quant_max) if pc
                           else torch.fake_quantize_per_tensor_affine(probe, s.item(), int(z.item()),
                                                                      fq.quant_min, fq.quant_max))
                    assert torch.equal(out, ref), (name, bits, sym, pc)
    sn.apply(before)
    assert sn.current_config() == before


def test_model_runs_every_uniform_cell(case):
    """Through Supernet: all non-fixed groups at each (bits, symmetry, granularity) of the space."""
    sn, gm = case.sn, case.sn.model
    gm.eval()
    with torch.no_grad():
        for bits in sn.space.weight_bits:
            for sym in sn.space.weight_symmetric:
                for pc in sn.space.weight_per_channel:
                    cfg = sn.uniform(bits, bits, symmetric=sym, per_channel=pc)
                    with sn.activate(cfg):
                        assert sn.current_config() == cfg
                        out = gm(case.x)
                    assert torch.isfinite(out).all()
    gm.train()


def test_forward_backward_finite_for_random_subnets(case):
    gm = copy.deepcopy(case.sn.model)               # train-mode BN updates stay out of the shared model
    sn = Supernet(gm)
    gm.train()
    g = torch.Generator().manual_seed(3)
    x = torch.cat([case.x, case.x.flip(0)])
    y = torch.arange(x.shape[0]) % 10
    for cfg in [sn.min_config(generator=g)] + [sn.sample(g) for _ in range(3)]:
        gm.zero_grad(set_to_none=True)
        with sn.activate(cfg):
            loss = F.cross_entropy(gm(x), y)
            loss.backward()
        assert torch.isfinite(loss)
        grads = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(t).all() for t in grads.values())
        assert any("scale_" in n and t.abs().sum() > 0 for n, t in grads.items())   # ranges learn
        assert any(n.endswith(".weight") and t.abs().sum() > 0 for n, t in grads.items())


# --- reference conversion --------------------------------------------------------------------------------------
def test_reference_conversion_matches_eval_output_exactly(case):
    """`to_reference(cfg)` (decomposed reference ops, sub-8-bit kept) == prepared model eval output, atol 0.

    Runs on the model as calibrated (BatchNorm at its initial statistics; see the next test for moved statistics).
    """
    sn, gm = case.sn, case.sn.model
    g = torch.Generator().manual_seed(4)
    configs = [sn.max_config(), sn.min_config(symmetric=False, per_channel=False), sn.uniform(8, 8)]
    configs += [sn.sample(g) for _ in range(N_PARITY - len(configs))]
    before = sn.current_config()
    gm.eval()
    with torch.no_grad():
        for cfg in configs:
            with sn.activate(cfg):
                want = gm(case.x)
            ref = sn.to_reference(cfg)
            assert sn.current_config() == before                             # the supernet is left unchanged
            assert not any(isinstance(m, FakeQuantizeBase) for m in ref.modules())
            assert torch.equal(ref(case.x), want), cfg
    gm.train()


def _weighted(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    return {n: m for n, m in gm.named_modules() if isinstance(getattr(m, "weight_fake_quant", None),
                                                               ElasticFakeQuantize)}


def test_reference_integer_weights_equal_qat_weights_after_bn_moves(case):
    """Once BN statistics move away from the fixed fold, `convert_reference` still holds exactly the integer weights
    the QAT forward quantizes (every layer, every cell), with the BN ratio in per-channel weight scales."""
    gm = copy.deepcopy(case.sn.model)
    sn = Supernet(gm)
    g = torch.Generator().manual_seed(7)
    sn.recalibrate_bn([torch.randn(4, *case.x.shape[1:], generator=g) for _ in range(2)])
    assert any((m.bn.running_var != m.fold_var).any() for m in gm.modules() if hasattr(m, "fold_var"))
    for cfg in (sn.sample(g), sn.sample(g, symmetric=False, per_channel=True), sn.uniform(8, 8)):
        with torch.no_grad(), sn.activate(cfg):
            ref = sn.to_reference()
            for name, m in _weighted(gm).items():
                fq = m.weight_fake_quant
                w = fold_weight(m)                                           # what the QAT forward quantizes
                r = ref.get_submodule(name)
                r = r[0] if isinstance(r, nn.Sequential) else r
                scale, zp = fq.calculate_qparams()
                shape = [-1] + [1] * (w.dim() - 1)
                pc = fq.cell[2]
                s0, z0 = (scale.reshape(shape), zp.reshape(shape)) if pc else (scale, zp)
                codes = torch.clamp(torch.round(w * (1.0 / s0)) + z0, fq.quant_min, fq.quant_max) - z0
                if hasattr(m, "bn"):
                    ratio = torch.sqrt(m.fold_var + m.bn.eps) / torch.sqrt(m.bn.running_var + m.bn.eps)
                    s1 = r.weight_scale.reshape(shape) if r.weight_scale.numel() > 1 else r.weight_scale
                    torch.testing.assert_close(r.weight_scale.reshape(-1), (scale * ratio).reshape(-1))
                else:
                    s1 = s0
                ref_codes = torch.round(r.get_weight() / s1)
                assert torch.equal(ref_codes, codes), (name, fq.cell)


def test_convert_reference_keeps_sub_8_bit_ranges(case):
    sn = case.sn
    with sn.activate(sn.uniform(3, 3)):
        ref = convert_reference(sn.model)
    ranges = {(n.args[3], n.args[4]) for n in ref.graph.nodes
              if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and len(n.args) > 4}
    assert (0, 7) in ranges                                                  # 3-bit unsigned activations


# --- serialization ---------------------------------------------------------------------------------------------
def _fresh_prepared(case: Case) -> torch.fx.GraphModule:
    with torch.random.fork_rng():
        torch.manual_seed(123)                                               # different init than the original
        model, _ = _build(case.name)
    return _prepare(model, elastic_qconfig_mapping(), case.ex, case.backend_config)


def test_state_dict_round_trip_into_freshly_prepared_model(case):
    sn = case.sn
    cfg = sn.sample(torch.Generator().manual_seed(5))
    sn.apply(cfg)
    fresh = _fresh_prepared(case)
    sn2 = Supernet(fresh)                                    # first: it adds the fixed BN fold's buffers
    fresh.load_state_dict(sn.model.state_dict())                             # strict; per-channel tables resize
    assert sn2.current_config() == cfg
    sn.model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(case.x), sn.model(case.x))
    sn.model.train()


def test_deepcopy_keeps_active_cell_and_output(case):
    sn = case.sn
    cfg = sn.sample(torch.Generator().manual_seed(6))
    sn.apply(cfg)
    dup = copy.deepcopy(sn.model)
    assert Supernet(dup).current_config() == cfg
    sn.model.eval()
    dup.eval()
    with torch.no_grad():
        assert torch.equal(dup(case.x), sn.model(case.x))
    sn.model.train()


# --- errors ----------------------------------------------------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:                                                      # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


def test_untraceable_model_raises_trace_error_naming_the_options():
    with pytest.raises(TraceError) as e:
        prepare_qat(DataDependent(), (torch.randn(1, 1, 8, 8),))
    msg = str(e.value)
    assert "DataDependent" in msg and "concrete_args" in msg
    assert "non_traceable_module_name" in msg and "non_traceable_module_class" in msg
    assert isinstance(e.value.__cause__, torch.fx.proxy.TraceError)


def test_prepare_qat_checks_inputs_and_leaves_the_model_alone():
    model = TinyResNet(in_channels=1, widths=(4, 8, 8))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of tensors, e\.g\. \(torch"):
        prepare_qat(model, [torch.randn(1, 1, 8, 8)])
    assert isinstance(prepare_qat(model, torch.randn(1, 1, 8, 8)), torch.fx.GraphModule)   # a bare tensor: fine
    gm = prepare_qat(model, (torch.randn(1, 1, 8, 8),))
    assert isinstance(gm, torch.fx.GraphModule) and not isinstance(model, torch.fx.GraphModule)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def test_check_placement_raises_when_a_qconfig_is_dropped():
    model = TinyResNet(in_channels=1, widths=(4, 8, 8))
    ex = (torch.randn(1, 1, 8, 8),)
    dropped = _prepare(model, elastic_qconfig_mapping().set_module_name("fc", None), ex)
    with pytest.raises(PlacementError, match=r"weights without an elastic fake-quant: \['fc'\].*prepare without "
                                             r"backend_config, or with elastic_backend_config\(\)"):
        check_placement(model, dropped, ex)
    with pytest.raises(ValueError, match=r"layers \['fc'\] were not prepared for QAT"):
        Supernet(dropped)
    check_placement(model, _prepare(model, elastic_qconfig_mapping(), ex), ex)   # the drop-in passes


def test_qconfig_mapping_translates_the_default_one():
    default, elastic = get_default_qat_qconfig_mapping("x86"), elastic_qconfig_mapping()
    assert set(elastic.object_type_qconfigs) == set(default.object_type_qconfigs)
    assert elastic.global_qconfig.activation().__class__ is ElasticFakeQuantize
    w = elastic.global_qconfig.weight()
    assert isinstance(w, ElasticFakeQuantize) and w.is_weight and w.ch_axis == 0
    fixed = elastic.object_type_qconfigs[torch.sigmoid]                     # fixed-range ops keep torch.ao's
    assert not isinstance(fixed.activation(), ElasticFakeQuantize)
    transposed = elastic.object_type_qconfigs[nn.ConvTranspose2d].weight()
    assert transposed.pc_choices == (False,)                                 # channel axis 1: per-tensor only
    with pytest.raises(TypeError, match="space must be an ElasticSpace"):
        elastic_qconfig_mapping({"weight_bits": (4,)})
