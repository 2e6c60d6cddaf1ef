"""ExecuTorch target: a PT2E subnet lowered to a .pte with the XNNPACK delegate, run by the ExecuTorch runtime.

Agreement with the supernet's own subnet output for a W8A8 and a mixed 4/8-bit subnet: top-1 on every row, and
every logit within one LSB of the widest activation grid times the classifier's largest row norm (the output itself
is not quantized; XNNPACK's requantization may tip a code across a rounding tie). Fails (does not skip) when executorch is missing.
"""
from __future__ import annotations

import executorch  # noqa: F401  (fail, not skip, without it)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eqnet_plugin import ElasticSpace, Supernet
from eqnet_plugin.adapters import TargetError, get_target
from eqnet_plugin.adapters.executorch import executorch_problems, load_executorch
from eqnet_plugin.frontends.pt2e import prepare_qat


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(0)
    gm = prepare_qat(TinyCNN(), (torch.randn(4, 1, 8, 8),), ElasticSpace(weight_bits=(4, 8), act_bits=(4, 8)))
    sn = Supernet(gm)
    x = torch.randn(64, 1, 8, 8)
    sn.calibrate([x])
    gm.eval()
    return sn, x


@pytest.mark.parametrize("which", ["max", "min"])
def test_executorch_agrees_with_the_supernet(supernet, which, tmp_path):
    sn, x = supernet
    cfg = sn.max_config() if which == "max" else sn.min_config()
    frozen = sn.freeze(cfg)
    assert executorch_problems(frozen) == []
    files = get_target("executorch").export(frozen, (x[:1],), tmp_path)
    got = load_executorch(files)(x.numpy())
    with sn.activate(cfg), torch.no_grad():
        want = sn.model(x).numpy()
    fc = frozen.layer_module("fc")
    # XNNPACK requantizes with its own rounding: a code may tip across a tie (1 LSB) at any activation quantizer
    lsb = max(float(qp.scale.max()) for g, qp in frozen.qparams.items() if not frozen.is_weight(g))
    bound = lsb * float(fc.quantized_weight().detach().abs().sum(1).max())
    err = np.abs(got - want).max()
    print(f"[executorch {which}] max abs {err:.5f} bound {bound:.5f}")
    assert err <= bound and (got.argmax(1) == want.argmax(1)).all()


def test_executorch_refuses_asymmetric_weights(supernet, tmp_path):
    sn, x = supernet
    cfg = sn.max_config()
    groups = dict(cfg.groups)
    conv1_w = next(l.weight_group for l in sn.freeze(cfg).layers if l.name == "conv2")
    groups[conv1_w] = type(groups[conv1_w])(8, symmetric=False, per_channel=True, signed=None)
    cfg = type(cfg)(groups)
    problems = get_target("executorch").check(sn, cfg=cfg)
    assert any("asymmetric" in p for p in problems), problems
    with pytest.raises(TargetError):
        get_target("executorch").export(sn, (x[:1],), tmp_path, cfg=cfg)
    assert not any(tmp_path.iterdir())
