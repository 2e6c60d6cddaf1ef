"""Export stage: freeze a subnet with its own BatchNorm statistics and write it for a registered target
(`eqnet_plugin.adapters.targets`), plus the ONNX Runtime agreement check."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ...quant.space import SubnetConfig
from ...supernet import Supernet
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

    The copy serves `cfg` only: its other subnets are no longer the supernet's. `exp` itself is unchanged. On
    Fashion-MNIST 500 steps at lr 1e-3 lifted searched TinyMobileNetV2 subnets by 1.3-1.6 points, to within
    -0.33..+0.63 of dedicated uniform QAT (BENCHMARKS.md, bench_finetune).

    Raises:
        ValueError: `steps` < 1, `lr` <= 0, or `cfg` is not a subnet of the supernet.
    """
    import copy
    import dataclasses

    from ...train import cosine_scheduler, lsq_qat
    if int(steps) < 1 or not lr > 0:
        raise ValueError(f"finetune_subnet needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    exp.supernet.validate(cfg)
    sn = Supernet(copy.deepcopy(exp.supernet.model), exp.supernet.space)
    opt = torch.optim.Adam(sn.model.parameters(), lr=lr)
    epochs = -(-int(steps) // max(len(exp.train_loader), 1))        # enough passes over the data for `steps`
    lsq_qat(sn, cfg, exp.train_loader, opt, epochs, scheduler=cosine_scheduler(opt, int(steps)),
            max_steps=int(steps), progress=progress)
    return dataclasses.replace(exp, supernet=sn,
                               info={**exp.info, "finetuned": {"steps": int(steps), "lr": lr, "subnet": cfg.to_dict()}})


def _target_options(target, options: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in options.items() if k in target.options}


def export_problems(frozen, target: str, *, unsigned_activations: str = "rescale",
                    encoding_version: str = "1.0.0") -> list[str]:
    """Why `target` would refuse to export the frozen subnet (empty list: it can), found without writing anything
    (`Target.check`: the packages it needs and every rule the subnet breaks).

    Raises:
        ValueError: unknown target or option value.
    """
    t = get_target(target)
    return t.check(frozen, **_target_options(t, dict(unsigned_activations=unsigned_activations,
                                                       encoding_version=encoding_version)))


def export_subnet(exp: Experiment, cfg: SubnetConfig, target: str, out_dir: str | os.PathLike, *,
                  unsigned_activations: str = "rescale", encoding_version: str = "1.0.0", frozen=None
                  ) -> dict[str, str]:
    """Freeze `cfg` (`freeze_subnet`, or use `frozen`) and export it for `target` into `out_dir` (`Target.export`:
    checked first, files written atomically); returns {kind: path} of the files written, plus "config": the
    subnet's JSON.

    Args:
        unsigned_activations: TensorRT only: ``"rescale"`` writes unsigned (post-ReLU) 8-bit activations as INT8
            at twice the scale (one bit less resolution, not bit-exact); ``"refuse"`` rejects such subnets.
        encoding_version: QNN only: AIMET encodings version (0.6.1, 1.0.0, 2.0.0).

    Raises:
        ValueError: unknown target, or a subnet the target cannot run (`TargetError`, listing every rule broken;
            nothing is written).
        ImportError: a package the target needs is missing (nothing is written).
    """
    t = get_target(target)
    frozen = frozen if frozen is not None else freeze_subnet(exp, cfg)
    opts = _target_options(t, dict(unsigned_activations=unsigned_activations, encoding_version=encoding_version))
    files = t.export(frozen, exp.example_inputs, out_dir, **opts)
    config_path = Path(out_dir) / "subnet.json"
    cfg.to_json(config_path)
    files["config"] = os.fspath(config_path)
    return files


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
