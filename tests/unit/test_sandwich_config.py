"""`SandwichConfig`, the training recipe object of `sandwich_step`: validation, and the step it configures."""
from __future__ import annotations

import pytest
import torch

from eqnet_plugin import SandwichConfig, WDRLoss, sandwich_step
from eqnet_plugin.train import qat_step

from _tiny import tiny_data


@pytest.fixture(scope="module")
def x():
    return tiny_data()[0].tensors[0][:4]


def test_a_bare_step_is_the_default_recipe(x, tiny_digits_supernet):
    """One default per knob: `sandwich_step` without a recipe is ``SandwichConfig()``'s step (WDR included)."""
    y = torch.tensor([0, 1, 2, 3])
    results = []
    for kw in (dict(), dict(recipe=SandwichConfig(wdr=WDRLoss()))):
        sn = tiny_digits_supernet()
        opt = torch.optim.SGD(sn.model.parameters(), lr=0.1)
        losses = sandwich_step(sn, x, y, opt, generator=torch.Generator().manual_seed(0), **kw)
        results.append((losses["total"], [p.detach().clone() for p in sn.model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_subnet_weights_scale_each_subnets_gradient(x, tiny_digits_supernet):
    """Weights (1, 0, 0) leave only the widest subnet's gradient: the step equals a plain QAT step of H."""
    y = torch.tensor([0, 1, 2, 3])
    params = []
    for weights in ((1.0, 0.0, 0.0), (1.0, 1.0, 1.0), None):
        sn = tiny_digits_supernet()
        cfgs = (sn.max_config(), sn.uniform(4, 4, symmetric=False), sn.min_config())
        opt = torch.optim.SGD(sn.model.parameters(), lr=0.1)
        if weights is None:
            qat_step(sn, cfgs[0], x, y, opt, recipe=SandwichConfig(wdr=None))
        else:
            sandwich_step(sn, x, y, opt, configs=cfgs, recipe=SandwichConfig(wdr=None, subnet_weights=weights))
        params.append([p.detach().clone() for p in sn.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[2]))
    assert not all(torch.equal(a, b) for a, b in zip(params[1], params[2]))


def test_sandwich_config_validates(tiny_digits_supernet):
    with pytest.raises(ValueError, match="lam"):
        SandwichConfig(lam=1.5)
    with pytest.raises(ValueError, match="subnet_weights"):
        SandwichConfig(subnet_weights=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="subnet_weights"):
        SandwichConfig(subnet_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="grad_clip_value"):
        SandwichConfig(grad_clip_value=0)
    assert SandwichConfig().wdr is not SandwichConfig().wdr             # no module shared between recipes
    sn = tiny_digits_supernet()
    opt = torch.optim.SGD(sn.model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        sandwich_step(sn, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), opt, lamda=0.5)
