"""The stages of the flow on an `Experiment` (a supernet with its data): build, train (with checkpoints and
resume checks), reload, measure uniform subnets, search."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from ..data import DataSplits, make_loaders
from ...frontends.fx import elastic_backend_config, prepare_qat
from ...train.losses import WDRLoss
from ...train.optim import SubnetOptimizer
from ...quant.space import ElasticSpace
from ...supernet import Supernet
from ...train import (CheckpointError, bn_batches_from, cosine_scheduler, evaluate, evaluate_configs, load_checkpoint,
                     read_checkpoint, save_checkpoint, train_float, train_supernet)
from .models import _needs_relu6_patterns, _repeat_channels, _seeded, build_model, load_data, model_in_channels
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


def build_experiment(spec: RunSpec, *, device: str | torch.device = "cpu", float_epochs: int = 0,
                     float_lr: float = 1e-3, calibrate: bool = True, calib_batches: int = 8, bn_batches: int = 8,
                     signed_activations: bool = False, progress: bool = False) -> Experiment:
    """Data -> float model (trained `float_epochs`) -> `prepare_qat` -> `Supernet` -> calibration.

    MobileNet-style models (ReLU6) are prepared with `elastic_backend_config()`; others with torch.ao's default
    placement. 1-channel data is repeated to 3 channels for models with an RGB stem.

    `signed_activations` is passed to `Supernet.calibrate` (True: every activation quantizer on the signed grid,
    what TensorRT runs exactly; one bit less on post-ReLU tensors) and recorded in ``info``; the grids themselves
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
    if float_epochs > 0:
        hist = train_float(model, train_loader, float_epochs, float_lr, val_loader=test_loader, progress=progress)
        info["float_test_accuracy"] = hist["val_acc"]
        info["float_seconds"] = hist["seconds"]
    x = splits.train.tensors[0][:2].to(device)                                  # (2, C, H, W)
    backend = elastic_backend_config() if _needs_relu6_patterns(model) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        gm = prepare_qat(model, (x,), spec.space, backend_config=backend)
    sn = Supernet(gm, spec.space)
    bn = bn_batches_from(splits.train, bn_batches, spec.batch_size, seed=spec.seed + 1)
    if calibrate:
        calib = bn_batches_from(splits.train, calib_batches, spec.batch_size, seed=spec.seed + 2)
        sn.calibrate(calib, signed_activations=signed_activations)
        info["signed_activations"] = signed_activations
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
        conflicts, finished = resume_conflicts(checkpoint, exp.spec, epochs=epochs, lr=lr, max_steps=max_steps,
                                               steps_per_epoch=steps_per_epoch)
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
    history = train_supernet(sn, exp.train_loader, opt, epochs, scheduler=sched, val_loader=exp.val_loader,
                             eval_configs=eval_cfgs, eval_every=max(1, eval_every), bn_batches=exp.bn_batches,
                             checkpoint_path=checkpoint, checkpoint_extra=run_extra, resume=resume, generator=gen,
                             wdr=WDRLoss(), max_steps=max_steps, progress=progress)
    info = load_checkpoint(checkpoint, sn, restore_rng=False)
    extra = {**info["extra"], **run_extra}
    save_checkpoint(checkpoint, sn, opt, sched, history["step"], gen, extra=extra)
    return history


