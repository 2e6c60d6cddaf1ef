"""Supernet training (paper section 3.4): the sandwich step, evaluation with BN recalibration, a complete
training loop, checkpoints, and the float / single-config baselines the benchmark compares against.

Inside an existing loop, replace ``loss = ce(model(x), y); loss.backward(); opt.step()`` by::

    losses = sandwich_step(sn, x, y, opt, generator=g, wdr=WDRLoss())    # model=ddp_module under DDP

Each step trains three subnets: H (every group at its widest bits), R (random) and L (narrowest), each with a random
symmetry and granularity per group; H learns from the labels, R from H, L from R (GPG), plus the WDR penalty.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import os
import pickle
import random
import re
import time
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed as D
from ..quant.fake_quant import ElasticFakeQuantize
from .losses import WDRLoss, gpg_term
from .optim import SubnetOptimizer
from ..quant.space import ElasticSpace, SubnetConfig, atomic_write_bytes
from ..supernet import Supernet

__all__ = ["SandwichConfig", "sample_sandwich", "sandwich_step", "qat_step", "evaluate", "evaluate_configs", "accuracy",
           "bn_batches_from", "cosine_scheduler", "train_supernet", "train_float", "lsq_qat", "save_checkpoint",
           "load_checkpoint", "read_checkpoint", "CheckpointError", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "eqnet_plugin.checkpoint"
CHECKPOINT_VERSION = 1


# --- one training step ----------------------------------------------------------------------------------------
def sample_sandwich(supernet: Supernet, generator: torch.Generator | None = None, scheme: str = "group"
                    ) -> tuple[SubnetConfig, SubnetConfig, SubnetConfig]:
    """(H, R, L): max bits, random bits, min bits.

    Args:
        scheme: "group" (the paper and its official code): symmetry and granularity random per group;
            "subnet": one random (symmetry, weight granularity) per subnet, shared by all its groups, as a
            deployed subnet has.
    """
    if scheme == "group":
        return (supernet.max_config(generator=generator), supernet.sample(generator),
                supernet.min_config(generator=generator))
    if scheme != "subnet":
        raise ValueError(f"scheme={scheme!r}: use 'group' (random per group, the paper's) or 'subnet'")
    space = supernet.space
    syms = sorted(set(space.weight_symmetric) & set(space.act_symmetric), reverse=True)
    if not syms:
        raise ValueError("scheme='subnet' needs a symmetry allowed for both weights and activations")

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]
    out = []
    for build in (supernet.max_config, None, supernet.min_config):
        sym, pc = pick(syms), pick(space.weight_per_channel)
        out.append(build(symmetric=sym, per_channel=pc) if build is not None else
                   supernet.sample(generator, symmetric=sym, per_channel=pc))
    return tuple(out)


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _set_cells(supernet: Supernet, cfg: SubnetConfig) -> None:
    for g, ch in cfg.groups.items():
        supernet.groups[g].set_cell(ch.bits, ch.symmetric, ch.per_channel)


def _finish_step(supernet: Supernet, net: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None,
                 sync: bool, check_ranks: bool, grad_clip_value: float | None = None,
                 losses: Mapping[str, torch.Tensor] | None = None) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_subnet = isinstance(optimizer, SubnetOptimizer) and optimizer.stashed()
    if sync and not per_subnet:
        pg = getattr(net, "process_group", None)
        D.all_reduce_gradients(params, group=pg, check=check_ranks)
    if losses is not None:
        total = torch.stack([v.float() for v in losses.values()]).sum()
        if not bool(torch.isfinite(total)):                      # one host sync per step, before any update
            optimizer.zero_grad(set_to_none=True)
            bad = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"non-finite training loss {bad}: the optimizer step was skipped and the "
                                     "parameters are unchanged; check the inputs for NaN/inf and lower the "
                                     "learning rate")

    def prepare() -> None:                  # on the gradient one optimizer step takes (per subnet with SubnetOptimizer)
        if sync and per_subnet:
            D.all_reduce_gradients(params, group=getattr(net, "process_group", None), check=check_ranks)
        grads = [p for p in params if p.grad is not None]
        if grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(grads, grad_clip_value)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(grads, grad_clip)

    if per_subnet:
        optimizer.step(prepare=prepare)
    else:
        prepare()
        optimizer.step()
    if sync and getattr(net, "broadcast_buffers", True):
        # DDP would broadcast rank 0's buffers (BN statistics) at the next forward; no_sync skips that, so do it
        # here. Quantizer buffers are identical on every rank by construction and keep their Python mirror.
        D.broadcast_buffers(supernet.model, group=getattr(net, "process_group", None), skip=(ElasticFakeQuantize,))


def _check_batch(inputs, targets, check_finite: bool) -> None:
    """Validate one batch before any forward pass (a bad batch must not touch BatchNorm buffers)."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors (one batch: inputs (B, ...), targets (B,))")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same batch size, got inputs {tuple(inputs.shape)} and "
                         f"targets {tuple(targets.shape)}")
    if check_finite and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("the input batch holds NaN or inf values; nothing was updated (clean the data, or pass "
                         "check_finite=False to skip this check)")


