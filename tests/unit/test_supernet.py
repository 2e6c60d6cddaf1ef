"""Supernet: groups and layers, configs (sample/max/min/uniform), validation errors, activate, calibrate,
BatchNorm recalibration, on the compact TinyResNet from conftest (prepared + calibrated once per session)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from eqnet_plugin import ElasticFakeQuantize, ElasticSpace, QuantChoice, SubnetConfig, Supernet, \
    elastic_qconfig_mapping
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.supernet import Layer, batch_inputs

SMALL = ElasticSpace(weight_bits=(2, 4, 8), act_bits=(4, 8))


@pytest.fixture(scope="module")
def sn(tiny_resnet_supernet) -> Supernet:
    """Shared by the read-only tests of this module."""
    return tiny_resnet_supernet()


# --- structure -------------------------------------------------------------------------------------------------
def test_groups_are_distinct_quantizer_objects_in_graph_order(sn):
    named = [(n, m) for n, m in sn.model.named_modules(remove_duplicate=False) if isinstance(m, ElasticFakeQuantize)]
    assert len(named) > len(sn.groups)                                       # FX reuses one fq (pool output)
    assert len({id(m) for _, m in named}) == len(sn.groups)
    assert len({id(m) for m in sn.groups.values()}) == len(sn.groups)
    assert sn.weight_groups == [g for g in sn.groups if sn.groups[g].is_weight]
    assert sn.act_groups == [g for g in sn.groups if not sn.groups[g].is_weight]
    assert list(sn.groups) == sn.weight_groups + sn.act_groups
    assert sn.weight_groups == [lay.weight for lay in sn.layers]            # graph order
    assert all(sn.model.get_submodule(g) is fq for g, fq in sn.groups.items())


def test_layers_know_their_weight_and_input_quantizers(sn):
    names = [lay.name for lay in sn.layers]
    assert names[0] == "stem.0" and names[-1] == "fc" and len(names) == 10   # stem, 3 blocks (2 with down), fc
    assert all(isinstance(lay, Layer) and lay.input in sn.act_groups for lay in sn.layers)
    by = {lay.name: lay for lay in sn.layers}
    assert by["blocks.1.down.0"].input == by["blocks.1.conv1"].input         # a residual input feeds two convs
    assert by["fc"].kind == "Linear" and by["stem.0"].kind == "ConvBnReLU2d"
    first_input = next(n for n in sn.model.graph.nodes if n.op == "call_module")
    assert sn.layers[0].input == first_input.target                          # the model input's quantizer
    assert sn.groups[by["fc"].weight].scale_sym_channel_4b.shape == (10,)    # per-channel cells materialized


def test_fixed_groups_are_first_last_layers_and_outputs(sn):
    first, last = sn.layers[0], sn.layers[-1]
    out_fq = [n.args[0].target for n in sn.model.graph.nodes if n.op == "output"]
    assert sn.fixed_groups == {first.weight, first.input, last.weight, last.input, *out_fq}
    free = Supernet(sn.model, ElasticSpace(fixed_bits=None))
    assert free.fixed_groups == frozenset()
    assert free.min_config()[first.weight].bits == 2


def test_repr_and_batch_inputs(sn):
    assert repr(sn) == "Supernet(10 layers, 10 weight groups, 15 activation groups, 5 fixed)"
    x = torch.randn(2, 1, 4, 4)
    assert batch_inputs(x) is x and batch_inputs((x, 1)) is x and batch_inputs([x]) is x
    with pytest.raises(TypeError, match=r"a batch must be a tensor or an \(inputs, targets\) tuple, got dict"):
        batch_inputs({"x": x})


# --- configs ---------------------------------------------------------------------------------------------------
def test_sample_is_deterministic_and_covers_the_space(sn):
    a = [sn.sample(torch.Generator().manual_seed(7)) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(8)
    seen: dict[str, set] = {n: set() for n in sn.groups}
    for _ in range(60):
        cfg = sn.sample(g)
        sn.validate(cfg)
        for n, ch in cfg.groups.items():
            seen[n].add((ch.bits, ch.symmetric, ch.per_channel))
    for n, cells in seen.items():
        if n in sn.fixed_groups:
            assert {b for b, _, _ in cells} == {8}
        else:
            assert {b for b, _, _ in cells} == set(range(2, 9))
            assert {s for _, s, _ in cells} == {True, False}
            assert {p for _, _, p in cells} == ({True, False} if sn.groups[n].is_weight else {False})
    fixed = sn.sample(g, symmetric=False, per_channel=True)
    assert all(not c.symmetric and c.per_channel == sn.groups[n].is_weight for n, c in fixed.groups.items())


def test_max_min_uniform_configs(sn):
    mx, mn = sn.max_config(), sn.min_config()
    assert all(c == QuantChoice(8, True, sn.groups[n].is_weight) for n, c in mx.groups.items())
    assert all(c.bits == (8 if n in sn.fixed_groups else 2) for n, c in mn.groups.items())
    u = sn.uniform(4, 3, symmetric=True, per_channel=True, act_symmetric=False)
    for n, c in u.groups.items():
        w = sn.groups[n].is_weight
        assert c.bits == (8 if n in sn.fixed_groups else (4 if w else 3))
        assert c.symmetric == w and c.per_channel == w                       # activations: per-tensor, asym
    assert sn.min_config(symmetric=False, per_channel=False)[sn.weight_groups[1]] == QuantChoice(2, False, False)


def test_apply_activate_and_current_config(tiny_resnet_supernet):
    sn = tiny_resnet_supernet()
    start = sn.current_config()
    cfg = sn.sample(torch.Generator().manual_seed(9))
    with sn.activate(cfg) as active:
        assert active == cfg and sn.current_config() == cfg
    assert sn.current_config() == start
    with pytest.raises(RuntimeError, match="boom"):
        with sn.activate(cfg):
            raise RuntimeError("boom")
    assert sn.current_config() == start                                      # restored on error too
    sn.apply(SubnetConfig.from_json(cfg.to_json()))                          # JSON round trip applies
    assert sn.current_config() == cfg
    assert all(sn.groups[n].cell == (c.bits, c.symmetric, c.per_channel) for n, c in cfg.groups.items())


# --- errors that name the fix ----------------------------------------------------------------------------------
def test_validate_rejects_foreign_missing_and_out_of_space_groups(sn):
    cfg = sn.max_config()
    start = sn.current_config()
    wrong = SubnetConfig({**cfg.groups, "layer9.weight_fake_quant": QuantChoice(4)})
    with pytest.raises(ValueError, match=r"names groups this model does not have: \['layer9.weight_fake_quant'\]; "
                                         r"valid group names come from Supernet.groups"):
        sn.apply(wrong)
    missing = SubnetConfig({k: v for k, v in cfg.groups.items() if k != sn.act_groups[3]})
    with pytest.raises(ValueError, match=rf"misses groups \['{sn.act_groups[3]}'\] \(1 in all\); build configs with "
                                         r"Supernet.sample/uniform/max_config"):
        sn.validate(missing)
    free = next(g for g in sn.weight_groups if g not in sn.fixed_groups)
    fixed = next(g for g in sn.weight_groups if g in sn.fixed_groups)
    with pytest.raises(ValueError, match=rf"group '{free}': 7-bit is outside the space; allowed bits: \(2, 4, 8\)"):
        Supernet(sn.model, SMALL).apply(cfg.replace(**{free: QuantChoice(7)}))
    with pytest.raises(ValueError, match=rf"group '{fixed}': 4-bit is outside the space \(first/last layer or "
                                         r"model output: fixed_bits\); allowed bits: \(8,\)"):
        sn.validate(cfg.replace(**{fixed: QuantChoice(4)}))
    with pytest.raises(ValueError, match=r"per_channel=True is not allowed; allowed: \(False,\) \(activations are "
                                         r"per-tensor\)"):
        sn.validate(cfg.replace(**{sn.act_groups[2]: QuantChoice(8, True, True)}))
    sym_only = Supernet(sn.model, ElasticSpace(weight_symmetric=(True,)))
    with pytest.raises(ValueError, match=r"symmetric=False is outside the space; allowed: \(True,\)"):
        sym_only.validate(sym_only.max_config().replace(**{free: QuantChoice(8, False, True)}))
    with pytest.raises(TypeError, match="expected a SubnetConfig, got dict"):
        sn.validate(cfg.to_dict())
    assert sn.current_config() == start                                      # nothing applied on error


def test_uniform_and_sample_reject_values_outside_the_space(sn):
    small = Supernet(sn.model, SMALL)
    with pytest.raises(ValueError, match=r"w_bits=3 is outside the space; allowed: \(2, 4, 8\)"):
        small.uniform(3, 8)
    with pytest.raises(ValueError, match=r"a_bits=2 is outside the space; allowed: \(4, 8\)"):
        small.uniform(8, 2)
    sym_only = Supernet(sn.model, ElasticSpace(act_symmetric=(True,)))
    with pytest.raises(ValueError, match=r"symmetric=False is outside the space for group 'activation_post_process"):
        sym_only.uniform(8, 8, symmetric=False)


def test_supernet_needs_a_prepared_model():
    model = TinyResNet(in_channels=1, widths=(4, 8, 8))
    with pytest.raises(TypeError, match=r"Supernet needs the GraphModule returned by prepare_qat_fx, got TinyResNet; "
                                        r"call prepare_qat_fx\(model, eqnet_plugin.elastic_qconfig_mapping\(\)"):
        Supernet(model)
    with pytest.raises(ValueError, match="holds no ElasticFakeQuantize: prepare it with prepare_qat_fx"):
        Supernet(torch.fx.symbolic_trace(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = prepare_qat_fx(model, elastic_qconfig_mapping(SMALL), (torch.randn(1, 1, 8, 8),))
    Supernet(gm, ElasticSpace(weight_bits=(4, 8), act_bits=(8,)))            # a sub-space is fine
    with pytest.raises(ValueError, match=r"asks for \[3\] that quantizer .* was not built with; prepare the model "
                                         r"with elastic_qconfig_mapping\(space\)"):
        Supernet(gm, ElasticSpace(weight_bits=(3, 8), act_bits=(4, 8)))
    with pytest.raises(TypeError, match="space must be an ElasticSpace"):
        Supernet(gm, {"weight_bits": (4,)})


# --- data-driven steps -----------------------------------------------------------------------------------------
def test_calibrate_initializes_every_cell_and_restores_modes(tiny_resnet_supernet, random_batches):
    sn = tiny_resnet_supernet(SMALL, calibrate=False)
    sn.model.train()
    assert all((p == 1).all() for fq in sn.groups.values() for n, p in fq.named_parameters() if "scale" in n)
    batches = random_batches(n=3, seed=4)
    assert sn.calibrate(batches, max_batches=2) == 2
    assert sn.model.training
    for fq in sn.groups.values():
        assert fq.observer_enabled.item() == 0 and fq.fake_quant_enabled.item() == 1
        scales = {name: p for name, p in fq.named_parameters() if name.startswith("scale")}
        assert scales, dict(fq.named_parameters()).keys()
        for name, p in scales.items():
            assert (p != 1).all() and (p > 0).all(), name                     # every column initialized
    acts = [sn.groups[g] for g in sn.act_groups]
    assert acts[0].signed.item() == 1                                       # raw input: signed
    assert any(fq.signed.item() == 0 for fq in acts)                        # after ReLU: unsigned
    tensors_only = tiny_resnet_supernet(SMALL, calibrate=False)
    assert tensors_only.calibrate([x for x, _ in batches[:2]]) == 2          # plain tensors work the same
    assert all(torch.equal(a, b) for a, b in zip(sn.model.state_dict().values(),
                                                  tensors_only.model.state_dict().values()))
    with pytest.raises(ValueError, match=r"calibrate\(\) got no batches; pass an iterable of input tensors"):
        sn.calibrate([], overwrite=True)
    assert all(fq.observer_enabled.item() == 0 for fq in sn.groups.values())  # restored after the error
    with pytest.raises(ValueError, match="calibrated already.*overwrite=True"):   # trained scales are kept
        sn.calibrate([x for x, _ in batches[:2]])
    one_batch = tiny_resnet_supernet(SMALL, calibrate=False)
    assert one_batch.calibrate(batches[0][0]) == 1                           # a bare tensor is one batch


def test_calibrate_signed_activations_for_tensorrt(tiny_resnet_supernet, random_batches):
    """signed_activations=True: every activation quantizer on the signed grid; weights and asymmetric cells as
    without it; the flag travels in the state_dict and freeze reads it (signed grid, zero point 0)."""
    from eqnet_plugin.export.freeze import freeze
    plain = tiny_resnet_supernet(SMALL)                                     # calibrated with the default
    sn = tiny_resnet_supernet(SMALL, calibrate=False)
    batches = random_batches(n=2, seed=0)                                    # the fixture's calibration batches
    assert sn.calibrate(batches, signed_activations=True) == 2
    assert all(sn.groups[g].signed.item() == 1 for g in sn.act_groups)
    assert any(plain.groups[g].signed.item() == 0 for g in plain.act_groups)   # post-ReLU groups differ
    for g, fq in sn.groups.items():
        ref = plain.groups[g]
        for name, p in fq.named_parameters():
            same = torch.equal(p, getattr(ref, name))
            if fq.is_weight or "asym" in name or ref.signed.item() == 1:
                assert same, (g, name)                                        # untouched by the option
            else:
                assert not same, (g, name)                                    # unsigned -> signed grid search
    cfg = sn.uniform(8, 8, symmetric=True, per_channel=True)
    frozen = freeze(sn, cfg)
    for g in sn.act_groups:
        q = frozen.qparams[g]
        assert q.signed and (q.qmin, q.qmax) == (-128, 127) and int(q.zero_point.abs().max()) == 0, g
    fresh = tiny_resnet_supernet(SMALL, calibrate=False)                     # a checkpoint round trip
    fresh.model.load_state_dict(sn.model.state_dict())
    assert all(fresh.groups[g].signed.item() == 1 for g in fresh.act_groups)
    x = batches[0][0]
    with torch.no_grad():
        for s in (sn, fresh):
            s.model.eval()
        for c in (cfg, sn.uniform(4, 4, symmetric=False), sn.sample(torch.Generator().manual_seed(0))):
            with sn.activate(c), fresh.activate(c):
                assert torch.equal(sn.model(x), fresh.model(x))
    with pytest.raises(ValueError, match="signed_activations must be True or False"):
        sn.calibrate(batches, signed_activations="yes")


def test_recalibrate_bn_uses_the_active_subnet_and_restores_state(tiny_resnet_supernet, random_batches):
    sn = tiny_resnet_supernet()
    bn = sn.model.get_submodule("blocks.1.conv1").bn
    bn.momentum = 0.3
    seen = []
    hook = sn.model.get_submodule("blocks.1.conv1").register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = random_batches(n=1, batch=8, seed=5)[0]
    cfg = sn.uniform(4, 4)
    with sn.activate(cfg):
        assert sn.recalibrate_bn([x], max_batches=1) == 1
    hook.remove()
    assert bn.momentum == 0.3 and bn.num_batches_tracked.item() == 1 and sn.model.training
    conv = sn.model.get_submodule("blocks.1.conv1")
    with torch.no_grad(), sn.activate(cfg):
        y = nn.functional.conv2d(seen[0], conv.weight_fake_quant(conv.weight), None, conv.stride, conv.padding)
    assert torch.allclose(bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)  # the subnet's own statistics
    with pytest.raises(ValueError, match=r"recalibrate_bn\(\) got no batches; pass training batches"):
        sn.recalibrate_bn([])


def test_to_reference_defaults_to_the_active_subnet(tiny_resnet_supernet, random_batches):
    sn = tiny_resnet_supernet()
    x = random_batches(n=1, seed=6)[0][0]
    cfg = sn.uniform(4, 4, symmetric=False)
    sn.apply(cfg)
    sn.model.eval()
    ref = sn.to_reference()
    with torch.no_grad():
        assert torch.equal(ref(x), sn.model(x))
    assert sn.current_config() == cfg


def test_fresh_copies_from_the_fixture_are_independent(tiny_resnet_supernet):
    a, b = tiny_resnet_supernet(), tiny_resnet_supernet()
    a.apply(a.min_config())
    assert b.current_config() == b.max_config(per_channel=True, symmetric=True)
    assert a.model is not b.model and copy.deepcopy(a).current_config() == a.current_config()
