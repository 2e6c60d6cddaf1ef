"""The EQ-Net flow as library functions: the stages the `eqnet` command line (and its demo) runs.

    spec = RunSpec(model="tiny_resnet", data="digits")
    exp = build_experiment(spec, float_epochs=10)                # data -> float model -> prepare -> calibrate
    train_experiment(exp, epochs=20, checkpoint="runs/x/supernet.pt")
    exp = load_experiment("runs/x/supernet.pt")                  # rebuild from the checkpoint alone
    table = uniform_table(exp)                                   # accuracy of uniform subnets (test split)
    out = search_experiment(exp, "runs/x/search", profile="tensorrt", constraints={"max_bitops": 1e8})
    export_subnet(exp, out.best.config, "tensorrt", "runs/x/exports/tensorrt")

Models: ``tiny_resnet`` / ``tiny_mobilenet_v2`` (`eqnet_plugin.models`), any torchvision classification model by
name (``resnet18``, ``mobilenet_v2``, ...), or ``package.module:callable``. Data: ``digits`` (embedded),
``fashion-mnist`` / ``mnist`` (IDX files; ``fashion-mnist:<folder>``), a local ImageFolder tree or a CIFAR-10
python batches folder. Bad input raises ValueError / FileNotFoundError with a message that names the fix (the
command line prints it as one line).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data import (DataSplits, cifar10_splits, digits_splits, fashion_mnist_splits, image_folder_splits,
                   make_loaders, mnist_splits)
from .fx import elastic_backend_config, prepare_qat
from .losses import WDRLoss
from .space import MAX_BITS, MIN_BITS, ElasticSpace, SubnetConfig, atomic_write_text
from .supernet import Supernet
from .train import (CheckpointError, bn_batches_from, cosine_scheduler, evaluate, evaluate_configs,
                    load_checkpoint, read_checkpoint, save_checkpoint, train_float, train_supernet)

__all__ = ["RunSpec", "Experiment", "SCHEMES", "TARGETS", "TARGET_SCHEMES", "TARGET_PROFILES", "build_model",
           "load_data", "build_experiment", "train_experiment", "load_experiment", "activations_signed",
           "read_run_spec", "resume_conflicts", "resume_error", "uniform_config", "export_problems",
           "parse_subnet", "uniform_table", "SearchOutcome", "search_experiment", "freeze_subnet", "export_subnet",
           "onnx_agreement", "fit_predictor", "collect", "model_in_channels", "write_json",
           "format_table"]

COMPACT_MODELS = ("tiny_resnet", "tiny_mobilenet_v2")
DEFAULT_IMAGE_SIZE = {"digits": 16, "fashion-mnist": 28, "mnist": 28}
DEFAULT_FOLDER_IMAGE_SIZE = 32

# scheme name -> (weight symmetric, weight per-channel, activation symmetric)
SCHEMES: dict[str, tuple[bool, bool, bool]] = {
    "sym": (True, False, True), "sym-pc": (True, True, True), "asym": (False, False, False),
    "asym-pc": (False, True, False), "wsym-aasym": (True, False, False), "wsym-pc-aasym": (True, True, False)}
TARGETS = ("onnx", "tensorrt", "brevitas", "qnn")
TARGET_PROFILES = {"onnx": "brevitas", "tensorrt": "tensorrt", "brevitas": "brevitas", "qnn": "qnn"}
TARGET_SCHEMES = {"onnx": "sym", "tensorrt": "sym-pc", "brevitas": "sym", "qnn": "wsym-pc-aasym"}
_UNIFORM_RE = re.compile(r"^w(\d+)a(\d+)(?:@([a-z0-9-]+))?$")


# --- specification --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a supernet and its data: stored in checkpoints written by `train_experiment`.

    Args:
        model: ``tiny_resnet``, ``tiny_mobilenet_v2``, a torchvision classification model name or
            ``package.module:callable`` (called with ``num_classes=`` / ``in_channels=`` when it accepts them).
        data: ``digits`` or a local folder (ImageFolder tree, or CIFAR-10 python batches).
        image_size: side length images are resized to (None: 16 for digits, 32 for folders).
        batch_size: training batch size.
        seed: split, shuffling, initialization and sampling seed.
        space: the elastic space of the supernet.
    """

    model: str = "tiny_resnet"
    data: str = "digits"
    image_size: int | None = None
    batch_size: int = 64
    seed: int = 0
    space: ElasticSpace = field(default_factory=ElasticSpace)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: give a model name such as tiny_resnet or resnet18")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: use a positive integer")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 4):
            raise ValueError(f"image_size={self.image_size!r}: use an integer >= 4")

    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        # "fashion-mnist:<folder>" defaults like "fashion-mnist"
        return DEFAULT_IMAGE_SIZE.get(self.data.partition(":")[0], DEFAULT_FOLDER_IMAGE_SIZE)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "image_size": self.image_size,
                "batch_size": self.batch_size, "seed": self.seed, "space": self.space.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunSpec":
        known = {"model", "data", "image_size", "batch_size", "seed", "space"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run spec keys {sorted(unknown)}; valid keys are {sorted(known)}")
        kw = dict(d)
        if "space" in kw:
            kw["space"] = ElasticSpace.from_dict(kw["space"])
        return cls(**kw)


# --- models and data ------------------------------------------------------------------------------------------
def _torchvision_models() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _call_with_supported(fn: Callable, **kwargs) -> nn.Module:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return fn(**{k: v for k, v in kwargs.items() if var_kw or k in params})


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A float model by name (see module docstring), randomly initialized (global torch RNG).

    Raises:
        ValueError: unknown name, a callable that cannot be imported or does not return an nn.Module.
    """
    if name in COMPACT_MODELS:
        from .models import build_model as compact
        return compact(name, num_classes, in_channels)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({e}); give "
                             "package.module:callable of an importable module") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ValueError(f"model {name!r}: {module_name} has no callable {attr!r}")
        model = _call_with_supported(fn, num_classes=num_classes, in_channels=in_channels)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        names = _torchvision_models()
    except ImportError:
        names = []
    if name in names:
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    close = [n for n in names if n.startswith(name[:4])][:6]
    raise ValueError(f"unknown model {name!r}: use {' or '.join(COMPACT_MODELS)}, a torchvision classification model "
                     f"(e.g. resnet18, mobilenet_v2{', ' + ', '.join(close) if close else ''}) or "
                     "package.module:callable")


def model_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first conv layer (None when the model starts otherwise)."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return None
    return None


def _repeat_channels(splits: DataSplits, channels: int) -> DataSplits:
    """1-channel data repeated to `channels` channels (for models with an RGB stem, e.g. torchvision's)."""
    def rep(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        return TensorDataset(x.expand(-1, channels, -1, -1).contiguous(), y)    # (N, channels, H, W)
    return replace(splits, train=rep(splits.train), val=rep(splits.val), test=rep(splits.test),
                   in_channels=channels, mean=splits.mean * channels, std=splits.std * channels)


_IDX_DATASETS = {"fashion-mnist": fashion_mnist_splits, "mnist": mnist_splits}


def _idx_dataset(data: str):
    """(reader, folder or None) for ``fashion-mnist`` / ``mnist`` [``:<folder>``], else None."""
    name, sep, folder = data.partition(":")
    if name not in _IDX_DATASETS:
        return None
    return _IDX_DATASETS[name], folder or None


def load_data(data: str, image_size: int, seed: int = 0) -> DataSplits:
    """``digits``, ``fashion-mnist`` / ``mnist`` (IDX files, optionally ``fashion-mnist:<folder>``), or a local
    folder: CIFAR-10 python batches (``data_batch_1`` .. / ``cifar-10-batches-py``) or an ImageFolder tree.

    ``fashion-mnist`` alone reads ``$EQNET_DATA`` or Debian's ``dataset-fashion-mnist`` files
    (`eqnet_plugin.data.fashion_mnist_splits`); ``mnist`` alone reads ``$EQNET_DATA``. Both are resized to
    `image_size` and keep 10,000 training images for validation. A folder literally named ``mnist`` is given as
    ``./mnist``.

    Raises:
        FileNotFoundError: the folder does not exist or holds no images / IDX files.
        ValueError: a file cannot be read, or the data has fewer than 2 classes.
    """
    if data == "digits":
        return digits_splits(image_size=image_size, seed=seed)
    idx = _idx_dataset(data)
    if idx is not None:
        reader, folder = idx
        return reader(folder, image_size=image_size, seed=seed)
    root = Path(data).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist; use 'digits' (embedded), 'fashion-mnist' "
                                "or 'mnist' (IDX files), an ImageFolder tree (<path>/<class>/<image> or "
                                "<path>/train + <path>/val) or a CIFAR-10 python batches folder")
    if not root.is_dir():
        raise FileNotFoundError(f"data path {str(root)!r} is a file; give the folder that holds the images")
    if (root / "data_batch_1").is_file() or (root / "cifar-10-batches-py").is_dir():
        return cifar10_splits(root, seed=seed, image_size=None if image_size == 32 else image_size)
    return image_folder_splits(root, image_size, seed=seed)


def _needs_relu6_patterns(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.ReLU6, nn.Hardtanh)) for m in model.modules())