@dataclasses.dataclass(frozen=True)
class SandwichConfig:
    """The training recipe of `sandwich_step` / `train_supernet` (and the shared knobs of `qat_step`), in one
    object, as torchao does for its QAT configs. The defaults are the paper's recipe with the official trainer's
    gradient clipping.

    Attributes:
        wdr: the Weight Distribution Regularization loss added every step (None: off). Default `WDRLoss()`.
        lam, temperature: GPG distillation weight and temperature (paper: 0.5, 1.0).
        gpg: False trains each subnet with the plain label loss (the ablation without GPG).
        scheme: how symmetry / granularity are sampled (`sample_sandwich`; default per group, the paper's).
        grad_clip: clip the global gradient norm to this value before the step (default: off).
        grad_clip_value: clip every gradient element to [-v, v] (default 1.0, the official EQ-Net trainer's
            ``clip_grad_value_(1.0)``; None: off).
        criterion: the label loss ``criterion(logits, targets)`` (default: cross-entropy).
        subnet_weights: the weights of the H, R and L subnets' losses in the summed gradient (default 1, 1, 1: the
            paper's). Lowering L's weight lets the widest subnet's gradient count for more in the shared weights.
        check_finite: refuse NaN/inf input batches before any forward and non-finite losses before the optimizer
            step (two host syncs per step; False skips both).

    Example:
        >>> recipe = SandwichConfig(lam=0.7, wdr=None)
        >>> losses = sandwich_step(sn, x, y, opt, recipe=recipe, generator=g)  # doctest: +SKIP

    The loose keyword arguments (``wdr=``, ``lam=``, ...) of `sandwich_step`, `qat_step` and `train_supernet`
    still work and override the recipe's fields.
    """

    wdr: WDRLoss | None = dataclasses.field(default_factory=WDRLoss)
    lam: float = 0.5
    temperature: float = 1.0
    gpg: bool = True
    scheme: str = "group"
    grad_clip: float | None = None
    grad_clip_value: float | None = 1.0
    criterion: Callable | None = None
    check_finite: bool = True
    subnet_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        w = tuple(float(v) for v in self.subnet_weights)
        if len(w) != 3 or not all(v >= 0 for v in w) or w[0] <= 0:
            raise ValueError(f"SandwichConfig.subnet_weights={self.subnet_weights!r} must be three non-negative "
                             "weights (H, R, L) with H's positive, e.g. (1.0, 1.0, 0.5)")
        object.__setattr__(self, "subnet_weights", w)
        if self.wdr is not None and not callable(self.wdr):
            raise TypeError(f"SandwichConfig.wdr must be a WDRLoss (or None), got {type(self.wdr).__name__}")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"SandwichConfig.lam={self.lam!r} must lie in [0, 1]")
        if float(self.temperature) <= 0:
            raise ValueError(f"SandwichConfig.temperature={self.temperature!r} must be positive")
        for name in ("grad_clip", "grad_clip_value"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"SandwichConfig.{name}={v!r} must be positive (None: off)")


_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(SandwichConfig))
_STEP_DEFAULT = SandwichConfig(wdr=None)      # a bare sandwich_step / qat_step: no WDR (as before SandwichConfig)


