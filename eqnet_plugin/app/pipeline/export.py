"""Export stage: freeze a subnet with its own BatchNorm statistics and write it for registered targets
(`eqnet_plugin.adapters.targets`; `export_targets` checks every target before writing any), plus the ONNX Runtime
agreement check."""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ...quant.space import SubnetConfig
from ...supernet import Supernet
from ...train import evaluate
from .spec import uniform_config
from .stages import Experiment


# --- export ---------------------------------------------------------------------------------------------------
def _targets():
    """The export-target registry (`eqnet_plugin.adapters.targets`), with a clear error when it is missing."""
    try:
        return importlib.import_module("eqnet_plugin.adapters.targets")
    except ImportError as e:
        raise ImportError(f"eqnet_plugin.adapters cannot be imported ({e}); install the extra: "
                          'pip install -e ".[all]"') from e


def target_names() -> tuple[str, ...]:
    """The registered export targets (`eqnet_plugin.adapters.register_target` adds one)."""
    return _targets().target_names()


def get_target(name: str):
    """The registered `Target` called `name` (ValueError listing the known ones otherwise)."""
    return _targets().get_target(name)


def signed_activations_for(targets: Sequence[str]) -> bool:
    """Whether a supernet meant for these export targets should calibrate its activations on the signed grid: True
    when one of them runs only signed activations (`Target.signed_activations`, e.g. TensorRT), so that its
    export computes exactly what was trained."""
    return any(get_target(t).signed_activations for t in targets)


def freeze_subnet(exp: Experiment, cfg: SubnetConfig, recalibrate_bn: bool = True):
    """`freeze` subnet `cfg` with its own BatchNorm statistics (re-estimated on the experiment's training batches,
    as `evaluate` does), so the export computes what was measured. The supernet itself is left unchanged."""
    import copy

    from ...export.freeze import freeze
    exp.supernet.validate(cfg)
    sn = Supernet(copy.deepcopy(exp.supernet.model), exp.supernet.space)
    if recalibrate_bn:
        with sn.activate(cfg):
            sn.recalibrate_bn(exp.bn_batches)
    return freeze(sn, cfg)


