"""One training step: the sandwich step of the supernet (paper section 3.4) and the single-subnet QAT step of the
dedicated baseline, with the recipe both share (`SandwichConfig`).

Inside an existing loop, replace ``loss = ce(model(x), y); loss.backward(); opt.step()`` by::

    losses = sandwich_step(sn, x, y, opt, generator=g)     # model=ddp_module under DDP

Each step trains three subnets: H (every group at its widest bits), R (random) and L (narrowest), each with a random
symmetry and granularity per group; H learns from the labels, R from H, L from R (GPG), plus the WDR penalty.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as D
from ..quant.bn_fold import running_fold_modules
from ..quant.fake_quant import ElasticFakeQuantize
from ..quant.space import SubnetConfig
from ..supernet import Supernet
from .losses import WDRLoss, gpg_term
from .optim import SubnetOptimizer

__all__ = ["SandwichConfig", "sample_sandwich", "sandwich_step", "qat_step"]


@dataclasses.dataclass(frozen=True)
class SandwichConfig:
    """The training recipe of `sandwich_step` (and of `qat_step`, which uses the knobs a single subnet has), in one
    object, as torchao does for its QAT configs. The defaults are the paper's recipe with the official trainer's
    gradient clipping; a step called without a recipe uses ``SandwichConfig()``.

    Attributes:
        wdr: the Weight Distribution Regularization loss added every step (None: off). Default: a fresh
            `WDRLoss()` per config (it holds only its coefficients).
        lam, temperature: GPG distillation weight and temperature (paper: 0.5, 1.0). R and L learn from
            ``lam * KL(teacher) + (1 - lam) * criterion``; ``lam=0`` trains every subnet on the label loss alone.
        grad_clip: clip the global gradient norm to this value before the step (default: off).
        grad_clip_value: clip every gradient element to [-v, v] (default 1.0, the official EQ-Net trainer's
            ``clip_grad_value_(1.0)``; None: off).
        criterion: the label loss ``criterion(logits, targets)`` (default: cross-entropy).
        subnet_weights: the weights of the H, R and L subnets' losses in the summed gradient (default 1, 1, 1: the
            paper's). Lowering L's weight lets the widest subnet's gradient count for more in the shared weights.
        check_finite: refuse NaN/inf input batches before any forward and non-finite losses before the optimizer
            step (two host syncs per step; False skips both).
        sync_grads: average gradients over ranks (default None: when the step's `model` is a
            `DistributedDataParallel`). DDP's own reducer is bypassed (the forwards run under ``no_sync()``; see
            `eqnet_plugin.train.distributed` for why).
        check_ranks: when gradients are synchronized, verify that all ranks trained the same parameters (one host
            sync per step).

    Example:
        >>> recipe = SandwichConfig(lam=0.7, wdr=None)
        >>> losses = sandwich_step(sn, x, y, opt, recipe=recipe, generator=g)  # doctest: +SKIP
    """

    wdr: WDRLoss | None = dataclasses.field(default_factory=WDRLoss)
    lam: float = 0.5
    temperature: float = 1.0
    grad_clip: float | None = None
    grad_clip_value: float | None = 1.0
    criterion: Callable | None = None
    check_finite: bool = True
    subnet_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sync_grads: bool | None = None
    check_ranks: bool = True

    def __post_init__(self) -> None:
        w = tuple(float(v) for v in self.subnet_weights)
        if len(w) != 3 or not all(v >= 0 for v in w) or w[0] <= 0:
            raise ValueError(f"SandwichConfig.subnet_weights={self.subnet_weights!r} must be three non-negative "
                             "weights (H, R, L) with H's positive, e.g. (1.0, 1.0, 0.5)")
        object.__setattr__(self, "subnet_weights", w)
        if self.wdr is not None and not callable(self.wdr):
            raise TypeError(f"SandwichConfig.wdr must be a WDRLoss (or None), got {type(self.wdr).__name__}")
        if self.criterion is not None and not callable(self.criterion):
            raise TypeError(f"SandwichConfig.criterion must be callable as criterion(logits, targets) (or None "
                            f"for cross-entropy), got {type(self.criterion).__name__}")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"SandwichConfig.lam={self.lam!r} must lie in [0, 1]")
        if float(self.temperature) <= 0:
            raise ValueError(f"SandwichConfig.temperature={self.temperature!r} must be positive")
        for name in ("grad_clip", "grad_clip_value"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"SandwichConfig.{name}={v!r} must be positive (None: off)")


def _recipe(recipe: SandwichConfig | None, who: str) -> SandwichConfig:
    if recipe is None:
        return SandwichConfig()
    if not isinstance(recipe, SandwichConfig):
        raise TypeError(f"{who}(recipe=...) expects a SandwichConfig, got {type(recipe).__name__}; build one with "
                        "eqnet_plugin.SandwichConfig(wdr=..., lam=..., ...)")
    return recipe


def sample_sandwich(supernet: Supernet, generator: torch.Generator | None = None
                    ) -> tuple[SubnetConfig, SubnetConfig, SubnetConfig]:
    """(H, R, L): max bits, random bits, min bits; symmetry and granularity random per group (the paper's and its
    official code's sampling), drawn from `generator`."""
    return (supernet.max_config(generator=generator), supernet.sample(generator),
            supernet.min_config(generator=generator))


def _set_cells(supernet: Supernet, cfg: SubnetConfig) -> None:
    for g, ch in cfg.groups.items():
        supernet.groups[g].set_cell(ch.bits, ch.symmetric, ch.per_channel)


def _finish_step(supernet: Supernet, net: nn.Module, optimizer: torch.optim.Optimizer, recipe: SandwichConfig,
                 sync: bool, losses: Mapping[str, torch.Tensor] | None = None) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_subnet = isinstance(optimizer, SubnetOptimizer) and optimizer.stashed()
    pg = getattr(net, "process_group", None)
    if sync and not per_subnet:
        D.all_reduce_gradients(params, group=pg, check=recipe.check_ranks)
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
            D.all_reduce_gradients(params, group=pg, check=recipe.check_ranks)
        grads = [p for p in params if p.grad is not None]
        if recipe.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(grads, recipe.grad_clip_value)
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(grads, recipe.grad_clip)

    if per_subnet:
        optimizer.step(prepare=prepare)
    else:
        prepare()
        optimizer.step()
    if sync and getattr(net, "broadcast_buffers", True):
        # DDP would broadcast rank 0's buffers (BN statistics) at the next forward; no_sync skips that, so do it
        # here. Quantizer buffers are identical on every rank by construction and keep their Python mirror.
        D.broadcast_buffers(supernet.model, group=pg, skip=(ElasticFakeQuantize,))


def _check_batch(inputs, targets, check_finite: bool) -> None:
    """Validate one batch before any forward pass (a bad batch must not touch BatchNorm buffers)."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors (one batch: inputs (B, ...), targets (B,))")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same batch size, got inputs {tuple(inputs.shape)} and "
                         f"targets {tuple(targets.shape)}")
    if check_finite and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("the input batch holds NaN or inf values; nothing was updated (clean the data, or pass "
                         "recipe=SandwichConfig(check_finite=False) to skip this check)")


def _track_bn(supernet: Supernet, on: bool) -> None:
    for m in supernet.bn_modules:
        m.track_running_stats = on


def _net_and_sync(supernet: Supernet, model: nn.Module | None, recipe: SandwichConfig) -> tuple[nn.Module, bool, bool]:
    net = model if model is not None else supernet.model
    ddp = isinstance(net, DistributedDataParallel)
    return net, ddp, ddp if recipe.sync_grads is None else bool(recipe.sync_grads)


def sandwich_step(supernet: Supernet, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                  *, recipe: SandwichConfig | None = None, generator: torch.Generator | None = None,
                  model: nn.Module | None = None,
                  configs: tuple[SubnetConfig, SubnetConfig, SubnetConfig] | None = None) -> dict[str, torch.Tensor]:
    """One EQ-Net training step: sample H/R/L, forward and backward each, WDR, one optimizer step.

    Args:
        supernet: the Supernet view of the model being trained.
        inputs, targets: one batch (on the model's device), of the same batch size (checked before any forward).
        optimizer: optimizer over the model's parameters (including the quantizers' scales). A `SubnetOptimizer`
            (recommended; `eqnet_plugin.train.optim`) receives each subnet's gradient apart and steps each with its own
            state; any other optimizer steps once on the summed gradient (the paper's).
        recipe: the `SandwichConfig` (WDR, GPG weight and temperature, gradient clipping, label loss, checks,
            gradient synchronization). Default: ``SandwichConfig()``, the paper's recipe with WDR.
        generator: CPU generator for sampling; under DDP it must be seeded identically on every rank
            (`distributed.shared_generator`).
        model: the module to run the forwards through, e.g. the `DistributedDataParallel` wrapper of
            `supernet.model` (default: `supernet.model`).
        configs: explicit (H, R, L) instead of sampling.
    Returns:
        detached {"h", "r", "l", "wdr", "total"} scalar losses and "logits": the widest (H) subnet's detached
        logits, for training accuracy.
    Raises:
        ValueError: gradients are synchronized but neither `generator` nor `configs` is given; inputs and targets
            of different batch sizes.
        FloatingPointError: a non-finite loss (with `check_finite`).

    The active subnet is restored afterwards; parameters of cells no subnet used keep ``grad=None``. BatchNorm
    running statistics are updated by the H subnet only (R and L normalize with their batch statistics), so the
    model's own eval mode is right for the widest subnet (by all three after the ablation hook
    `eqnet_plugin.quant.bn_fold.use_running_bn_fold`).
    """
    r = _recipe(recipe, "sandwich_step")
    _check_batch(inputs, targets, r.check_finite)
    net, ddp, sync = _net_and_sync(supernet, model, r)
    if sync and generator is None and configs is None and D.is_distributed():
        raise ValueError("under DDP every rank must sample the same subnets: pass "
                         "generator=eqnet_plugin.train.distributed.shared_generator(seed) to sandwich_step")
    supernet.require_calibrated("sandwich_step")
    if configs is None:
        configs = sample_sandwich(supernet, generator)
    for cfg in configs:
        supernet.validate(cfg)
    previous = supernet.current_config()
    optimizer.zero_grad(set_to_none=True)
    per_subnet = isinstance(optimizer, SubnetOptimizer)
    if per_subnet and optimizer.subnets != 3:
        raise ValueError(f"sandwich_step needs a SubnetOptimizer with subnets=3 (H, R, L), got {optimizer.subnets}")
    losses: dict[str, torch.Tensor] = {}
    h_logits = None
    h_only = not running_fold_modules(supernet.model)   # torch.ao's running fold needs every subnet's statistics
    try:
        with net.no_sync() if ddp else contextlib.nullcontext():
            teacher = None
            for name, cfg, weight in zip(("h", "r", "l"), configs, r.subnet_weights):
                _set_cells(supernet, cfg)
                if h_only:
                    _track_bn(supernet, name == "h")
                logits = net(inputs)                                   # (B, K)
                loss = gpg_term(logits, teacher, targets, r.lam, r.temperature, r.criterion)
                (loss if weight == 1.0 else loss * weight).backward()  # frees this subnet's graph
                if per_subnet and name != "l":                          # L's stash waits for WDR's gradient
                    optimizer.stash(len(losses))
                losses[name] = loss.detach()
                teacher = logits.detach()
                if h_logits is None:
                    h_logits = teacher
            if r.wdr is not None:
                reg = r.wdr(supernet)
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
    _finish_step(supernet, net, optimizer, r, sync, losses if r.check_finite else None)
    wh, wr, wl = r.subnet_weights                       # "total" is the loss the step descended
    losses["total"] = wh * losses["h"] + wr * losses["r"] + wl * losses["l"] + losses["wdr"]
    losses["logits"] = h_logits
    return losses


def qat_step(supernet: Supernet, cfg: SubnetConfig, inputs: torch.Tensor, targets: torch.Tensor,
             optimizer: torch.optim.Optimizer, *, recipe: SandwichConfig | None = None,
             model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One conventional QAT step of a single subnet `cfg` (label loss [+ WDR]): the dedicated baseline, with the
    same gradient clipping and checks as `sandwich_step`.

    `recipe`: the `SandwichConfig` whose single-subnet knobs apply (``wdr``, ``grad_clip``, ``grad_clip_value``,
    ``criterion``, ``check_finite``, ``sync_grads``, ``check_ranks``); default ``SandwichConfig()`` (with WDR; plain
    LSQ QAT is ``SandwichConfig(wdr=None)``).

    Returns detached {"loss", "wdr", "total", "logits"}; the active subnet is restored afterwards.
    """
    r = _recipe(recipe, "qat_step")
    _check_batch(inputs, targets, r.check_finite)
    net, ddp, sync = _net_and_sync(supernet, model, r)
    supernet.validate(cfg)
    supernet.require_calibrated("qat_step")
    previous = supernet.current_config()
    optimizer.zero_grad(set_to_none=True)
    try:
        with net.no_sync() if ddp else contextlib.nullcontext():
            _set_cells(supernet, cfg)
            logits = net(inputs)
            loss = (r.criterion or F.cross_entropy)(logits, targets)
            total = loss + (r.wdr(supernet) if r.wdr is not None else 0.0)
            total.backward()
    finally:
        _set_cells(supernet, previous)
    _finish_step(supernet, net, optimizer, r, sync, {"total": total.detach()} if r.check_finite else None)
    return {"loss": loss.detach(), "wdr": (total - loss).detach(), "total": total.detach(), "logits": logits.detach()}
