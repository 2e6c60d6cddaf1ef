"""The stages of the flow on an `Experiment` (a supernet with its data): build, train (with checkpoints and
resume checks), reload, measure uniform subnets (the search stage: `search`; the export stage: `export`)."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from ..data import DataSplits, make_loaders
from ...frontends.fx import elastic_backend_config, prepare_qat
from ...train.optim import SubnetOptimizer
from ...supernet import Supernet
from ...train import (CheckpointError, TrainConfig, bn_batches_from, cosine_scheduler, evaluate, evaluate_configs,
                     load_checkpoint, read_checkpoint, save_checkpoint, train_float, train_supernet)
from ..models import build_model, model_in_channels
from .models import _needs_relu6_patterns, _repeat_channels, _seeded, load_data
from ...quant.grid import Scheme
from .spec import RunSpec, uniform_config


# --- the experiment -------------------------------------------------------------------------------------------
@dataclass
class Experiment:
    """A supernet with its data: what every stage works on.

    Attributes:
        spec: how it was built. splits: the data. supernet: the Supernet (its `model` on `device`).
        train_loader, val_loader, test_loader: loaders over the splits. bn_batches: fixed training batches for BN
        recalibration. example_inputs: one input of batch size 1 (cost model, export). info: float accuracy, etc.
    """

    spec: RunSpec
    splits: DataSplits
    supernet: Supernet
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    bn_batches: list
    example_inputs: tuple
    device: torch.device
    info: dict = field(default_factory=dict)


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm
    return tqdm(disable=not enabled, **kw)


@dataclass(frozen=True)
class BuildSettings:
    """How `build_experiment` prepares a supernet (validated).

    Attributes:
        float_epochs: float pretraining epochs before `prepare_qat` (0: start from the initialization).
        float_lr: Adam learning rate of the float pretraining.
        calibrate: initialize the quantizers from float activations (False when a checkpoint will be loaded).
        calib_batches: training batches for calibration.
        bn_batches: fixed training batches for BatchNorm re-estimation per subnet.
        signed_activations: calibrate every activation quantizer on the signed grid (`Supernet.calibrate`): what
            TensorRT runs exactly (INT8, zero point 0), at one bit less resolution on post-ReLU tensors. Use
            `signed_activations_for(targets)` to decide it from the export targets in play.
    """

    float_epochs: int = 0
    float_lr: float = 1e-3
    calibrate: bool = True
    calib_batches: int = 8
    bn_batches: int = 8
    signed_activations: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("float_epochs", 0), ("calib_batches", 1), ("bn_batches", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"BuildSettings.{name}={v!r}: use an integer >= {lo}")
        if not (isinstance(self.float_lr, (int, float)) and self.float_lr > 0):
            raise ValueError(f"BuildSettings.float_lr={self.float_lr!r}: use a positive number")
        for name in ("calibrate", "signed_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BuildSettings.{name}={getattr(self, name)!r}: use True or False")


def build_experiment(spec: RunSpec, settings: BuildSettings = BuildSettings(), *,
                     device: str | torch.device = "cpu", progress: bool = False) -> Experiment:
    """Data -> float model (trained `settings.float_epochs`) -> `prepare_qat` -> `Supernet` -> calibration.

    MobileNet-style models (ReLU6) are prepared with `elastic_backend_config()`; others with torch.ao's default
    placement. 1-channel data is repeated to 3 channels for models with an RGB stem.

    `settings.signed_activations` is passed to `Supernet.calibrate` and recorded in ``info``; the grids themselves
    live in the quantizers' buffers, so checkpoints keep them and `load_experiment` needs no flag.

    Raises:
        ValueError / FileNotFoundError: unknown model, missing data, a model whose input channels do not fit.
        TraceError: FX cannot trace the model.
    """
    device = torch.device(device)
    size = spec.resolved_image_size()
    splits = load_data(spec.data, size, spec.seed)
    with _seeded(spec.seed):
        model = build_model(spec.model, splits.num_classes, splits.in_channels)
    want = model_in_channels(model)
    if want is not None and want != splits.in_channels:
        if splits.in_channels != 1:
            raise ValueError(f"model {spec.model!r} takes {want} input channels but the data has "
                             f"{splits.in_channels}; choose a model built for {splits.in_channels}-channel input")
        splits = _repeat_channels(splits, want)
    model = model.to(device)
    train_loader, val_loader, test_loader = make_loaders(splits, spec.batch_size, spec.seed)
    info: dict = {"num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": size,
                  "train_size": len(splits.train), "val_size": len(splits.val), "test_size": len(splits.test)}
    if settings.float_epochs > 0:
        hist = train_float(model, train_loader, settings.float_epochs, settings.float_lr, val_loader=test_loader,
                           progress=progress)
        info["float_test_accuracy"] = hist["val_acc"]
        info["float_seconds"] = hist["seconds"]
    x = splits.train.tensors[0][:2].to(device)                                  # (2, C, H, W)
    backend = elastic_backend_config() if _needs_relu6_patterns(model) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        gm = prepare_qat(model, (x,), spec.space, backend_config=backend)
    sn = Supernet(gm, spec.space)
    bn = bn_batches_from(splits.train, settings.bn_batches, spec.batch_size, seed=spec.seed + 1)
    if settings.calibrate:
        calib = bn_batches_from(splits.train, settings.calib_batches, spec.batch_size, seed=spec.seed + 2)
        sn.calibrate(calib, signed_activations=settings.signed_activations)
        info["signed_activations"] = settings.signed_activations
    return Experiment(spec, splits, sn, train_loader, val_loader, test_loader, bn, (x[:1],), device, info)


def train_experiment(exp: Experiment, epochs: int, checkpoint: str | os.PathLike, *, lr: float = 1e-3,
                     max_steps: int | None = None, resume: bool = False, eval_every: int = 0,
                     progress: bool = False) -> dict:
    """Supernet training, the paper's recipe (Adam `lr`, cosine decay per step, sandwich + GPG + WDR) with one Adam
    state per sandwich subnet (`SubnetOptimizer`, see `eqnet_plugin.train.optim`).

    Writes `checkpoint` (atomic) at every epoch end; every file written also stores the `RunSpec` and the training
    settings (lr, epochs, max_steps, the length of the cosine schedule), so that `load_experiment` can rebuild
    everything from it, also from the checkpoint of an interrupted run. Returns train_supernet's history.

    Raises:
        ValueError: with `resume`, the checkpoint's run differs from this one (spec, lr, or the length of the cosine
            schedule: `resume_conflicts`); nothing is trained or written.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: use a positive integer")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps={max_steps!r}: use a positive integer or None")
    sn = exp.supernet
    steps_per_epoch = len(exp.train_loader)
    steps = _schedule_steps(epochs, steps_per_epoch, max_steps)
    prior: dict = {}
    if resume and os.path.exists(checkpoint):
        conflicts, finished = resume_conflicts(checkpoint, exp.spec, epochs=epochs, lr=lr, max_steps=max_steps)
        if conflicts:
            raise ValueError(resume_error(checkpoint, conflicts, finished, lambda k, v: f"{k}={v!r}",
                                          "pass resume=False or another checkpoint path"))
        with contextlib.suppress(CheckpointError):
            prior = read_run_spec(checkpoint)[1]            # the float model's numbers of the interrupted run
    opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=lr)
    sched = cosine_scheduler(opt, steps)
    gen = torch.Generator().manual_seed(exp.spec.seed)
    eval_cfgs = {"w8a8": sn.uniform(8, 8), "min": sn.min_config(symmetric=True, per_channel=False)} \
        if eval_every else None
    run_extra = {"run": exp.spec.to_dict(), "info": {**prior, **_plain(exp.info)},
                 "train": {"lr": float(lr), "epochs": epochs, "max_steps": max_steps,
                           "steps_per_epoch": steps_per_epoch, "schedule_steps": steps}}
    config = TrainConfig(epochs=epochs, max_steps=max_steps, progress=progress, eval_configs=eval_cfgs,
                         eval_every=max(1, eval_every), bn_batches=exp.bn_batches, checkpoint_path=checkpoint,
                         checkpoint_extra=run_extra, resume=resume)           # the recipe: SandwichConfig()
    history = train_supernet(sn, exp.train_loader, opt, config, scheduler=sched, val_loader=exp.val_loader,
                             generator=gen)
    info = load_checkpoint(checkpoint, sn, restore_rng=False)
    extra = {**info["extra"], **run_extra}
    save_checkpoint(checkpoint, sn, opt, sched, history["step"], gen, extra=extra)
    return history