def _recipe(recipe: SandwichConfig | None, overrides: Mapping[str, object], default: SandwichConfig,
            who: str, allowed: tuple[str, ...] = _RECIPE_FIELDS) -> SandwichConfig:
    """`recipe` (or `default`) with the loose keyword arguments applied; unknown names raise TypeError."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"{who}() got unexpected keyword argument(s) {unknown}; recipe knobs: {', '.join(allowed)}")
    if recipe is not None and not isinstance(recipe, SandwichConfig):
        raise TypeError(f"{who}(recipe=...) expects a SandwichConfig, got {type(recipe).__name__}")
    base = recipe if recipe is not None else default
    return dataclasses.replace(base, **overrides) if overrides else base


def _track_bn(supernet: Supernet, on: bool) -> None:
    for m in supernet.bn_modules:
        m.track_running_stats = on


def sandwich_step(supernet: Supernet, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                  *, recipe: SandwichConfig | None = None, generator: torch.Generator | None = None,
                  model: nn.Module | None = None,
                  configs: tuple[SubnetConfig, SubnetConfig, SubnetConfig] | None = None,
                  sync_grads: bool | None = None, check_ranks: bool = True, **knobs) -> dict[str, torch.Tensor]:
    """One EQ-Net training step: sample H/R/L, forward and backward each, WDR, one optimizer step.

    Args:
        supernet: the Supernet view of the model being trained.
        inputs, targets: one batch (on the model's device), of the same batch size (checked before any forward).
        optimizer: optimizer over the model's parameters (including the quantizers' scales). A `SubnetOptimizer`
            (recommended; `eqnet_plugin.train.optim`) receives each subnet's gradient apart and steps each with its own
            state; any other optimizer steps once on the summed gradient (the paper's).
        recipe: the `SandwichConfig` (WDR, GPG weight and temperature, sampling scheme, gradient clipping, label
            loss, finite checks). Default: ``SandwichConfig(wdr=None)``, i.e. the paper's recipe without WDR; pass
            ``SandwichConfig()`` for the full recipe.
        generator: CPU generator for sampling; under DDP it must be seeded identically on every rank
            (`distributed.shared_generator`).
        model: the module to run the forwards through, e.g. the `DistributedDataParallel` wrapper of
            `supernet.model` (default: `supernet.model`).
        configs: explicit (H, R, L) instead of sampling.
        sync_grads: average gradients over ranks (default: when `model` is DDP). DDP's own reducer is bypassed
            (forwards run under ``no_sync()``; see `eqnet_plugin.train.distributed` for why).
        check_ranks: under DDP, verify that all ranks trained the same parameters (one host sync per step).
        **knobs: any `SandwichConfig` field (``wdr=``, ``lam=``, ``temperature=``, ``gpg=``, ``scheme=``,
            ``grad_clip=``, ``grad_clip_value=``, ``criterion=``, ``check_finite=``, ``subnet_weights=``),
            overriding `recipe`.
            H learns from the label loss; R and L from ``lam * KL(teacher) + (1 - lam) * criterion``.
    Returns:
        detached {"h", "r", "l", "wdr", "total"} scalar losses and "logits": the widest (H) subnet's detached
        logits, for training accuracy.
    Raises:
        ValueError: gradients are synchronized but neither `generator` nor `configs` is given; inputs and targets
            of different batch sizes.
        FloatingPointError: a non-finite loss (with `check_finite`).

    The active subnet is restored afterwards; parameters of cells no subnet used keep ``grad=None``. BatchNorm
    running statistics are updated by the H subnet only (R and L normalize with their batch statistics), so the
    model's own eval mode is right for the widest subnet (``bn_fold="running"`` supernets: by all three).
    """
    r = _recipe(recipe, knobs, _STEP_DEFAULT, "sandwich_step")
    wdr, lam, temperature, gpg, criterion = r.wdr, r.lam, r.temperature, r.gpg, r.criterion
    _check_batch(inputs, targets, r.check_finite)
    net = model if model is not None else supernet.model
    ddp = isinstance(net, DistributedDataParallel)
    sync = ddp if sync_grads is None else bool(sync_grads)
    if sync and generator is None and configs is None and D.is_distributed():
        raise ValueError("under DDP every rank must sample the same subnets: pass "
                         "generator=eqnet_plugin.train.distributed.shared_generator(seed) to sandwich_step")
    supernet.require_calibrated("sandwich_step")
    if configs is None:
        configs = sample_sandwich(supernet, generator, r.scheme)
    for cfg in configs:
        supernet.validate(cfg)
    previous = supernet.current_config()
    optimizer.zero_grad(set_to_none=True)
    per_subnet = isinstance(optimizer, SubnetOptimizer)
    if per_subnet and optimizer.subnets != 3:
        raise ValueError(f"sandwich_step needs a SubnetOptimizer with subnets=3 (H, R, L), got {optimizer.subnets}")
    losses: dict[str, torch.Tensor] = {}
    h_logits = None
    h_only = supernet.bn_fold == "fixed"
    try:
        with net.no_sync() if ddp else contextlib.nullcontext():
            teacher = None
            for name, cfg, weight in zip(("h", "r", "l"), configs, r.subnet_weights):
                _set_cells(supernet, cfg)
                if h_only:
                    _track_bn(supernet, name == "h")
                logits = net(inputs)                                   # (B, K)
                loss = gpg_term(logits, teacher if gpg else None, targets, lam, temperature, criterion)
                (loss if weight == 1.0 else loss * weight).backward()  # frees this subnet's graph
                if per_subnet and name != "l":                          # L's stash waits for WDR's gradient
                    optimizer.stash(len(losses))
                losses[name] = loss.detach()
                teacher = logits.detach()
                if h_logits is None:
                    h_logits = teacher
            if wdr is not None:
                reg = wdr(supernet)
                reg.backward()
                losses["wdr"] = reg.detach()
            else:
                losses["wdr"] = torch.zeros((), device=losses["h"].device)
            if per_subnet:
                optimizer.stash(2)
    finally:
        if h_only:
            _track_bn(supernet, True)
        _set_cells(supernet, previous)
    _finish_step(supernet, net, optimizer, r.grad_clip, sync, check_ranks, r.grad_clip_value,
                 losses if r.check_finite else None)
    wh, wr, wl = r.subnet_weights                       # "total" is the loss the step descended
    losses["total"] = wh * losses["h"] + wr * losses["r"] + wl * losses["l"] + losses["wdr"]
    losses["logits"] = h_logits
    return losses


def qat_step(supernet: Supernet, cfg: SubnetConfig, inputs: torch.Tensor, targets: torch.Tensor,
             optimizer: torch.optim.Optimizer, *, recipe: SandwichConfig | None = None, model: nn.Module | None = None,
             sync_grads: bool | None = None, **knobs) -> dict[str, torch.Tensor]:
    """One conventional QAT step of a single subnet `cfg` (label loss [+ WDR]): the dedicated baseline, with the
    same gradient clipping and checks as `sandwich_step`.

    `recipe` / `**knobs`: the `SandwichConfig` fields a single-subnet step uses (``wdr``, ``grad_clip``,
    ``grad_clip_value``, ``criterion``, ``check_finite``); default ``SandwichConfig(wdr=None)``.

    Returns detached {"loss", "wdr", "total", "logits"}; the active subnet is restored afterwards.
    """
    r = _recipe(recipe, knobs, _STEP_DEFAULT, "qat_step",
                ("wdr", "grad_clip", "grad_clip_value", "criterion", "check_finite"))
    wdr, grad_clip, grad_clip_value, criterion, check_finite = (r.wdr, r.grad_clip, r.grad_clip_value, r.criterion,
                                                                r.check_finite)
    _check_batch(inputs, targets, check_finite)
    net = model if model is not None else supernet.model
    ddp = isinstance(net, DistributedDataParallel)
    sync = ddp if sync_grads is None else bool(sync_grads)
    supernet.validate(cfg)
    supernet.require_calibrated("qat_step")
    previous = supernet.current_config()
    optimizer.zero_grad(set_to_none=True)
    try:
        with net.no_sync() if ddp else contextlib.nullcontext():
            _set_cells(supernet, cfg)
            logits = net(inputs)
            loss = (criterion or F.cross_entropy)(logits, targets)
            total = loss + (wdr(supernet) if wdr is not None else 0.0)
            total.backward()
    finally:
        _set_cells(supernet, previous)
    _finish_step(supernet, net, optimizer, grad_clip, sync, True, grad_clip_value,
                 {"total": total.detach()} if check_finite else None)
    return {"loss": loss.detach(), "wdr": (total - loss).detach(), "total": total.detach(), "logits": logits.detach()}


# --- evaluation -----------------------------------------------------------------------------------------------
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
    device = _device_of(model)
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


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over `total_steps` optimizer steps (the paper's schedule), stepped once per step."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps)))


# --- checkpoints ----------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, not written by `save_checkpoint`, or belongs to another model."""


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_plain(value, where: str = "extra") -> None:
    """Raise TypeError unless `value` is made of plain Python values and tensors (what weights_only loads)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints store plain values (dict, list, str, "
                    "numbers, tensors) so they load with torch.load(weights_only=True): convert it first, e.g. "
                    "SubnetConfig.to_dict()")


def _hash_into(h, obj) -> None:
    """Feed `obj` (what `save_checkpoint` stores: plain values and tensors, nested in dicts, lists and tuples) into
    the hash `h` in a canonical form that a save/load round trip (also to another device) leaves unchanged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.is_quantized:
            t = t.int_repr()
        t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())        # the buffer itself, no copy
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _hash_into(h, k)
            _hash_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _hash_into(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(f"{obj!r};".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)};".encode() + b)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"B{len(obj)};".encode() + bytes(obj))
    else:
        h.update(f"O{type(obj).__name__}:{obj!r};".encode())