def _seeded(seed: int):
    """A context in which the global torch RNG is seeded, restored afterwards (initialization only)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(seed)
    return stack


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
    """Supernet training, the paper's recipe: Adam `lr`, cosine decay per step, sandwich + GPG + WDR.

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
    opt = torch.optim.Adam(sn.model.parameters(), lr=lr)
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


# --- subnets --------------------------------------------------------------------------------------------------
def uniform_config(supernet: Supernet, w_bits: int, a_bits: int, scheme: str = "sym") -> SubnetConfig:
    """A uniform subnet in a named scheme (`SCHEMES`): e.g. ``uniform_config(sn, 8, 8, "sym-pc")`` (TensorRT)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    w_sym, pc, a_sym = SCHEMES[scheme]
    return supernet.uniform(w_bits, a_bits, symmetric=w_sym, per_channel=pc, act_symmetric=a_sym)


def parse_subnet(text: str, supernet: Supernet) -> SubnetConfig:
    """A subnet from a SubnetConfig JSON file, a search result JSON (its best subnet) or a uniform spec
    ``w<bits>a<bits>[@scheme]`` such as ``w8a8`` or ``w4a8@sym-pc``. Validated against `supernet`.

    Raises:
        ValueError: neither a file nor a valid spec, bits outside 2..8 or the supernet's space, an unknown scheme.
    """
    m = _UNIFORM_RE.match(text.strip().lower())
    if m and not os.path.isfile(text):
        w, a = int(m.group(1)), int(m.group(2))
        sp = supernet.space
        bad = [f"{kind} bits {b}" for kind, b in (("weight", w), ("activation", a)) if not MIN_BITS <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"subnet {text!r}: {' and '.join(bad)} out of range: bits must be in "
                             f"{MIN_BITS}..{MAX_BITS}; this supernet's space allows weight bits "
                             f"{', '.join(map(str, sp.weight_bits))} and activation bits "
                             f"{', '.join(map(str, sp.act_bits))}")
        out = [f"{kind} bits {b}" for kind, b, allowed in
               (("weight", w, sp.weight_bits), ("activation", a, sp.act_bits)) if b not in allowed]
        if out:
            raise ValueError(f"subnet {text!r}: {' and '.join(out)} outside the space of this supernet, which allows "
                             f"weight bits {', '.join(map(str, sp.weight_bits))} and activation bits "
                             f"{', '.join(map(str, sp.act_bits))}")
        cfg = uniform_config(supernet, w, a, m.group(3) or "sym")
    elif os.path.isfile(text):
        try:
            with open(text) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"subnet file {text!r} is not valid JSON ({e})") from None
        if isinstance(d, dict) and "best" in d and isinstance(d["best"], dict):
            d = d["best"].get("config")
        cfg = SubnetConfig.from_dict(d)
    else:
        raise ValueError(f"subnet {text!r} is neither a file nor a uniform spec: use w<bits>a<bits>[@scheme] (e.g. "
                         f"w8a8, w4a8@sym-pc; schemes {', '.join(SCHEMES)}) or a SubnetConfig / search JSON file")
    supernet.validate(cfg)
    return cfg


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
    from .search import CQAP, SearchSpace
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
    from .search import CostModel, collect_records
    from .search.records import supernet_fingerprint
    fingerprint = fingerprint if fingerprint is not None else supernet_fingerprint(exp.supernet)
    cm = CostModel.from_supernet(exp.supernet, exp.example_inputs)
    done = 0
    if os.path.exists(path):
        from .search import load_records
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
    from .search import (CQAP, CostModel, SearchSpace, evolution_search, measure_top, plot_pareto, refine_search,
                         sample_feasible)
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


# --- export ---------------------------------------------------------------------------------------------------
def _adapter(name: str, module: str | None = None):
    """A function of `eqnet_plugin.adapters` (or one of its modules), with a clear error when it is missing."""
    mods = ["eqnet_plugin.adapters"] + ([f"eqnet_plugin.adapters.{module}"] if module else [])
    for m in mods:
        try:
            fn = getattr(importlib.import_module(m), name, None)
        except ImportError as e:
            if module is None or m.endswith(module):
                raise ImportError(f"{m} cannot be imported ({e}); install the extra: pip install -e \".[all]\"") \
                    from e
            continue
        if fn is not None:
            return fn
    raise ImportError(f"this installation has no eqnet_plugin.adapters.{name}; the export stage it belongs to is "
                      "not available")


def freeze_subnet(exp: Experiment, cfg: SubnetConfig, recalibrate_bn: bool = True):
    """`freeze` subnet `cfg` with its own BatchNorm statistics (re-estimated on the experiment's training batches,
    as `evaluate` does), so the export computes what was measured. The supernet itself is left unchanged."""
    import copy
    from .freeze import freeze
    exp.supernet.validate(cfg)
    sn = Supernet(copy.deepcopy(exp.supernet.model), exp.supernet.space)
    if recalibrate_bn:
        with sn.activate(cfg):
            sn.recalibrate_bn(exp.bn_batches)
    return freeze(sn, cfg)


def export_problems(frozen, target: str, *, unsigned_activations: str = "rescale",
                    encoding_version: str = "1.0.0") -> list[str]:
    """Why `target` would refuse to export the frozen subnet (empty list: it can), found without writing anything:
    the adapter's own checks (TensorRT: `tensorrt_subnet_problems`; QNN: `qnn_rule_violations` and full-range
    grids; Brevitas: per-channel only along output channels) and the packages each adapter needs.

    Raises:
        ValueError: unknown target or option value.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    problems: list[str] = []
    try:
        import onnx  # noqa: F401
    except ImportError:
        return [f"the {target} export writes ONNX and needs the 'onnx' package: pip install -e \".[export]\""]
    if target == "tensorrt":
        problems += _adapter("tensorrt_subnet_problems", "tensorrt")(frozen, 17, unsigned_activations)
    elif target == "qnn":
        qnn = importlib.import_module("eqnet_plugin.adapters.qnn")
        if encoding_version not in qnn.ENCODING_VERSIONS:
            problems.append(f"encoding version {encoding_version!r} is not one of {', '.join(qnn.ENCODING_VERSIONS)}")
        for g, qp in frozen.qparams.items():
            try:
                qnn._check_full_grid(g, qp)
            except ValueError as e:
                problems.append(str(e))
        problems += qnn.qnn_rule_violations(frozen)
    elif target == "brevitas":
        try:
            _adapter("_require_export", "brevitas")()
        except ImportError as e:
            problems.append(str(e))
        for g, qp in frozen.qparams.items():
            if qp.per_channel and not frozen.qparams_is_weight(g):
                problems.append(f"activation {g!r} is per-channel (the Brevitas adapter quantizes activations "
                                "per-tensor)")
            elif qp.per_channel and qp.axis not in (None, 0):
                problems.append(f"weight {g!r} is per-channel along axis {qp.axis} (the Brevitas adapter supports "
                                "output channels, axis 0)")
    return problems