def finetune_subnet(exp: Experiment, cfg: SubnetConfig, steps: int, lr: float = 1e-3,
                    progress: bool = False) -> Experiment:
    """A copy of `exp` whose supernet's weights were trained further with subnet `cfg` alone active (`lsq_qat`: Adam,
    cosine decay to 0 over `steps`, the experiment's training batches), from the supernet's weights.

    The copy serves `cfg` only: its other subnets are no longer the supernet's. `exp` itself is unchanged.

    Raises:
        ValueError: `steps` < 1, `lr` <= 0, or `cfg` is not a subnet of the supernet.
    """
    import copy
    import dataclasses

    from ...train import QATConfig, SandwichConfig, cosine_scheduler, lsq_qat
    if int(steps) < 1 or not lr > 0:
        raise ValueError(f"finetune_subnet needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    exp.supernet.validate(cfg)
    sn = Supernet(copy.deepcopy(exp.supernet.model), exp.supernet.space)
    opt = torch.optim.Adam(sn.model.parameters(), lr=lr)
    epochs = -(-int(steps) // max(len(exp.train_loader), 1))        # enough passes over the data for `steps`
    plain_lsq = QATConfig(epochs=epochs, recipe=SandwichConfig(wdr=None), max_steps=int(steps), progress=progress)
    lsq_qat(sn, cfg, exp.train_loader, opt, plain_lsq, scheduler=cosine_scheduler(opt, int(steps)))
    return dataclasses.replace(exp, supernet=sn,
                               info={**exp.info, "finetuned": {"steps": int(steps), "lr": lr, "subnet": cfg.to_dict()}})


def _target_options(target, options: Mapping[str, object] | None) -> dict[str, object]:
    """The entries of `options` that `target` has (one options mapping serves every target)."""
    return {k: v for k, v in (options or {}).items() if k in target.options}


def export_problems(frozen, target: str, options: Mapping[str, object] | None = None) -> list[str]:
    """Why `target` would refuse to export the frozen subnet (empty list: it can), found without writing anything
    (`Target.check`: the packages it needs and every rule the subnet breaks). `options`: target options by name
    (e.g. ``{"encoding_version": "2.0.0"}``); those `target` does not have are ignored.

    Raises:
        ValueError: unknown target or option name; TypeError: an option value of the wrong type (e.g. a string
            where the target takes an enum such as `UnsignedActivations`).
    """
    t = get_target(target)
    return t.check(frozen, **_target_options(t, options))


def report_inputs(exp: Experiment) -> torch.Tensor:
    """The batch the export report measures agreement on: the experiment's first test batch."""
    return next(iter(exp.test_loader))[0]


def export_subnet(exp: Experiment, cfg: SubnetConfig, target: str, out_dir: str | os.PathLike, *,
                  options: Mapping[str, object] | None = None, frozen=None, check: bool = True) -> dict[str, str]:
    """Freeze `cfg` (`freeze_subnet`, or use `frozen`) and export it for `target` into `out_dir` (`Target.export`:
    checked first, files written atomically); returns {kind: path} of the files written (with "report": the export
    report, `eqnet_plugin.adapters.report`), plus "config": the subnet's JSON.

    Args:
        options: target options by name (`Target.options`, e.g. ``encoding_version`` for QNN); those `target` does
            not have are ignored.
        check: the report measures agreement on the first test batch (`report_inputs`) and latency where the
            target's runtime is installed; False: sizes and bits only.

    Raises:
        ValueError: unknown target, or a subnet the target cannot run (`TargetError`, listing every rule broken;
            nothing is written).
        ImportError: a package the target needs is missing (nothing is written).
    """
    t = get_target(target)
    frozen = frozen if frozen is not None else freeze_subnet(exp, cfg)
    from eqnet_plugin.adapters.report import ReportConfig
    report = ReportConfig(inputs=report_inputs(exp)) if check else ReportConfig(latency_rounds=0)
    files = t.export(frozen, exp.example_inputs, out_dir, report=report, **_target_options(t, options))
    config_path = Path(out_dir) / "subnet.json"
    cfg.to_json(config_path)
    files["config"] = os.fspath(config_path)
    return files


class ExportRefused(ValueError):
    """`export_targets` found targets that cannot run their subnet; `refusals` lists one line per target (nothing
    was written)."""

    def __init__(self, refusals: list[str], several: bool) -> None:
        self.refusals = list(refusals)
        super().__init__(("nothing written: " if several else "") + "; ".join(refusals) +
                         ("; choose a subnet every target runs, or export the others one target at a time"
                          if several else ""))


@dataclass(frozen=True)
class ExportPlan:
    """What `export_targets` writes (validated).

    Attributes:
        targets: registered target names.
        out_dir: output folder; with several targets one subfolder per target.
        subnet: the subnet every target exports; None: each target's default, W8A8 (the space's widest bits) in
            the target's scheme (`Target.scheme`).
        subnet_label: how tables name `subnet`.
        options: target options by name (each target takes those it has).
        finetune_steps: train each subnet alone for this many LSQ QAT steps before the export (0: off;
            `finetune_subnet`).
        finetune_lr: the fine-tuning's Adam learning rate.
        check: run the ONNX files ONNX Runtime can run and measure their top-1 agreement with PyTorch, and measure
            each target's export report (agreement on the first test batch, latency; `export_subnet`).
    """

    targets: tuple[str, ...]
    out_dir: str | os.PathLike
    subnet: SubnetConfig | None = None
    subnet_label: str = "subnet"
    options: Mapping[str, object] = field(default_factory=dict)
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    check: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("ExportPlan.targets is empty: name at least one target")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or \
                self.finetune_steps < 0:
            raise ValueError(f"ExportPlan.finetune_steps={self.finetune_steps!r}: use an integer >= 0")
        if not (isinstance(self.finetune_lr, (int, float)) and self.finetune_lr > 0):
            raise ValueError(f"ExportPlan.finetune_lr={self.finetune_lr!r}: use a positive number")


@dataclass
class ExportOutcome:
    """What `export_targets` did: one row per file written (target, kind, path, bytes, top-1 agreement or None),
    per fine-tuned subnet (label, test accuracy before, after), and the export report of each target (target ->
    the ``report.json`` contents)."""

    files: list[tuple[str, str, str, int, float | None]]
    finetuned: list[tuple[str, float, float]]
    reports: dict[str, dict] = field(default_factory=dict)


def export_targets(exp: Experiment, plan: ExportPlan, *, progress: bool = False) -> ExportOutcome:
    """Export subnets of `exp` to every target of `plan`: every target checks its subnet first and nothing is
    written unless all of them can run theirs; then the optional fine-tuning (after the checks: a refused subnet
    costs no training), then the exports and their ONNX Runtime checks.

    Raises:
        ExportRefused (a ValueError): a target cannot run its subnet (every refusal listed; nothing written).
        ImportError: a package a target needs is missing.
    """
    sn = exp.supernet
    several = len(plan.targets) > 1
    jobs, refusals, frozen_of = [], [], {}
    for t in plan.targets:
        cfg = plan.subnet if plan.subnet is not None else \
            uniform_config(sn, max(sn.space.weight_bits), max(sn.space.act_bits), get_target(t).scheme)
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in frozen_of:
            label = plan.subnet_label if plan.subnet is not None else f"{t}'s default"
            frozen_of[key] = (cfg, label, exp, freeze_subnet(exp, cfg))
        problems = export_problems(frozen_of[key][3], t, plan.options)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            refusals.append(f"target {t} cannot run this subnet: {problems[0]}{more}")
        jobs.append((t, key))
    if refusals:
        raise ExportRefused(refusals, several)
    finetuned = []
    if plan.finetune_steps:
        for key, (cfg, label, _, _) in list(frozen_of.items()):
            source = finetune_subnet(exp, cfg, plan.finetune_steps, plan.finetune_lr, progress=progress)
            frozen_of[key] = (cfg, label, source, freeze_subnet(source, cfg))
            finetuned.append((label, evaluate(sn, cfg, exp.test_loader, exp.bn_batches),
                              evaluate(source.supernet, cfg, exp.test_loader, exp.bn_batches)))
    rows, reports = [], {}
    for t, key in jobs:
        cfg, _, source, frozen = frozen_of[key]
        files = export_subnet(source, cfg, t, Path(plan.out_dir) / t if several else plan.out_dir,
                              options=plan.options, frozen=frozen, check=plan.check)
        with open(files["report"]) as f:
            reports[t] = json.load(f)
        for kind, path in files.items():
            agreement = None
            if plan.check and kind in get_target(t).ort_checkable:
                agreement = onnx_agreement(path, frozen, exp.test_loader)
            rows.append((t, kind, path, os.path.getsize(path), agreement))
    return ExportOutcome(rows, finetuned, reports)


@torch.no_grad()
def onnx_agreement(path: str | os.PathLike, frozen, loader: Iterable, max_batches: int | None = None) -> float:
    """Top-1 agreement in [0, 1] between ONNX Runtime running `path` and the frozen subnet on `loader`."""
    import onnxruntime as ort
    device = next(iter(frozen.parameters())).device
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    same = total = 0
    for i, (x, _) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ref = frozen(x.to(device)).argmax(1).cpu()
        got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0]).argmax(1)
        same += int((ref == got).sum())
        total += len(x)
    return same / max(total, 1)