def _content_sha256(ckpt: Mapping) -> str:
    """sha256 (hex) over every entry of a checkpoint dict except its stored ``"sha256"``."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in ckpt.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, supernet: Supernet, optimizer: torch.optim.Optimizer | None,
                    scheduler=None, step: int = 0, generator: torch.Generator | None = None,
                    extra: Mapping | None = None) -> bool:
    """Write a training checkpoint atomically (temporary file in the same folder, then `os.replace`).

    Holds the model state_dict, optimizer, scheduler, step, the sampling generator's state, the torch / CUDA /
    numpy / Python RNG states, the ElasticSpace, the active subnet, a format version and ``"sha256"``: a hash of all
    the other entries, which `read_checkpoint` verifies (a flipped bit anywhere in the stored state is reported,
    never loaded). `extra` is stored as given (plain Python values and tensors, loadable with
    ``torch.load(weights_only=True)``). Under torch.distributed only rank 0 writes. Returns True when this process
    wrote the file.

    Raises:
        TypeError: `extra` holds an object that is not a plain value (nothing is written).
    """
    if not D.is_main_process():
        return False
    _check_plain(dict(extra) if extra is not None else {})
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": supernet.model.state_dict(),
        "space": supernet.space.to_dict(),
        "active_config": supernet.current_config().to_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "generator": generator.get_state() if generator is not None else None,
        "rng": _rng_state(),
        "extra": dict(extra) if extra is not None else {},
    }
    ckpt["sha256"] = _content_sha256(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return True


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), without torch's advice
    to load with weights_only=False (which would run arbitrary code from the file)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if "weights_only" in text or "weights-only" in text.lower() or not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


_ZIP_MAGIC = b"PK\x03\x04"
_CORRUPT_ADVICE = ("use an earlier checkpoint or train again (save_checkpoint writes atomically, so a crash while "
                   "saving leaves the previous file intact)")


def read_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """The raw checkpoint dict written by `save_checkpoint`, validated; restores nothing.

    Checks, in order: the file is a PyTorch zip archive, every entry passes its zip CRC check, it loads with
    ``torch.load(weights_only=True)``, it has our format and version, and its content matches the ``"sha256"``
    stored when it was written (checkpoints of releases without the hash get the CRC check only).

    Raises:
        FileNotFoundError: no file. CheckpointError: empty, truncated, corrupt or foreign file (the message names
        the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path!r} is a folder; give the checkpoint file in it (e.g. "
                                  f"{os.path.join(path, 'supernet.pt')!r})")
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): it was never written completely; "
                              + _CORRUPT_ADVICE)
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == _ZIP_MAGIC:
            raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt (its zip directory is missing or "
                                  "damaged: the file was cut off or damaged after writing); " + _CORRUPT_ADVICE)
        raise CheckpointError(f"{path!r} is not an eqnet_plugin checkpoint (not a PyTorch zip archive); write "
                              "checkpoints with `eqnet train` or eqnet_plugin.train.save_checkpoint")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:       # BadZipFile, zlib.error, EOFError, OSError, ...: a damaged archive
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt ({_first_line(e)}); "
                              + _CORRUPT_ADVICE) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its entry {bad!r} fails the zip CRC check (the file "
                              "was damaged after writing); " + _CORRUPT_ADVICE)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:     # weights_only refused an object: not something save_checkpoint writes
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it holds a {found.group(1)} object)" if found else ""
        raise CheckpointError(f"{path!r} is not an eqnet_plugin checkpoint and cannot be loaded safely{what}; write "
                              "checkpoints with `eqnet train` or eqnet_plugin.train.save_checkpoint") from None
    except Exception as e:      # RuntimeError, EOFError, KeyError, ...: damaged pickle or records
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt ({_first_line(e)}); "
                              + _CORRUPT_ADVICE) from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path!r} is not an eqnet_plugin checkpoint (found {keys}); write one with "
                              "eqnet_plugin.train.save_checkpoint, or load a plain state_dict with "
                              "supernet.model.load_state_dict(torch.load(path))")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {ckpt.get('version')!r}; this eqnet_plugin reads "
                              f"version {CHECKPOINT_VERSION}")
    stored = ckpt.get("sha256")
    if stored is not None and stored != _content_sha256(ckpt):
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its content does not match the sha256 stored when "
                              "it was written (it was changed after saving); " + _CORRUPT_ADVICE)
    return ckpt


