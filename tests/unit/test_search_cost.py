"""Cost model: MACs / BitOps / size / average bits against hand-computed values, and vectorized == per-config."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import eqnet_plugin as eq
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.search import CostModel, SearchSpace, cost_of
from eqnet_plugin.search.cost import FLOAT_BITS
from eqnet_plugin.quant.space import QuantChoice


pytestmark = pytest.mark.usefixtures("one_thread")


class _Toy(nn.Module):
    """conv 3->8 (3x3, pad 1), depthwise 8->8 (3x3, stride 2, pad 1, no bias), linear 128 -> 5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):                                        # (B, 3, 8, 8)
        return self.fc(self.dw(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    space = eq.ElasticSpace(fixed_bits=None)
    gm = prepare_qat_fx(_Toy().train(), eq.elastic_qconfig_mapping(space), (torch.randn(2, 3, 8, 8),))
    sn = eq.Supernet(gm, space)
    return sn, CostModel.from_supernet(sn, torch.randn(4, 3, 8, 8))      # batch 4: counts are per sample


def _cfg(sn, wbits, abits, symmetric=True, per_channel=True):
    """Weights of conv/dw/fc at `wbits`, their input quantizers at `abits`, other groups 8-bit."""
    out = {g: QuantChoice(8, symmetric, per_channel and fq.is_weight) for g, fq in sn.groups.items()}
    for lay, wb, ab in zip(sn.layers, wbits, abits):
        out[lay.weight] = QuantChoice(wb, symmetric, per_channel)
        out[lay.input] = QuantChoice(ab, symmetric, False)
    return eq.SubnetConfig(out)


def test_toy_macs_bitops_size_avg_bits_by_hand(toy):
    sn, cm = toy
    assert [lay.name for lay in sn.layers] == ["conv", "dw", "fc"]
    macs = [8 * 8 * 8 * 3 * 3 * 3, 8 * 4 * 4 * 1 * 3 * 3, 128 * 5]          # Cout*Ho*Wo*(Cin/g)*k*k; in*out
    assert [lay.macs for lay in cm.layers] == macs and cm.total_macs == sum(macs)
    params = [8 * 3 * 9, 8 * 9, 128 * 5]
    assert [lay.params for lay in cm.layers] == params
    assert [lay.input_numel for lay in cm.layers] == [3 * 64, 8 * 64, 128]
    w, a = (4, 3, 6), (8, 5, 2)
    c = cm(_cfg(sn, w, a))
    assert c.bitops == sum(m * wb * ab for m, wb, ab in zip(macs, w, a))
    # packed weights + per-channel float32 scales (symmetric: no zero points) + float32 bias (conv, fc only)
    size = sum(p * b / 8 for p, b in zip(params, w)) + (8 + 8 + 5) * 4 + (8 + 5) * 4
    assert c.size_bytes == pytest.approx(size)
    assert c.avg_weight_bits == pytest.approx(sum(p * b for p, b in zip(params, w)) / sum(params))
    assert c.avg_act_bits == pytest.approx((192 * 8 + 512 * 5 + 128 * 2) / (192 + 512 + 128))
    # asymmetric per-tensor: one scale (4 B) + one zero point (1 B) per layer
    c2 = cm(_cfg(sn, w, a, symmetric=False, per_channel=False))
    assert c2.size_bytes == pytest.approx(sum(p * b / 8 for p, b in zip(params, w)) + 3 * 5 + (8 + 5) * 4)
    assert c2.bitops == c.bitops
    assert cost_of(sn, _cfg(sn, w, a), torch.randn(1, 3, 8, 8)) == c


def test_layer_without_input_quantizer_counts_float_bits(toy):
    sn, cm = toy
    lay = cm.layers[0]
    cm2 = CostModel(cm.group_names, [lay.__class__(**{**lay.__dict__, "input": None})] + list(cm.layers[1:]))
    cfg = _cfg(sn, (4, 4, 4), (4, 4, 4))
    assert cm2(cfg).bitops - cm(cfg).bitops == lay.macs * 4 * (FLOAT_BITS - 4)


def test_batch_equals_per_config_and_model_state_unchanged(toy):
    sn, cm = toy
    sp = SearchSpace.from_supernet(sn)
    bits, cond = sp.uniform_random(64, np.random.default_rng(0))
    f = sp.flags(cond)
    r = cm.batch(bits, f[:, :1], f[:, 1:2])
    for i in range(0, 64, 7):
        c = cm(sp.decode(bits[i], cond[i]))
        assert (c.bitops, c.size_bytes) == (r["bitops"][i], r["size_bytes"][i])
        assert c.avg_weight_bits == r["avg_weight_bits"][i] and c.avg_act_bits == r["avg_act_bits"][i]
    bn_free_state = {k: v.clone() for k, v in sn.model.state_dict().items()}
    sn.model.train()
    CostModel.from_supernet(sn, torch.randn(1, 3, 8, 8))
    assert sn.model.training
    assert all(torch.equal(v, sn.model.state_dict()[k]) for k, v in bn_free_state.items())


def test_bad_inputs_raise(toy):
    sn, cm = toy
    with pytest.raises(ValueError, match="shape"):
        cm.batch(np.zeros((2, 3), dtype=int), np.zeros((2, 1), bool), np.zeros((2, 1), bool))
    with pytest.raises(ValueError, match="misses groups"):
        cm(eq.SubnetConfig({}))
    with pytest.raises(TypeError, match="example_inputs"):
        CostModel.from_supernet(sn, "x")


def test_bn_stats_unchanged_on_bn_model():
    gm = prepare_qat_fx(TinyResNet(widths=(4, 8)).train(), eq.elastic_qconfig_mapping(),
                        (torch.randn(2, 1, 8, 8),))
    sn = eq.Supernet(gm)
    before = {k: v.clone() for k, v in gm.state_dict().items() if "running" in k or "num_batches" in k}
    cm = CostModel.from_supernet(sn, torch.randn(1, 1, 8, 8))
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
    assert gm.training and cm.total_macs > 0 and len(cm.layers) == len(sn.layers)


@pytest.mark.slow
def test_resnet18_total_macs_at_224():
    import torchvision
    x = torch.randn(1, 3, 224, 224)
    gm = prepare_qat_fx(torchvision.models.resnet18().train(), eq.elastic_qconfig_mapping(), (x,))
    sn = eq.Supernet(gm)
    cm = CostModel.from_supernet(sn, x)
    assert cm.total_macs == 1_814_073_344                         # the well-known 1.82 GMACs
    assert cm.total_params == 11_678_912                          # conv + fc weights (no BN, no bias)
    c = cm(sn.uniform(8, 8))
    assert c.bitops == pytest.approx(cm.total_macs * 64)          # every layer 8x8 (first/last fixed at 8)
    assert c.avg_weight_bits == 8.0 and c.avg_act_bits == 8.0