def _schedule_steps(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """Length of `train_experiment`'s cosine schedule: every step of `epochs` epochs, capped at `max_steps`."""
    steps = epochs * steps_per_epoch
    return steps if max_steps is None else min(steps, max_steps)


def resume_conflicts(checkpoint: str | os.PathLike | Mapping, spec: RunSpec, *, epochs: int, lr: float,
                     max_steps: int | None) -> tuple[list[tuple[str, object, object]], bool]:
    """How resuming `checkpoint` (a path, or the dict `read_checkpoint` returned) with these settings would differ
    from the run that wrote it.

    Returns ``(conflicts, finished)``: conflicts as ``(name, checkpoint's value, new value)`` with names model,
    data, image_size, batch_size, seed, weight_bits, act_bits, space, lr, epochs, max_steps (epochs / max_steps
    only when they change the length of the cosine schedule, which the checkpoint's scheduler keeps: a longer one
    would let the learning rate rise again); `finished` is True when the checkpoint's run has completed its
    schedule.

    Raises:
        FileNotFoundError, CheckpointError: `checkpoint` cannot be read (see `read_checkpoint`), or it holds no run
            description and training settings (it was not written by `train_experiment`).
    """
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(os.fspath(checkpoint), "cpu")
    extra = ckpt.get("extra") or {}
    if "run" not in extra or "train" not in extra:
        where = "this checkpoint" if isinstance(checkpoint, Mapping) else repr(os.fspath(checkpoint))
        raise CheckpointError(f"{where} holds no run description and training settings (it was not written by "
                              "train_experiment / `eqnet train`), so it cannot be resumed; start a new run")
    out: list[tuple[str, object, object]] = []
    old = RunSpec.from_dict(extra["run"])
    for k in ("model", "data", "batch_size", "seed"):
        if getattr(old, k) != getattr(spec, k):
            out.append((k, getattr(old, k), getattr(spec, k)))
    if old.resolved_image_size() != spec.resolved_image_size():
        out.append(("image_size", old.resolved_image_size(), spec.resolved_image_size()))
    if old.space != spec.space:
        named = [(k, getattr(old.space, k), getattr(spec.space, k)) for k in ("weight_bits", "act_bits")
                 if getattr(old.space, k) != getattr(spec.space, k)]
        out += named or [("space", old.space.to_dict(), spec.space.to_dict())]
    rec = extra["train"]
    if float(rec["lr"]) != float(lr):
        out.append(("lr", float(rec["lr"]), float(lr)))
    old_steps = int(rec["schedule_steps"])
    finished = int(ckpt.get("step", 0)) >= old_steps
    if _schedule_steps(epochs, int(rec["steps_per_epoch"]), max_steps) != old_steps:
        if rec["epochs"] != epochs:
            out.append(("epochs", rec["epochs"], epochs))
        if rec.get("max_steps") != max_steps:
            out.append(("max_steps", rec.get("max_steps"), max_steps))
    return out, finished


def resume_error(checkpoint: str | os.PathLike, conflicts: Sequence[tuple[str, object, object]], finished: bool,
                 setting: Callable[[str, object], str], start_over: str) -> str:
    """One line explaining `resume_conflicts`: each setting (`setting(name, value)` spells it, e.g. as a
    command-line flag) with the checkpoint's value, and what to do (`start_over`: how to start a new run)."""
    path = os.fspath(checkpoint)
    schedule = [c for c in conflicts if c[0] in ("epochs", "max_steps")]
    others = [c for c in conflicts if c not in schedule]
    parts = [f"{setting(k, new)} differs from the checkpoint's {setting(k, old)}" for k, old, new in others]
    if schedule:
        what = " and ".join(setting(k, new) for k, _, new in schedule)
        was = " and ".join(setting(k, old) for k, old, _ in schedule)
        if finished:
            parts.append(f"its run has finished ({was}; the learning rate has decayed to the end of its cosine "
                         f"schedule) and {what} would make the schedule rise again")
        else:
            parts.append(f"{what} would change the length of the checkpoint's cosine learning-rate schedule "
                         f"({was}) in the middle of the run")
    if finished and schedule:
        advice = f"To train longer, start a new run ({start_over})"
    else:
        advice = f"Resume with the checkpoint's settings, or start a new run ({start_over})"
    return f"cannot resume {path}: " + "; ".join(parts) + ". " + advice


def _plain(d: Mapping) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def read_run_spec(checkpoint: str | os.PathLike) -> tuple[RunSpec, dict]:
    """The `RunSpec` (and info) stored in a checkpoint by `train_experiment`.

    Raises:
        FileNotFoundError: no file. CheckpointError: not a checkpoint, or one without a run spec.
    """
    path = os.fspath(checkpoint)
    ckpt = read_checkpoint(path, "cpu")
    extra = ckpt.get("extra") or {}
    if "run" not in extra:
        raise CheckpointError(f"{path!r} holds no run description (it was written by save_checkpoint directly); "
                              "pass a RunSpec (command line: --model and --data, and --image-size, --batch-size, "
                              "--seed as trained) to rebuild the model")
    return RunSpec.from_dict(extra["run"]), dict(extra.get("info", {}))


def load_experiment(checkpoint: str | os.PathLike, *, spec: RunSpec | None = None,
                    device: str | torch.device = "cpu", bn_batches: int = 8) -> Experiment:
    """Rebuild the experiment of a checkpoint (its stored `RunSpec`, or `spec`) and load the trained state."""
    info: dict = {}
    if spec is None:
        spec, info = read_run_spec(checkpoint)
    exp = build_experiment(spec, BuildSettings(calibrate=False, bn_batches=bn_batches), device=device)
    load_checkpoint(checkpoint, exp.supernet, restore_rng=False)
    exp.info.update(info)
    return exp


def activations_signed(supernet: Supernet) -> bool:
    """True when every activation quantizer of `supernet` uses the signed grid (as after
    ``calibrate(..., signed_activations=True)``): its symmetric subnets with 8-bit activations export to TensorRT
    exactly."""
    return all(int(supernet.groups[g].signed) == 1 for g in supernet.act_groups)


def uniform_table(exp: Experiment, bits: Sequence[tuple[int, int]] = ((8, 8), (6, 6), (4, 4), (3, 3), (2, 2)),
                  schemes: Sequence[Scheme] = (Scheme.SYM, Scheme.ASYM, Scheme.SYM_PC), *, split: str = "test",
                  progress: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy of uniform subnets ({"w4a4": {"sym": acc, ...}}, keyed by the schemes' names), BN recalibrated on
    training batches.

    Bit pairs outside the supernet's space are skipped.
    """
    sn = exp.supernet
    loader = {"test": exp.test_loader, "val": exp.val_loader}[split]
    names = [Scheme.parse(s).value for s in schemes]
    wanted = [(w, a) for w, a in bits if w in sn.space.weight_bits and a in sn.space.act_bits]
    configs = {f"w{w}a{a}@{s}": uniform_config(sn, w, a, Scheme(s)) for w, a in wanted for s in names}
    acc = evaluate_configs(sn, configs, loader, exp.bn_batches, progress=progress)
    return {f"w{w}a{a}": {s: acc[f"w{w}a{a}@{s}"] for s in names} for w, a in wanted}