def load_checkpoint(path: str | os.PathLike, supernet: Supernet, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, generator: torch.Generator | None = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint written by `save_checkpoint` into `supernet` (and optimizer, scheduler, generator).

    Args:
        restore_rng: also restore the global torch / CUDA / numpy / Python RNG states (exact resume).
    The file is read on the CPU; `load_state_dict` copies the tensors to the model's and optimizer's devices.
    Returns:
        {"step", "extra", "space" (ElasticSpace), "active_config" (SubnetConfig), "rng"}.
    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: the file is truncated/corrupt, not ours, or holds another model's (or space's) state.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path, "cpu")
    space = ElasticSpace.from_dict(ckpt["space"])
    if space != supernet.space:
        raise CheckpointError(f"{path!r} was trained with space {space} but this supernet uses {supernet.space}; "
                              "build the Supernet with the checkpoint's space (ElasticSpace.from_dict)")
    state = ckpt["model"]
    own = supernet.model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path!r} holds another model's state: missing keys {missing[:5]}, unexpected keys "
                              f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all); rebuild the same "
                              "model and prepare it the same way (elastic_qconfig_mapping, backend_config)")
    try:
        supernet.model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path!r} does not fit this model: {str(e).splitlines()[-1].strip()[:300]}") from None
    supernet.mark_bn_trained()             # trained BN statistics: other subnets need their own (recalibrate_bn)
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise CheckpointError(f"{path!r} holds no optimizer state; load it with optimizer=None")
        saved = ckpt["optimizer"]
        if isinstance(saved, dict) and "subnets" in saved and not isinstance(optimizer, SubnetOptimizer):
            raise CheckpointError(f"{path!r} holds one optimizer state per sandwich subnet (SubnetOptimizer); "
                                  "resume it with eqnet_plugin.SubnetOptimizer(supernet.model.parameters(), "
                                  "torch.optim.Adam, lr=...), or pass optimizer=None to load the weights only")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path!r}: optimizer state does not match this optimizer ({e}); build the "
                                  "optimizer over supernet.model.parameters() in the same order as when saving"
                                  ) from None
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if generator is not None and ckpt["generator"] is not None:
        generator.set_state(ckpt["generator"])
    if restore_rng:
        _set_rng_state(ckpt["rng"])
    return {"step": ckpt["step"], "extra": ckpt["extra"], "space": space, "rng": ckpt["rng"],
            "active_config": SubnetConfig.from_dict(ckpt["active_config"])}


