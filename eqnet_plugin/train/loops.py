"""Complete training loops: the supernet loop (`train_supernet`: sandwich steps, periodic evaluation, checkpoints,
exact resume) and the baselines it is compared with (`train_float`: the float pretraining; `lsq_qat`: dedicated QAT
of one subnet), configured by `TrainConfig` / `QATConfig`."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as D
from ..quant.space import SubnetConfig
from ..supernet import Supernet
from ..supernet.batches import device_of
from .checkpoint import CheckpointError, _check_plain, _set_rng_state, load_checkpoint, save_checkpoint
from .evaluate import _progress, accuracy, bn_batches_from, evaluate_configs
from .step import SandwichConfig, qat_step, sandwich_step

__all__ = ["TrainConfig", "QATConfig", "train_supernet", "train_float", "lsq_qat", "cosine_scheduler"]


def _positive_int(owner: str, name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r}: use a positive integer" + (" or None" if optional else ""))


def _check_recipe(owner: str, recipe) -> None:
    if not isinstance(recipe, SandwichConfig):
        raise TypeError(f"{owner}.recipe must be a SandwichConfig, got {type(recipe).__name__}; build one with "
                        "eqnet_plugin.SandwichConfig(wdr=..., lam=..., ...)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one `train_supernet` run.

    Attributes:
        epochs: number of epochs (positive).
        recipe: the `SandwichConfig` of every step (default ``SandwichConfig()``: the paper's recipe with WDR).
        max_steps: stop after this many steps in total, counting steps before a resume (default: every epoch).
        progress: show a tqdm bar (rank 0 only).
        eval_configs: named subnets evaluated on `train_supernet`'s `val_loader` every `eval_every` epochs.
        bn_batches: BN recalibration batches of that evaluation (default: `num_bn_batches` fixed random batches of
            the training set, `bn_batches_from`).
        checkpoint_path: write a checkpoint there at the end of every epoch, every `checkpoint_every` steps, and
            when stopping at `max_steps`; with `resume`, an existing file is loaded first and training continues
            exactly where it stopped (bit-identical on CPU).
        checkpoint_extra: plain values (dict, list, str, numbers, tensors) stored in every checkpoint's ``extra``
            next to the loop's own keys (epoch, batch_in_epoch, loader_state, history, partial).

    Example:
        >>> config = TrainConfig(epochs=10, eval_configs={"w4a4": sn.uniform(4, 4)}, checkpoint_path="sn.pt")
        >>> history = train_supernet(sn, loader, opt, config, val_loader=val)          # doctest: +SKIP
    """

    epochs: int
    recipe: SandwichConfig = dataclasses.field(default_factory=SandwichConfig)
    max_steps: int | None = None
    progress: bool = False
    eval_configs: Mapping[str, SubnetConfig] | None = None
    eval_every: int = 1
    bn_batches: list | None = None
    num_bn_batches: int = 8
    checkpoint_path: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    checkpoint_extra: Mapping | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        _positive_int("TrainConfig", "epochs", self.epochs)
        _positive_int("TrainConfig", "max_steps", self.max_steps, optional=True)
        _positive_int("TrainConfig", "eval_every", self.eval_every)
        _positive_int("TrainConfig", "num_bn_batches", self.num_bn_batches)
        _positive_int("TrainConfig", "checkpoint_every", self.checkpoint_every, optional=True)
        _check_recipe("TrainConfig", self.recipe)
        if self.eval_configs is not None:
            if not isinstance(self.eval_configs, Mapping) or not all(
                    isinstance(c, SubnetConfig) for c in self.eval_configs.values()):
                raise TypeError("TrainConfig.eval_configs must map names to SubnetConfig, e.g. "
                                "{'w4a4': supernet.uniform(4, 4)}")
        if self.checkpoint_path is not None:
            object.__setattr__(self, "checkpoint_path", os.fspath(self.checkpoint_path))
        if self.checkpoint_extra is not None:
            if not isinstance(self.checkpoint_extra, Mapping):
                raise TypeError(f"TrainConfig.checkpoint_extra must be a dict of plain values, got "
                                f"{type(self.checkpoint_extra).__name__}")
            _check_plain(dict(self.checkpoint_extra), "TrainConfig.checkpoint_extra")


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """The settings of one `lsq_qat` run (dedicated QAT of one subnet).

    Attributes:
        epochs: number of epochs (positive).
        recipe: the `SandwichConfig` whose single-subnet knobs each step uses (`qat_step`); default
            ``SandwichConfig()`` (with WDR). Plain LSQ QAT, the baseline a supernet is compared with, is
            ``SandwichConfig(wdr=None)``.
        max_steps: stop after this many steps in total (default: every epoch).
        progress: show a tqdm bar.
    """

    epochs: int
    recipe: SandwichConfig = dataclasses.field(default_factory=SandwichConfig)
    max_steps: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        _positive_int("QATConfig", "epochs", self.epochs)
        _positive_int("QATConfig", "max_steps", self.max_steps, optional=True)
        _check_recipe("QATConfig", self.recipe)


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over `total_steps` optimizer steps (the paper's schedule), stepped once per step."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps)))


def _loader_generator(loader) -> torch.Generator:
    """The generator that decides a DataLoader's shuffling (its own, else the global default generator)."""
    g = getattr(loader, "generator", None)
    return g if g is not None else torch.default_generator


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).mean().item()) if values else float("nan")