def _schedule_steps(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """Length of `train_experiment`'s cosine schedule: every step of `epochs` epochs, capped at `max_steps`."""
    steps = epochs * steps_per_epoch
    return steps if max_steps is None else min(steps, max_steps)


def resume_conflicts(checkpoint: str | os.PathLike | Mapping, spec: RunSpec, *, epochs: int, lr: float,
                     max_steps: int | None, steps_per_epoch: int | None = None
                     ) -> tuple[list[tuple[str, object, object]], bool]:
    """How resuming `checkpoint` (a path, or the dict `read_checkpoint` returned) with these settings would differ
    from the run that wrote it.

    Returns ``(conflicts, finished)``: conflicts as ``(name, checkpoint's value, new value)`` with names model,
    data, image_size, batch_size, seed, weight_bits, act_bits, space, lr, epochs, max_steps (epochs / max_steps
    only when they change the length of the cosine schedule, which the checkpoint's scheduler keeps: a longer one
    would let the learning rate rise again; ``schedule_steps`` for checkpoints that do not store them);
    `finished` is True when the checkpoint's run has completed its schedule. `steps_per_epoch` (the train loader's
    length) is needed only for checkpoints written before the training settings were stored. A checkpoint
    without a stored run spec is compared on what it holds (space, learning rate, schedule).

    Raises:
        FileNotFoundError, CheckpointError: `checkpoint` cannot be read (see `read_checkpoint`).
    """
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(os.fspath(checkpoint), "cpu")
    extra = ckpt.get("extra") or {}
    out: list[tuple[str, object, object]] = []
    if "run" in extra:
        old = RunSpec.from_dict(extra["run"])
        for k in ("model", "data", "batch_size", "seed"):
            if getattr(old, k) != getattr(spec, k):
                out.append((k, getattr(old, k), getattr(spec, k)))
        if old.resolved_image_size() != spec.resolved_image_size():
            out.append(("image_size", old.resolved_image_size(), spec.resolved_image_size()))
        old_space = old.space
    else:
        old_space = ElasticSpace.from_dict(ckpt["space"])
    if old_space != spec.space:
        named = [(k, getattr(old_space, k), getattr(spec.space, k)) for k in ("weight_bits", "act_bits")
                 if getattr(old_space, k) != getattr(spec.space, k)]
        out += named or [("space", old_space.to_dict(), spec.space.to_dict())]
    rec = dict(extra.get("train") or {})
    groups = (ckpt.get("optimizer") or {}).get("param_groups") or [{}]
    old_lr = rec.get("lr", groups[0].get("initial_lr", groups[0].get("lr")))
    if old_lr is not None and float(old_lr) != float(lr):
        out.append(("lr", float(old_lr), float(lr)))
    spe = rec.get("steps_per_epoch", steps_per_epoch)
    old_steps = rec.get("schedule_steps", (ckpt.get("scheduler") or {}).get("T_max"))
    finished = old_steps is not None and int(ckpt.get("step", 0)) >= int(old_steps)
    new_steps = _schedule_steps(epochs, int(spe), max_steps) if spe is not None else None
    if old_steps is not None and new_steps is not None and new_steps != old_steps:
        if "epochs" not in rec:                 # written before the settings were stored: name the schedule
            out.append(("schedule_steps", int(old_steps), new_steps))
        else:
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
    schedule = [c for c in conflicts if c[0] in ("epochs", "max_steps", "schedule_steps")]
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
        raise CheckpointError(f"{path!r} holds no run description (it was written by save_checkpoint directly, or "
                              "by an interrupted `eqnet train` of an earlier release); pass --model and --data (and "
                              "--image-size, --batch-size, --seed as trained) to rebuild the model")
    return RunSpec.from_dict(extra["run"]), dict(extra.get("info", {}))


def load_experiment(checkpoint: str | os.PathLike, *, spec: RunSpec | None = None,
                    device: str | torch.device = "cpu", bn_batches: int = 8) -> Experiment:
    """Rebuild the experiment of a checkpoint (its stored `RunSpec`, or `spec`) and load the trained state."""
    info: dict = {}
    if spec is None:
        spec, info = read_run_spec(checkpoint)
    exp = build_experiment(spec, device=device, calibrate=False, bn_batches=bn_batches)
    load_checkpoint(checkpoint, exp.supernet, restore_rng=False)
    exp.info.update(info)
    return exp


def activations_signed(supernet: Supernet) -> bool:
    """True when every activation quantizer of `supernet` uses the signed grid (as after
    ``calibrate(..., signed_activations=True)``): its symmetric subnets with 8-bit activations export to TensorRT
    exactly."""
    return all(int(supernet.groups[g].signed) == 1 for g in supernet.act_groups)


def uniform_table(exp: Experiment, bits: Sequence[tuple[int, int]] = ((8, 8), (6, 6), (4, 4), (3, 3), (2, 2)),
                  schemes: Sequence[str] = ("sym", "asym", "sym-pc"), *, split: str = "test",
                  progress: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy of uniform subnets ({"w4a4": {"sym": acc, ...}}), BN recalibrated on training batches.

    Bit pairs outside the supernet's space are skipped.
    """
    sn = exp.supernet
    loader = {"test": exp.test_loader, "val": exp.val_loader}[split]
    wanted = [(w, a) for w, a in bits if w in sn.space.weight_bits and a in sn.space.act_bits]
    configs = {f"w{w}a{a}@{s}": uniform_config(sn, w, a, s) for w, a in wanted for s in schemes}
    acc = evaluate_configs(sn, configs, loader, exp.bn_batches, progress=progress)
    return {f"w{w}a{a}": {s: acc[f"w{w}a{a}@{s}"] for s in schemes} for w, a in wanted}


# --- search ---------------------------------------------------------------------------------------------------
@dataclass
class SearchOutcome:
    """Result of `search_experiment`: the search result, the measured accuracy of its best subnet, the predictor's
    held-out quality and the files written."""

    result: object
    measured_accuracy: float
    predictor: dict
    files: dict[str, str]
    reference: dict


def _constraints(cm, sn: Supernet, constraints: Mapping | None, bitops_fraction: float | None) -> dict:
    c = dict(constraints or {})
    if bitops_fraction is not None:
        if not 0 < bitops_fraction:
            raise ValueError(f"bitops fraction {bitops_fraction} must be positive (e.g. 0.3 = 30% of the all-8-bit "
                             "subnet's BitOps)")
        ref = cm(sn.uniform(max(sn.space.weight_bits), max(sn.space.act_bits))).bitops
        c["max_bitops"] = min(c.get("max_bitops", float("inf")), bitops_fraction * ref)
    return c


def fit_predictor(exp: Experiment, records: list, *, holdout: float = 0.2, epochs: int = 300, seed: int = 0):
    """CQAP on `records` minus a held-out share; returns (cqap, {"kendall_tau", "pearson", "rmse", "n"})."""
    from ...search import CQAP, SearchSpace
    n_test = max(2, int(round(holdout * len(records)))) if len(records) >= 6 else 0
    train, test = records[: len(records) - n_test], records[len(records) - n_test:]
    cqap = CQAP(SearchSpace.from_supernet(exp.supernet), seed=seed)
    cqap.fit([r.config for r in train], [r.accuracy for r in train], epochs=epochs)
    quality = cqap.evaluate([r.config for r in test], [r.accuracy for r in test]) if n_test else {"n": 0}
    quality["n_train"] = len(train)
    return cqap, quality


def collect(exp: Experiment, path: str | os.PathLike, n: int, *, seed: int = 0, progress: bool = False,
            fingerprint: str | None = None) -> list:
    """`collect_records` on the validation split with a progress bar (resumes an existing file measured on the
    same supernet: `fingerprint`, default `supernet_fingerprint(exp.supernet)`).

    Raises:
        RecordsMismatchError: `path` holds records of another supernet, or records without a fingerprint.
    """
    from ...search import CostModel, collect_records
    from ...search.records import supernet_fingerprint
    fingerprint = fingerprint if fingerprint is not None else supernet_fingerprint(exp.supernet)
    cm = CostModel.from_supernet(exp.supernet, exp.example_inputs)
    done = 0
    if os.path.exists(path):
        from ...search import load_records
        done = min(n, len(load_records(path)))
    with _progress(progress, total=n, initial=done, desc="records") as bar:
        return collect_records(exp.supernet, exp.val_loader, exp.bn_batches, n, path, seed=seed, cost_model=cm,
                               progress=lambda i, r: bar.update(1), fingerprint=fingerprint)


def search_experiment(exp: Experiment, out_dir: str | os.PathLike, *, profile: str | None = None,
                      constraints: Mapping | None = None, bitops_fraction: float | None = None,
                      records: int = 200, records_path: str | os.PathLike | None = None, predictor=None,
                      population: int = 100, generations: int = 500, cqap_epochs: int = 300, seed: int = 0,
                      measure_top_k: int = 10, refine_rounds: int = 3, progress: bool = False) -> SearchOutcome:
    """Records -> CQAP -> genetic search under `constraints` and `profile` -> test accuracy of the chosen subnet.

    The choice is made on measured validation accuracy: `refine_search` runs `refine_rounds` rounds of (fit the CQAP
    on the records plus the subnets measured so far -> search -> measure its `measure_top_k` best-predicted subnets)
    and keeps the best measured. With a given `predictor` (no records to refit on) one search + `measure_top`.
    ``measure_top_k=0`` keeps the best predicted subnet.

    Writes into `out_dir`: ``search.json`` (result), ``best.json`` (SubnetConfig), ``pareto.png`` (plot) and, when
    no `predictor` is given, ``records.jsonl`` (or `records_path`) and ``cqap.pt``.
    The constraints are checked for feasibility, and an existing records file for the supernet it was measured on
    (`supernet_fingerprint`), before any record is measured.

    Raises:
        ValueError: infeasible constraints, unknown profile, a profile the supernet's space cannot serve.
        RecordsMismatchError (a ValueError): the records file holds records of another supernet, or records
            without a fingerprint (written by an earlier release).
    """
    from ...search import (
        CQAP,
        CostModel,
        SearchSpace,
        evolution_search,
        measure_top,
        plot_pareto,
        refine_search,
        sample_feasible,
    )
    sn = exp.supernet
    out = Path(out_dir)
    cm = CostModel.from_supernet(sn, exp.example_inputs)
    cons = _constraints(cm, sn, constraints, bitops_fraction)
    sample_feasible(SearchSpace.from_supernet(sn, profile), cm, cons, 1, seed=seed)     # fails fast if infeasible
    files: dict[str, str] = {}
    quality: dict = {}
    extra: dict = {}
    if predictor is None:
        rpath = os.fspath(records_path or out / "records.jsonl")
        if not isinstance(records, int) or records < 2:
            raise ValueError(f"records={records!r}: the predictor needs at least 2 measured subnets")
        recs = collect(exp, rpath, records, seed=seed, progress=progress)
        near = [r for r in recs if r.costs["bitops"] <= 1.2 * cons.get("max_bitops", float("inf"))]
        extra["measured subnets (val)"] = ([r.costs["bitops"] for r in near], [r.accuracy for r in near])
        predictor, quality = fit_predictor(exp, recs, epochs=cqap_epochs, seed=seed)
        predictor.save(out / "cqap.pt")
        files.update(records=rpath, predictor=os.fspath(out / "cqap.pt"))
    kw = dict(cost_model=cm, profile=profile, population=population, generations=generations)

    def val_accuracy(cfg):
        return evaluate(sn, cfg, exp.val_loader, exp.bn_batches)
    if measure_top_k and refine_rounds and "records" in files:
        template = CQAP(predictor.space, predictor.hidden, seed, predictor.regressor, predictor.gbt_params)
        result = refine_search(template, [r.config for r in recs], [r.accuracy for r in recs], val_accuracy, sn,
                               cons, rounds=refine_rounds, k=measure_top_k, seed=seed, **kw)
    else:
        result = evolution_search(predictor, sn, cons, seed=seed, **kw)
        if measure_top_k:
            result = measure_top(result, val_accuracy, k=measure_top_k)
    best = result.best.config
    measured = evaluate(sn, best, exp.test_loader, exp.bn_batches)
    ref_cfg = sn.uniform(max(sn.space.weight_bits), max(sn.space.act_bits))
    reference = {"w8a8_bitops": cm(ref_cfg).bitops, "w8a8_size_bytes": cm(ref_cfg).size_bytes}
    result.save(out / "search.json")
    best.to_json(out / "best.json")
    extra["chosen, measured (test)"] = ([result.best.costs["bitops"]], [measured])
    plot_pareto(out / "pareto.png", result.points, ([c.costs["bitops"] for c in result.pareto],
                                                    [c.predicted_accuracy for c in result.pareto]),
                best=(result.best.costs["bitops"], result.best.predicted_accuracy),
                max_bitops=result.constraints.max_bitops, extra=extra, ylabel="accuracy (predicted unless marked)",
                title=f"search under profile {result.profile!r}: accuracy vs BitOps")
    files.update(result=os.fspath(out / "search.json"), best=os.fspath(out / "best.json"),
                 plot=os.fspath(out / "pareto.png"))
    return SearchOutcome(result, measured, quality, files, reference)