# --- complete loops -------------------------------------------------------------------------------------------
def _loader_generator(loader) -> torch.Generator:
    """The generator that decides a DataLoader's shuffling (its own, else the global default generator)."""
    g = getattr(loader, "generator", None)
    return g if g is not None else torch.default_generator


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).mean().item()) if values else float("nan")


def train_supernet(supernet: Supernet, train_loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int, *,
                   scheduler=None, val_loader: Iterable | None = None,
                   eval_configs: Mapping[str, SubnetConfig] | None = None, eval_every: int = 1,
                   bn_batches: list | None = None, num_bn_batches: int = 8,
                   checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int | None = None,
                   checkpoint_extra: Mapping | None = None, resume: bool = True,
                   generator: torch.Generator | None = None, model: nn.Module | None = None,
                   recipe: SandwichConfig | None = None, max_steps: int | None = None, progress: bool = True,
                   **knobs) -> dict:
    """Train a supernet with the sandwich rule for `epochs` epochs: progress bar, periodic evaluation,
    checkpoints and exact resume.

    Args:
        supernet: calibrated Supernet (start from a float-trained model, calibrate, then train: the paper's recipe).
        train_loader: (inputs, targets) batches; give it a `generator` (see `data.make_loaders`) for exact resume.
        optimizer: e.g. ``SubnetOptimizer(supernet.model.parameters(), torch.optim.Adam, lr=1e-3)`` (one Adam state
            per subnet, recommended) or ``Adam(supernet.model.parameters(), 1e-3)`` (the paper's).
        epochs: number of epochs.
        scheduler: LR scheduler stepped after every optimizer step (e.g. `cosine_scheduler(opt, steps)`).
        val_loader, eval_configs: every `eval_every` epochs evaluate these named subnets on `val_loader`.
        bn_batches: BN recalibration batches (default: `num_bn_batches` fixed random training batches).
        checkpoint_path: write a checkpoint there at the end of every epoch, every `checkpoint_every` steps, and
            when stopping at `max_steps`; with `resume`, an existing file is loaded first and training continues
            exactly where it stopped (bit-identical on CPU). `checkpoint_extra` (plain values) is stored in every
            checkpoint's ``extra`` next to the loop's own keys (epoch, batch_in_epoch, loader_state, history,
            partial).
        generator: sampling generator (default: seeded with 0; under DDP use `distributed.shared_generator`).
        model: module to run the forwards through (the DDP wrapper under DDP).
        recipe: the `SandwichConfig` of every step (default: ``SandwichConfig()``, the paper's recipe with WDR);
            `**knobs` (``wdr=``, ``lam=``, ``gpg=``, ...) override its fields.
        max_steps: stop after this many steps in total (counting steps before a resume).
        progress: show a tqdm bar (rank 0 only).
    Returns:
        history: {"step", "epoch", "train": [per-epoch mean losses], "eval": [{"epoch", "step", "acc"}],
        "seconds"}.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: use a positive integer")
    recipe = _recipe(recipe, knobs, SandwichConfig(), "train_supernet")
    device = _device_of(supernet.model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    loader_gen = _loader_generator(train_loader)
    history: dict = {"step": 0, "epoch": 0, "train": [], "eval": [], "seconds": 0.0}
    start_epoch, skip, epoch_state, rng_after, partial = 0, 0, None, None, {}
    if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
        info = load_checkpoint(checkpoint_path, supernet, optimizer, scheduler, generator, restore_rng=False)
        extra = info["extra"]
        history = extra.get("history", history)
        start_epoch, skip = int(extra.get("epoch", 0)), int(extra.get("batch_in_epoch", 0))
        epoch_state, rng_after = extra.get("loader_state"), info["rng"]
        partial = {k: list(v.unbind()) for k, v in extra.get("partial", {}).items()}
    if bn_batches is None and eval_configs:
        bn_batches = bn_batches_from(train_loader.dataset, num_bn_batches, train_loader.batch_size or 64)
    step = history["step"]
    t0 = time.perf_counter() - history["seconds"]

    def checkpoint(epoch: int, batch_in_epoch: int, state: torch.Tensor, sums: dict) -> None:
        if checkpoint_path is not None:
            history["seconds"] = time.perf_counter() - t0
            save_checkpoint(checkpoint_path, supernet, optimizer, scheduler, step, generator,
                            extra={**(checkpoint_extra or {}),
                                   "epoch": epoch, "batch_in_epoch": batch_in_epoch, "loader_state": state,
                                   "history": history,
                                   "partial": {k: torch.stack(v).cpu() for k, v in sums.items() if v}})

    total_steps = epochs * len(train_loader)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    bar = _progress(None, progress and D.is_main_process(), total=total_steps, initial=step, desc="supernet")
    supernet.model.train()
    try:
        for epoch in range(start_epoch, epochs):
            if max_steps is not None and step >= max_steps:
                break
            if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            if epoch_state is not None:
                loader_gen.set_state(epoch_state)
            epoch_state = loader_gen.get_state()               # shuffling state at the start of this epoch
            batches = iter(train_loader)
            for _ in range(skip):                              # resume mid-epoch: same order, skip done batches
                if next(batches, None) is None:
                    raise CheckpointError(f"the checkpoint stopped after batch {skip} of epoch {epoch}, but the "
                                          f"train loader has only {len(train_loader)} batches; resume with the "
                                          "same data and batch size")
            if rng_after is not None:                          # global RNG as it was when the checkpoint was saved
                _set_rng_state(rng_after)
                rng_after = None
            sums: dict[str, list[torch.Tensor]] = partial
            partial = {}
            stopped = False
            for i, batch in enumerate(batches, start=skip):
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                losses = sandwich_step(supernet, x, y, optimizer, recipe=recipe, generator=generator, model=model)
                if scheduler is not None:
                    scheduler.step()
                step += 1
                for k, v in losses.items():
                    if k != "logits":
                        sums.setdefault(k, []).append(v)
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{float(losses['total']):.3f}")
                history["step"] = step
                if max_steps is not None and step >= max_steps:
                    checkpoint(epoch, i + 1, epoch_state, sums)
                    stopped = True
                    break
                if checkpoint_every and step % checkpoint_every == 0:
                    checkpoint(epoch, i + 1, epoch_state, sums)
            skip = 0
            if stopped:
                break
            if sums:
                history["train"].append({"epoch": epoch, **{k: _mean(v) for k, v in sums.items()}})
            history["epoch"] = epoch + 1
            if val_loader is not None and eval_configs and (epoch + 1) % eval_every == 0:
                acc = evaluate_configs(supernet, eval_configs, val_loader, bn_batches)
                history["eval"].append({"epoch": epoch + 1, "step": step, "acc": acc})
                if bar is not None:
                    bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
            epoch_state = None
            checkpoint(epoch + 1, 0, loader_gen.get_state(), {})
        if rng_after is not None:                              # resumed a run that had already finished
            _set_rng_state(rng_after)
    finally:
        if bar is not None:
            bar.close()
    history["seconds"] = time.perf_counter() - t0
    return history


def train_float(model: nn.Module, train_loader: Iterable, epochs: int, lr: float = 1e-3, *,
                weight_decay: float = 0.0, val_loader: Iterable | None = None, max_steps: int | None = None,
                progress: bool = False) -> dict:
    """Plain float training (Adam, cosine decay per step, cross-entropy), e.g. the pretraining a supernet starts
    from. Returns {"loss": per-epoch mean loss, "val_acc": accuracy on `val_loader` or None, "seconds"}."""
    device = _device_of(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(train_loader) if max_steps is None else min(max_steps, epochs * len(train_loader))
    sched = cosine_scheduler(opt, steps)
    history: dict = {"loss": [], "val_acc": None}
    t0, step = time.perf_counter(), 0
    model.train()
    for _ in _progress(range(epochs), progress, desc="float"):
        losses = []
        for batch in train_loader:
            if step >= steps:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
            step += 1
        if losses:
            history["loss"].append(_mean(losses))
    if val_loader is not None:
        history["val_acc"] = accuracy(model, val_loader)
    history["seconds"] = time.perf_counter() - t0
    return history


def lsq_qat(supernet: Supernet, cfg: SubnetConfig, train_loader: Iterable, optimizer: torch.optim.Optimizer,
            epochs: int, *, scheduler=None, wdr: WDRLoss | None = None, grad_clip: float | None = None,
            model: nn.Module | None = None, max_steps: int | None = None, progress: bool = False) -> dict:
    """Dedicated LSQ QAT of one subnet: `cfg` is active for every step (the baseline a supernet is compared with;
    same optimizer, schedule and batches as `train_supernet`, one forward per step). `cfg` stays active afterwards.

    Returns {"step", "loss": per-epoch mean loss, "seconds"}.
    """
    supernet.apply(cfg)
    device = _device_of(supernet.model)
    history: dict = {"step": 0, "loss": []}
    t0 = time.perf_counter()
    supernet.model.train()
    for _ in _progress(range(epochs), progress, desc="qat"):
        losses = []
        for batch in train_loader:
            if max_steps is not None and history["step"] >= max_steps:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            out = qat_step(supernet, cfg, x, y, optimizer, model=model, wdr=wdr, grad_clip=grad_clip)
            if scheduler is not None:
                scheduler.step()
            losses.append(out["total"])
            history["step"] += 1
        if losses:
            history["loss"].append(_mean(losses))
    history["seconds"] = time.perf_counter() - t0
    return history