def export_subnet(exp: Experiment, cfg: SubnetConfig, target: str, out_dir: str | os.PathLike, *,
                  unsigned_activations: str = "rescale", encoding_version: str = "1.0.0", frozen=None
                  ) -> dict[str, str]:
    """Freeze `cfg` (`freeze_subnet`, or use `frozen`) and export it for `target` into `out_dir`; returns
    {kind: path} of the files written.

    Targets: ``onnx`` (Q/DQ ONNX for ONNX Runtime), ``tensorrt`` (explicit-quantization ONNX, checked against
    TensorRT's rules), ``brevitas`` (Brevitas QCDQ and QONNX ONNX), ``qnn`` (float ONNX + AIMET encodings).

    Args:
        unsigned_activations: TensorRT only: ``"rescale"`` writes unsigned (post-ReLU) 8-bit activations as INT8
            at twice the scale (one bit less resolution, not bit-exact); ``"refuse"`` rejects such subnets.
        encoding_version: QNN only: AIMET encodings version (0.6.1, 1.0.0, 2.0.0).

    Raises:
        ValueError: unknown target, or a subnet the target cannot run (`export_problems`, checked before anything
            is written; the message lists every rule broken).
        ImportError: a package the target needs is missing (nothing is written).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    frozen = frozen if frozen is not None else freeze_subnet(exp, cfg)
    problems = export_problems(frozen, target, unsigned_activations=unsigned_activations,
                               encoding_version=encoding_version)
    if problems:
        raise ValueError(f"target {target} cannot run this subnet ({len(problems)} problem(s)): "
                         + "; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex = exp.example_inputs
    files: dict[str, str] = {}
    if target == "onnx":
        files["onnx"] = os.fspath(_adapter("export_onnx", "onnx_qdq")(frozen, ex, out / "model.onnx"))
    elif target == "tensorrt":
        path = os.fspath(_adapter("export_to_tensorrt", "tensorrt")(frozen, ex, out / "model.onnx",
                                                                     unsigned_activations=unsigned_activations))
        problems = _adapter("check_tensorrt_onnx", "tensorrt")(path)
        if problems:
            raise RuntimeError(f"the TensorRT export broke TensorRT's rules: {problems} (please report)")
        files["onnx"] = path
    elif target == "brevitas":
        bmodel = _adapter("to_brevitas", "brevitas")(frozen)
        files["qcdq"] = os.fspath(_adapter("export_brevitas_qcdq", "brevitas")(bmodel, ex, out / "model_qcdq.onnx"))
        files["qonnx"] = os.fspath(_adapter("export_brevitas_qonnx", "brevitas")(bmodel, ex,
                                                                                 out / "model_qonnx.onnx"))
    else:
        res = _adapter("export_qnn", "qnn")(frozen, ex, out / "model", encoding_version=encoding_version)
        files["onnx"], files["encodings"] = os.fspath(res.onnx_path), os.fspath(res.encodings_path)
    config_path = out / "subnet.json"
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


# --- tables ---------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Sequence], headers: Sequence[str], markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"
    return str(v)


def write_json(path: str | os.PathLike, obj) -> str:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))
    return os.fspath(path)
