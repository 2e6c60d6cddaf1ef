"""Builders shared by the adapter and freeze tests: supernets whose BatchNorm is not a near-identity, so that the
BN fold in `freeze` (and every export after it) is exercised."""
from __future__ import annotations

import torch
from torch import nn

import eqnet_plugin
from eqnet_plugin import Supernet


def perturb_bn(model: nn.Module, batches: torch.Tensor, gen: torch.Generator) -> nn.Module:
    """Real BN statistics from train-mode passes over `batches`, plus a random perturbation of the affine
    parameters (an untouched net has mean 0, var 1, weight 1, bias 0)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.train()
        for bn in bns:
            bn.momentum = None
        model(batches)
        for bn in bns:
            bn.weight.mul_(1 + 0.3 * torch.randn(bn.weight.shape, generator=gen))
            bn.bias.add_(0.2 * torch.randn(bn.bias.shape, generator=gen))
    return model


def moved_bn_supernet(build, shape, space=None, backend_config=None, seed=0) -> Supernet:
    """`build()` prepared and calibrated on random data, then its BN running statistics moved a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
    gm = eqnet_plugin.prepare_qat(model, (torch.randn(2, *shape, generator=g),), space=space,
                                  backend_config=backend_config)
    sn = Supernet(gm)
    sn.calibrate([torch.randn(4, *shape, generator=g)])
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.mul_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return sn


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    """A few Adam steps (batches of 64 drawn from x, y) so that the network has real features and logit margins (an
    untrained net has degenerate outputs, where top-1 agreement measures noise)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def train_torchvision(name: str, steps: int = 30) -> nn.Module:
    """Torchvision `name` (10 classes) after `steps` Adam steps on digits at 32x32 (3 channels): real features and
    logit margins, unlike a random-init net, where any float-rounding change cascades over depth. Tests take it
    through the session fixture ``trained_torchvision`` (conftest.py), which trains each model once."""
    import torchvision

    from eqnet_plugin.app.data import digits_splits

    sp = digits_splits(image_size=32)
    x, y = sp.train.tensors
    x = x.repeat(1, 3, 1, 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10)
    return train_steps(model, x, y, steps)
