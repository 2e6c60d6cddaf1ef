"""Evaluation: top-1 accuracy of a model, and of a supernet's subnets with BatchNorm statistics re-estimated per
subnet on training batches (`bn_batches_from`)."""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..quant.space import SubnetConfig
from ..supernet import Supernet
from ..supernet.batches import device_of

__all__ = ["accuracy", "evaluate", "evaluate_configs", "bn_batches_from"]


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def _preserved_bn_state(model: nn.Module):
    """Restore every BatchNorm's running statistics and the model's train/eval mode on exit."""
    bns = _bn_modules(model)
    saved = [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for m, state in zip(bns, saved):
                for k, v in m.named_buffers(recurse=False):
                    v.copy_(state[k])
        model.train(was_training)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of `model` in eval mode on (inputs, targets) batches; mode restored afterwards."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            correct += (model(x).argmax(dim=1) == y).sum()
            total += int(y.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy() got no batches; pass a loader of (inputs, targets)")
    return int(correct.item()) / total


def evaluate(supernet: Supernet, cfg: SubnetConfig, loader: Iterable, bn_batches: Iterable | None,
             max_bn_batches: int | None = None, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of subnet `cfg` on `loader`.

    BatchNorm statistics are re-estimated for `cfg` on `bn_batches` (training data, never test data; None keeps
    the current statistics), then the subnet runs in eval mode. Afterwards the BN statistics, the active subnet and
    the train/eval mode are restored, so evaluating in the middle of training does not change training.
    """
    with _preserved_bn_state(supernet.model), supernet.activate(cfg):
        if bn_batches is not None:
            supernet.recalibrate_bn(bn_batches, max_bn_batches)
        return accuracy(supernet.model, loader, max_batches)


def evaluate_configs(supernet: Supernet, configs: Mapping[str, SubnetConfig], loader: Iterable,
                     bn_batches: Iterable | None, max_bn_batches: int | None = None, max_batches: int | None = None,
                     progress: bool = False) -> dict[str, float]:
    """`evaluate` for every named config; `bn_batches` is read once and reused. Returns {name: accuracy}."""
    if bn_batches is not None and not isinstance(bn_batches, (list, tuple)):
        bn_batches = list(itertools.islice(bn_batches, max_bn_batches))
    names = list(configs)
    bar = _progress(names, progress, desc="evaluate")
    return {name: evaluate(supernet, configs[name], loader, bn_batches, max_bn_batches, max_batches) for name in bar}


def bn_batches_from(dataset, num_batches: int = 8, batch_size: int = 64, seed: int = 0) -> list:
    """A fixed list of `num_batches` random training batches for BN recalibration, drawn with its own seeded
    generator (so it never consumes the training loader's shuffling state)."""
    g = torch.Generator().manual_seed(int(seed))
    n = len(dataset)
    idx = torch.randperm(n, generator=g)[: min(n, num_batches * batch_size)]
    loader = DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False)
    return list(loader)


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, **kw)