def train_supernet(supernet: Supernet, train_loader: DataLoader, optimizer: torch.optim.Optimizer,
                   config: TrainConfig, *, scheduler=None, val_loader: Iterable | None = None,
                   generator: torch.Generator | None = None, model: nn.Module | None = None) -> dict:
    """Train a supernet with the sandwich rule for ``config.epochs`` epochs: progress bar, periodic evaluation,
    checkpoints and exact resume (all set in `config`, a `TrainConfig`).

    Args:
        supernet: calibrated Supernet (start from a float-trained model, calibrate, then train: the paper's recipe).
        train_loader: (inputs, targets) batches; give it a `generator` (see `data.make_loaders`) for exact resume.
        optimizer: e.g. ``SubnetOptimizer(supernet.model.parameters(), torch.optim.Adam, lr=1e-3)`` (one Adam state
            per subnet, recommended) or ``Adam(supernet.model.parameters(), 1e-3)`` (the paper's).
        config: the run's `TrainConfig` (epochs, recipe, max_steps, evaluation, checkpoints).
        scheduler: LR scheduler stepped after every optimizer step (e.g. `cosine_scheduler(opt, steps)`).
        val_loader: the batches ``config.eval_configs`` are evaluated on.
        generator: sampling generator (default: seeded with 0; under DDP use `distributed.shared_generator`).
        model: module to run the forwards through (the DDP wrapper under DDP).
    Returns:
        history: {"step", "epoch", "train": [per-epoch mean losses], "eval": [{"epoch", "step", "acc"}],
        "seconds"}.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train_supernet(config=...) expects a TrainConfig, got {type(config).__name__}; e.g. "
                        "eqnet_plugin.TrainConfig(epochs=10)")
    c = config
    device = device_of(supernet.model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    loader_gen = _loader_generator(train_loader)
    history: dict = {"step": 0, "epoch": 0, "train": [], "eval": [], "seconds": 0.0}
    start_epoch, skip, epoch_state, rng_after, partial = 0, 0, None, None, {}
    if c.checkpoint_path is not None and c.resume and os.path.exists(c.checkpoint_path):
        info = load_checkpoint(c.checkpoint_path, supernet, optimizer, scheduler, generator, restore_rng=False)
        extra = info["extra"]
        history = extra.get("history", history)
        start_epoch, skip = int(extra.get("epoch", 0)), int(extra.get("batch_in_epoch", 0))
        epoch_state, rng_after = extra.get("loader_state"), info["rng"]
        partial = {k: list(v.unbind()) for k, v in extra.get("partial", {}).items()}
    bn_batches = c.bn_batches
    if bn_batches is None and c.eval_configs:
        bn_batches = bn_batches_from(train_loader.dataset, c.num_bn_batches, train_loader.batch_size or 64)
    step = history["step"]
    t0 = time.perf_counter() - history["seconds"]

    def checkpoint(epoch: int, batch_in_epoch: int, state: torch.Tensor, sums: dict) -> None:
        if c.checkpoint_path is not None:
            history["seconds"] = time.perf_counter() - t0
            save_checkpoint(c.checkpoint_path, supernet, optimizer, scheduler, step, generator,
                            extra={**(c.checkpoint_extra or {}),
                                   "epoch": epoch, "batch_in_epoch": batch_in_epoch, "loader_state": state,
                                   "history": history,
                                   "partial": {k: torch.stack(v).cpu() for k, v in sums.items() if v}})

    total_steps = c.epochs * len(train_loader)
    if c.max_steps is not None:
        total_steps = min(total_steps, c.max_steps)
    bar = _progress(None, c.progress and D.is_main_process(), total=total_steps, initial=step, desc="supernet")
    supernet.model.train()
    try:
        for epoch in range(start_epoch, c.epochs):
            if c.max_steps is not None and step >= c.max_steps:
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
                losses = sandwich_step(supernet, x, y, optimizer, recipe=c.recipe, generator=generator, model=model)
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
                if c.max_steps is not None and step >= c.max_steps:
                    checkpoint(epoch, i + 1, epoch_state, sums)
                    stopped = True
                    break
                if c.checkpoint_every and step % c.checkpoint_every == 0:
                    checkpoint(epoch, i + 1, epoch_state, sums)
            skip = 0
            if stopped:
                break
            if sums:
                history["train"].append({"epoch": epoch, **{k: _mean(v) for k, v in sums.items()}})
            history["epoch"] = epoch + 1
            if val_loader is not None and c.eval_configs and (epoch + 1) % c.eval_every == 0:
                acc = evaluate_configs(supernet, c.eval_configs, val_loader, bn_batches)
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
    device = device_of(model)
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
            config: QATConfig, *, scheduler=None, model: nn.Module | None = None) -> dict:
    """Dedicated LSQ QAT of one subnet: `cfg` is active for every step (the baseline a supernet is compared with;
    same optimizer, schedule and batches as `train_supernet`, one forward per step). `cfg` stays active afterwards.

    Args:
        config: the run's `QATConfig` (epochs, recipe, max_steps, progress).
        scheduler: LR scheduler stepped after every optimizer step.
        model: module to run the forwards through (the DDP wrapper under DDP).
    Returns {"step", "loss": per-epoch mean loss, "seconds"}.
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"lsq_qat(config=...) expects a QATConfig, got {type(config).__name__}; e.g. "
                        "eqnet_plugin.QATConfig(epochs=1, recipe=SandwichConfig(wdr=None))")
    supernet.apply(cfg)
    device = device_of(supernet.model)
    history: dict = {"step": 0, "loss": []}
    t0 = time.perf_counter()
    supernet.model.train()
    for _ in _progress(range(config.epochs), config.progress, desc="qat"):
        losses = []
        for batch in train_loader:
            if config.max_steps is not None and history["step"] >= config.max_steps:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            out = qat_step(supernet, cfg, x, y, optimizer, recipe=config.recipe, model=model)
            if scheduler is not None:
                scheduler.step()
            losses.append(out["total"])
            history["step"] += 1
        if losses:
            history["loss"].append(_mean(losses))
    history["seconds"] = time.perf_counter() - t0
    return history
