"""The `eqnet` command line: train | eval | search | export | demo.

    eqnet demo                                                   # the whole flow on the embedded digits data
    eqnet train --model resnet18 --data path/to/imagefolder --epochs 20 --out runs/r18
    eqnet eval --checkpoint runs/r18/supernet.pt
    eqnet search --checkpoint runs/r18/supernet.pt --profile tensorrt --bitops-fraction 0.7 --out runs/r18/trt
    eqnet export --checkpoint runs/r18/supernet.pt --subnet runs/r18/trt/best.json --target tensorrt

Every option can also come from a YAML or JSON file (``--config file``; keys are option names, ``epochs`` or
``float-epochs``); options given on the command line win. Bad input ends with exit status 2 and one line naming
the problem (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    """Bad command-line input detected by the CLI itself."""


# --- option types: argparse names the option in the error ("argument --epochs: ...") ----------------------------
def _int_type(lo: int, what: str, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]; `what` says what is wanted in the error message."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give {what}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range; give {what}")
        return v
    return parse


def _positive_float(text: str) -> float:
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a positive number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range; give a positive number")
    return v


_NONNEG = _int_type(0, "an integer >= 0")
_POSITIVE = _int_type(1, "a positive integer")
_AT_LEAST_2 = _int_type(2, "an integer >= 2")
_BITS = _int_type(2, "bit-widths in 2..8", 8)
_IMAGE_SIZE = _int_type(4, "an image size >= 4")


# --- parser ---------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, model_defaults: bool) -> None:
    d = (lambda v: v) if model_defaults else (lambda v: None)
    show = " (default: %(default)s)" if model_defaults else ""
    g = p.add_argument_group("model and data" + ("" if model_defaults else " (default: stored in the checkpoint)"))
    g.add_argument("--model", default=d("tiny_resnet"),
                   help="tiny_resnet, tiny_mobilenet_v2, a torchvision model (resnet18, mobilenet_v2, ...) or "
                        "package.module:callable" + show)
    g.add_argument("--data", default=d("digits"),
                   help="'digits' (embedded); 'fashion-mnist' (Debian's dataset-fashion-mnist files, or "
                        "$EQNET_DATA) or 'mnist' ($EQNET_DATA), 28x28, optionally with a folder: "
                        "'fashion-mnist:DIR' / 'mnist:DIR' (default --image-size 28); or a folder: ImageFolder "
                        "tree or CIFAR-10 python batches" + show)
    g.add_argument("--image-size", type=_IMAGE_SIZE, default=None,
                   help="resize images to this size (digits: 16, else 32)")
    g.add_argument("--batch-size", type=_POSITIVE, default=d(64))
    g.add_argument("--seed", type=_NONNEG, default=d(0))
    g.add_argument("--weight-bits", type=_BITS, nargs="+", default=None, help="elastic weight bit-widths (2..8)")
    g.add_argument("--act-bits", type=_BITS, nargs="+", default=None, help="elastic activation bit-widths (2..8)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--threads", type=_POSITIVE, default=None,
                   help="torch CPU threads (default: torch's choice; 1 for demo)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    r.add_argument("--config", default=None, help="YAML/JSON file with option values (command-line flags win)")
    r.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="supernet checkpoint written by `eqnet train` / `eqnet demo`")


def _constraints(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("constraints (at least one; default --bitops-fraction 0.3, 0.7 for tensorrt/qnn)")
    g.add_argument("--max-bitops", type=_positive_float, default=None, help="BitOps limit (MACs x w_bits x a_bits)")
    g.add_argument("--bitops-fraction", type=_positive_float, default=None,
                   help="BitOps limit as a fraction of W8A8's")
    g.add_argument("--max-size-bytes", type=_positive_float, default=None, help="model size limit in bytes")
    g.add_argument("--max-avg-weight-bits", type=_positive_float, default=None)
    g.add_argument("--max-avg-act-bits", type=_positive_float, default=None)


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import target_names
    from ..search.profiles import PROFILES
    TARGETS = target_names()
    parser = _Parser(prog="eqnet", description="EQ-Net elastic quantization: train one supernet, search subnets, "
                                               "export them to TensorRT / Brevitas / QNN / ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,search,export,demo}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="float pretraining + supernet training", description=_doc("train"))
    _common(p, True)
    p.add_argument("--float-epochs", type=_NONNEG, default=10, help="float pretraining epochs (0: start from init)")
    p.add_argument("--epochs", type=_POSITIVE, default=20,
                   help="supernet epochs (the cosine schedule spans them; a resumed run must keep them)")
    p.add_argument("--max-steps", type=_POSITIVE, default=None,
                   help="stop after this many supernet steps (the cosine schedule then ends there)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (cosine decay)")
    p.add_argument("--calib-batches", type=_POSITIVE, default=8)
    p.add_argument("--signed-activations", action="store_true",
                   help="for TensorRT: calibrate every activation quantizer on the signed grid (INT8 activations "
                        "with zero point 0, exact export); costs one bit of resolution on post-ReLU tensors. "
                        "Fixed at calibration: a resumed run keeps its checkpoint's grids")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/supernet.pt when it exists (with the same model, data, --image-size, "
                        "--batch-size, --seed, bits, --lr, --epochs and --max-steps: a difference is refused); "
                        "--no-resume starts over and overwrites it")
    p.add_argument("--out", default="runs/train", help="output folder (default: %(default)s)")

    p = sub.add_parser("eval", help="accuracy of uniform subnets or given subnets", description=_doc("eval"))
    _checkpoint(p)
    _common(p, False)
    p.add_argument("--subnet", nargs="+", default=None,
                   help="subnets: w<W>a<A>[@scheme] (e.g. w4a8@sym-pc) or SubnetConfig / search JSON files")
    p.add_argument("--bits", nargs="+", default=["8,8", "6,6", "4,4", "3,3", "2,2"],
                   help="uniform W,A pairs for the table")
    p.add_argument("--schemes", nargs="+", default=["sym", "asym", "sym-pc"])
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("search", help="records -> CQAP -> genetic search under constraints",
                       description=_doc("search"))
    _checkpoint(p)
    _common(p, False)
    p.add_argument("--profile", default="brevitas", choices=tuple(PROFILES),
                   help="backend profile: only subnets the target runs (default: %(default)s)")
    _constraints(p)
    p.add_argument("--records", type=_AT_LEAST_2, default=200, help="measured subnets for the predictor (>= 2)")
    p.add_argument("--predictor", default=None, help="a fitted CQAP file (cqap.pt): skip measuring records")
    p.add_argument("--population", type=_AT_LEAST_2, default=100)
    p.add_argument("--generations", type=_NONNEG, default=500)
    p.add_argument("--cqap-epochs", type=_POSITIVE, default=300,
                   help="training epochs of the CQAP's MLP (part of the default ensemble)")
    p.add_argument("--measure-top", type=_NONNEG, default=10,
                   help="measure this many best-predicted subnets on the validation split and keep the best "
                        "measured (0: keep the best predicted; default: %(default)s)")
    p.add_argument("--refine-rounds", type=_NONNEG, default=3,
                   help="rounds of search -> measure top -> refit the predictor (needs measured records; "
                        "default: %(default)s)")
    p.add_argument("--out", default="runs/search",
                   help="output folder; records.jsonl there is resumed when it was measured on this checkpoint's "
                        "supernet (records of another one are refused: use a new --out or delete the file)")

    p = sub.add_parser("export", help="freeze a subnet and export it", description=_doc("export"))
    _checkpoint(p)
    _common(p, False)
    p.add_argument("--target", required=True, choices=(*TARGETS, "all"),
                   help="all: every target, into OUT/<target>. Every target checks the subnet first; if any "
                        "refuses it, nothing is written and the error lists each refusal")
    p.add_argument("--subnet", default=None,
                   help="w<W>a<A>[@scheme] or a SubnetConfig / search JSON (default: W8A8 in the target's scheme)")
    p.add_argument("--unsigned-activations", choices=("rescale", "refuse"), default="rescale",
                   help="tensorrt: unsigned (post-ReLU) activations as INT8 at twice the scale (rescale: one bit "
                        "less resolution) or refuse such subnets (default: %(default)s); a supernet trained with "
                        "`eqnet train --signed-activations` has none and exports exactly")
    p.add_argument("--encoding-version", choices=("0.6.1", "1.0.0", "2.0.0"), default="1.0.0",
                   help="qnn: AIMET encodings version (default: %(default)s)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run Q/DQ ONNX files in ONNX Runtime and report top-1 agreement with PyTorch")
    p.add_argument("--finetune-steps", type=_NONNEG, default=0,
                   help="train the subnet alone for this many LSQ QAT steps from the supernet's weights before "
                        "export (a copy: the checkpoint is not changed); 500 recovered 1.3-1.6 points on "
                        "Fashion-MNIST TinyMobileNetV2 subnets (default: %(default)s, off)")
    p.add_argument("--finetune-lr", type=_positive_float, default=1e-3,
                   help="Adam learning rate of --finetune-steps, cosine-decayed to 0 (default: %(default)s)")
    p.add_argument("--out", default="runs/export", help="output folder; one subfolder per target")

    p = sub.add_parser("demo", help="the whole flow on the embedded digits data (a few minutes on 2 CPU cores)",
                       description=_doc("demo"))
    _common(p, True)
    p.add_argument("--budget", default="default", help="default | small | tiny")
    p.add_argument("--float-epochs", type=_NONNEG, default=None, help="override the budget's float epochs")
    p.add_argument("--epochs", type=_POSITIVE, default=None, help="override the budget's supernet epochs")
    p.add_argument("--max-steps", type=_POSITIVE, default=None, help="cap supernet steps")
    p.add_argument("--records", type=_AT_LEAST_2, default=None, help="override the budget's measured subnets")
    p.add_argument("--generations", type=_NONNEG, default=None, help="override the budget's GA generations")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS,
                   help="export targets (default: all registered)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    # The demo's models are tiny: on one thread it takes about 2.5 CPU-minutes, and it avoids the many-fold slowdown
    # of oversubscribed OpenMP threads on a busy machine. --threads N overrides it.
    p.set_defaults(threads=1)
    return parser


def _doc(cmd: str) -> str:
    return {
        "train": "Train a float model, prepare it with elastic fake-quants, calibrate, and train the supernet "
                 "(sandwich rule + GPG + WDR; Adam per subnet + cosine). Writes OUT/supernet.pt.",
        "eval": "Accuracy of subnets of a trained supernet (BN re-estimated on training batches per subnet).",
        "search": "Measure sampled subnets, fit the CQAP accuracy predictor and run the genetic search under "
                  "BitOps / size / average-bit constraints and a backend profile. Writes search.json, best.json, "
                  "pareto.png, records.jsonl and cqap.pt to OUT.",
        "export": "Freeze a subnet (BN folded, QParams) and export it: onnx (Q/DQ for ONNX Runtime), tensorrt "
                  "(explicit-quantization ONNX), brevitas (QCDQ + QONNX ONNX), qnn (float ONNX + AIMET "
                  "encodings). With --finetune-steps the subnet is first trained alone for that many steps from "
                  "the supernet's weights (the checkpoint is not changed).",
        "demo": "Float pretraining, supernet training, the uniform accuracy table, search with a Pareto plot and "
                "export of the chosen subnets to every target, with a Markdown report in OUT.",
    }[cmd]


def _version() -> str:
    from .. import __version__
    return __version__


# --- config files ---------------------------------------------------------------------------------------------
def _load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    text = Path(path).read_text()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:      # json.JSONDecodeError, yaml.YAMLError
        raise UsageError(f"config file {path!r} cannot be parsed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option names to values")
    return data


def _config_tokens(sub: argparse.ArgumentParser, data: dict, path: str) -> list[str]:
    """Option values of a config file as command-line tokens for subparser `sub`."""
    actions = {a.dest: a for a in sub._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        act = actions.get(dest)
        if act is None or dest in ("config", "help"):
            valid = sorted(k.replace("_", "-") for k in actions if k not in ("config", "help"))
            raise UsageError(f"config file {path!r}: unknown option {key!r}; valid options: {', '.join(valid)}")
        flag = next(s for s in act.option_strings if s.startswith("--") and not s.startswith("--no-"))
        if isinstance(act, argparse.BooleanOptionalAction) or act.nargs == 0:
            if not isinstance(value, bool):
                raise UsageError(f"config file {path!r}: option {key!r} takes true or false, got {value!r}")
            if value:
                tokens.append(flag)
            elif isinstance(act, argparse.BooleanOptionalAction):
                tokens.append("--no-" + flag[2:])
        elif isinstance(value, list):
            tokens += [flag, *[str(v) for v in value]]
        elif value is not None:
            tokens += [flag, str(value)]
    return tokens


def _expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Insert the tokens of ``--config FILE`` right after the subcommand, so later command-line flags win."""
    path, rest = None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if path is None or not rest:
        return argv
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subs.choices.get(rest[0])
    if sub is None:
        return argv
    return [rest[0], *_config_tokens(sub, _load_config_file(path), path), *rest[1:]]


# --- commands -------------------------------------------------------------------------------------------------
def _space(args, base=None):
    """The ElasticSpace of --weight-bits / --act-bits, on top of `base` (default: the default space)."""
    from dataclasses import replace
    from ..quant.space import ElasticSpace
    kw = {}
    if getattr(args, "weight_bits", None):
        kw["weight_bits"] = tuple(args.weight_bits)
    if getattr(args, "act_bits", None):
        kw["act_bits"] = tuple(args.act_bits)
    return replace(base if base is not None else ElasticSpace(), **kw)


def _spec(args):
    from .pipeline import RunSpec
    return RunSpec(model=args.model, data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                   seed=args.seed, space=_space(args))


def _device(args) -> str:
    import torch
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_out(path: str, option: str = "--out", file: bool = False) -> None:
    """Fail before any work when the output folder `path` (with `file`: the folder of the file `path`) cannot be
    created or written: a probe file is created and removed in it, or in its nearest existing parent when it does
    not exist yet (nothing is created there)."""
    target = Path(path).expanduser().absolute()
    if file and target.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name (e.g. {os.path.join(path, 'eval.json')})")
    folder = target.parent if file else target
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"{option} {path}: cannot create the output folder {folder}, because {probe_dir} is a file; "
                         f"choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".eqnet-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "write in the output folder" if probe_dir == folder else f"create the output folder {folder} in"
        raise UsageError(f"{option} {path}: cannot {what} {probe_dir} ({e.strerror or type(e).__name__}); choose a "
                         f"writable {option} or fix the folder's permissions") from None


def _load(args):
    """The experiment of --checkpoint; model/data flags given explicitly override the stored run spec (not
    --image-size: the supernet was trained at one size)."""
    from dataclasses import replace
    from .pipeline import RunSpec, load_experiment
    from ..quant.space import ElasticSpace
    from ..train import read_checkpoint
    path = args.checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; write one with `eqnet train` or "
                                "`eqnet demo`")
    ckpt = read_checkpoint(path, "cpu")
    extra = ckpt.get("extra") or {}
    info: dict = {}
    if "run" in extra:
        spec, info = RunSpec.from_dict(extra["run"]), dict(extra.get("info") or {})
        size = spec.resolved_image_size()
        if args.image_size is not None and args.image_size != size:
            raise UsageError(f"--image-size {args.image_size}: {path} was trained on {size}x{size} images and "
                             f"evaluates correctly only at that size; omit --image-size (or give {size})")
    elif args.model is None or args.data is None:
        raise UsageError(f"{path} holds no run description (written by save_checkpoint directly, or by an "
                         "interrupted `eqnet train` of an earlier release); pass --model and --data (and "
                         "--image-size, --batch-size, --seed as it was trained) to rebuild its model")
    else:
        spec = RunSpec(model=args.model, data=args.data, space=ElasticSpace.from_dict(ckpt["space"]))
    train = extra.get("train") or {}
    if train.get("schedule_steps") and int(ckpt.get("step", 0)) < int(train["schedule_steps"]):
        print(f"note: {path} is from an unfinished run (step {ckpt['step']} of {train['schedule_steps']}); "
              "`eqnet train` with the same options resumes it")
    del ckpt
    over = {k: getattr(args, k) for k in ("model", "data", "image_size", "batch_size", "seed")
            if getattr(args, k) is not None}
    if args.weight_bits or args.act_bits:
        over["space"] = _space(args, spec.space)
    spec = replace(spec, **over)
    exp = load_experiment(path, spec=spec, device=_device(args))
    exp.info.update(info)
    return exp


def _print_table(rows, headers, title: str | None = None) -> None:
    from .pipeline import format_table
    if title:
        print(f"\n{title}")
    print(format_table(rows, headers))


_FLAGS = {"model": "--model", "data": "--data", "image_size": "--image-size", "batch_size": "--batch-size",
          "seed": "--seed", "weight_bits": "--weight-bits", "act_bits": "--act-bits", "lr": "--lr",
          "epochs": "--epochs", "max_steps": "--max-steps"}


def _setting(name: str, value) -> str:
    """A run setting as the command line spells it (for resume errors)."""
    if name == "schedule_steps":
        return f"a cosine schedule of {value} steps"
    if name == "max_steps" and value is None:
        return "no --max-steps"
    if name not in _FLAGS:
        return f"{name} {value}"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return f"{_FLAGS[name]} {value:g}" if isinstance(value, float) else f"{_FLAGS[name]} {value}"


def _check_resume(args, spec, ckpt: Path, steps_per_epoch: int | None = None) -> bool:
    """Refuse to resume `ckpt` with settings other than its run's (see `resume_conflicts`). Returns whether the
    length of its cosine schedule could be compared (checkpoints of earlier releases need `steps_per_epoch`)."""
    from .pipeline import resume_conflicts, resume_error
    from ..train import CheckpointError, read_checkpoint
    try:
        stored = read_checkpoint(ckpt, "cpu")
    except CheckpointError as e:
        raise CheckpointError(f"{e}. To start over instead of resuming it: --no-resume (overwrites it) or a new "
                              "--out") from None
    conflicts, finished = resume_conflicts(stored, spec, epochs=args.epochs, lr=args.lr, max_steps=args.max_steps,
                                           steps_per_epoch=steps_per_epoch)
    info = (stored.get("extra") or {}).get("info") or {}
    if args.signed_activations and info.get("signed_activations") is False:
        raise UsageError(f"{ckpt} was calibrated without --signed-activations and resuming keeps its activation "
                         "grids; use a new --out or --no-resume to start over with them")
    if conflicts:
        raise UsageError(resume_error(ckpt, conflicts, finished, _setting,
                                      "a new --out, or --no-resume to overwrite it"))
    return "train" in (stored.get("extra") or {}) or steps_per_epoch is not None


def cmd_train(args) -> int:
    from .pipeline import activations_signed, build_experiment, read_run_spec, train_experiment, uniform_config
    from ..train import evaluate, load_checkpoint
    _check_out(args.out)
    spec = _spec(args)
    ckpt = Path(args.out) / "supernet.pt"
    resuming = args.resume and ckpt.exists()
    checked = _check_resume(args, spec, ckpt) if resuming else True      # before any work
    t0 = time.perf_counter()
    exp = build_experiment(spec, device=_device(args), float_epochs=0 if resuming else args.float_epochs,
                           calibrate=not resuming, calib_batches=args.calib_batches,
                           signed_activations=args.signed_activations, progress=args.progress)
    if resuming:
        if not checked:                     # a checkpoint without its training settings: compare the schedule now
            _check_resume(args, spec, ckpt, steps_per_epoch=len(exp.train_loader))
        print(f"resuming from {ckpt}")
        if args.signed_activations:         # the grids were fixed when the checkpoint's run calibrated
            load_checkpoint(ckpt, exp.supernet, restore_rng=False)
            if not activations_signed(exp.supernet):
                raise UsageError(f"{ckpt} was calibrated without --signed-activations and resuming keeps its "
                                 "activation grids; use a new --out or --no-resume to start over with them")
    hist = train_experiment(exp, args.epochs, ckpt, lr=args.lr, max_steps=args.max_steps, resume=args.resume,
                            progress=args.progress)
    if resuming:
        exp.info.update(read_run_spec(ckpt)[1])
    sn = exp.supernet
    rows = [["float model", exp.info.get("float_test_accuracy", "-")]]
    for w, a in ((8, 8), (4, 4), (min(sn.space.weight_bits), min(sn.space.act_bits))):
        if w in sn.space.weight_bits and a in sn.space.act_bits and f"w{w}a{a}" not in [r[0] for r in rows]:
            rows.append([f"w{w}a{a}", evaluate(sn, uniform_config(sn, w, a), exp.test_loader, exp.bn_batches)])
    _print_table(rows, ["model (test split)", "accuracy"],
                 f"trained {spec.model} on {spec.data}: {hist['step']} steps, {time.perf_counter() - t0:.1f} s; "
                 f"checkpoint {ckpt}" + ("; signed activations (TensorRT-exact)" if activations_signed(sn) else ""))
    return 0


def _parse_bits(pairs: list[str]) -> list[tuple[int, int]]:
    out = []
    for p in pairs:
        try:
            w, a = (int(v) for v in p.split(","))
        except ValueError:
            raise UsageError(f"--bits {p!r}: give W,A pairs such as 8,8 4,4") from None
        out.append((w, a))
    return out


def cmd_eval(args) -> int:
    from .pipeline import SCHEMES, parse_subnet, uniform_table, write_json
    from ..search import CostModel
    from ..train import evaluate
    bad = [s for s in args.schemes if s not in SCHEMES]
    if bad:
        raise UsageError(f"unknown schemes {bad}; choose from {', '.join(SCHEMES)}")
    bits = _parse_bits(args.bits)
    if args.out:
        _check_out(args.out, file=True)
    exp = _load(args)
    loader = exp.test_loader if args.split == "test" else exp.val_loader
    results: dict = {}
    if args.subnet:
        cm = CostModel.from_supernet(exp.supernet, exp.example_inputs)
        rows = []
        for s in args.subnet:
            cfg = parse_subnet(s, exp.supernet)
            acc = evaluate(exp.supernet, cfg, loader, exp.bn_batches)
            c = cm(cfg)
            results[s] = {"accuracy": acc, "costs": c.to_dict()}
            rows.append([s, acc, f"{c.bitops:.4g}", f"{c.size_bytes:.0f}", c.avg_weight_bits, c.avg_act_bits])
        _print_table(rows, ["subnet", f"accuracy ({args.split})", "BitOps", "size (B)", "avg W bits", "avg A bits"])
    else:
        table = uniform_table(exp, bits, args.schemes, split=args.split, progress=args.progress)
        results = table
        _print_table([[k, *v.values()] for k, v in table.items()], ["bits", *args.schemes],
                     f"accuracy of uniform subnets ({args.split} split)")
    if args.out:
        write_json(args.out, results)
    return 0


def _constraint_args(args) -> tuple[dict, float | None]:
    c = {k: getattr(args, k) for k in ("max_bitops", "max_size_bytes", "max_avg_weight_bits", "max_avg_act_bits")
         if getattr(args, k) is not None}
    frac = args.bitops_fraction
    if not c and frac is None:
        frac = 0.7 if args.profile in ("tensorrt", "qnn") else 0.3
    return c, frac


def cmd_search(args) -> int:
    from .pipeline import search_experiment
    from ..search import CQAP
    cons, frac = _constraint_args(args)
    _check_out(args.out)
    predictor = CQAP.load(args.predictor) if args.predictor else None
    exp = _load(args)
    o = search_experiment(exp, args.out, profile=args.profile, constraints=cons, bitops_fraction=frac,
                          records=args.records, predictor=predictor, population=args.population,
                          generations=args.generations, cqap_epochs=args.cqap_epochs, seed=exp.spec.seed,
                          measure_top_k=args.measure_top, refine_rounds=args.refine_rounds,
                          progress=args.progress)
    c = o.result.best.costs
    rows = [["profile", o.result.profile],
            ["constraints", ", ".join(f"{k}={v:.4g}" for k, v in o.result.constraints.to_dict().items()
                                      if v is not None)],
            ["predicted accuracy", o.result.best.predicted_accuracy],
            *([["measured accuracy (val, measure_top)", o.result.best.measured_accuracy]]
              if o.result.best.measured_accuracy is not None else []),
            ["measured accuracy (test)", o.measured_accuracy],
            ["BitOps (% of W8A8)", f"{c['bitops']:.4g} ({100 * c['bitops'] / o.reference['w8a8_bitops']:.0f}%)"],
            ["size (bytes)", f"{c['size_bytes']:.0f}"], ["avg weight / act bits",
                                                          f"{c['avg_weight_bits']:.2f} / {c['avg_act_bits']:.2f}"]]
    if o.predictor.get("n"):
        rows.append(["CQAP Kendall tau (held out)", o.predictor["kendall_tau"]])
    rows += [[k, v] for k, v in o.files.items()]
    _print_table(rows, ["search", "result"])
    return 0


def cmd_export(args) -> int:
    from .pipeline import (export_problems, export_subnet, finetune_subnet, freeze_subnet, get_target, onnx_agreement,
                           parse_subnet, target_names, uniform_config)
    from ..train import evaluate
    _check_out(args.out)
    exp = _load(args)
    sn = exp.supernet
    targets = target_names() if args.target == "all" else (args.target,)
    given = parse_subnet(args.subnet, sn) if args.subnet else None
    plan, refusals, frozen_of = [], [], {}
    for t in targets:                       # check every target before anything is written
        cfg = given if given is not None else \
            uniform_config(sn, max(sn.space.weight_bits), max(sn.space.act_bits), get_target(t).scheme)
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in frozen_of:
            label = args.subnet if given is not None else f"{t}'s default"
            frozen_of[key] = (cfg, label, exp, freeze_subnet(exp, cfg))
        frozen = frozen_of[key][3]
        problems = export_problems(frozen, t, unsigned_activations=args.unsigned_activations,
                                   encoding_version=args.encoding_version)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            refusals.append(f"target {t} cannot run this subnet: {problems[0]}{more}")
        plan.append((t, key))
    if refusals:
        raise UsageError(("nothing written: " if len(targets) > 1 else "") + "; ".join(refusals) +
                         ("; choose a subnet every target runs, or export the others one --target at a time"
                          if len(targets) > 1 else ""))
    if args.finetune_steps:                 # after the checks: a refused subnet costs no training
        tuned = []
        for key, (cfg, label, _, _) in frozen_of.items():
            source = finetune_subnet(exp, cfg, args.finetune_steps, args.finetune_lr, progress=args.progress)
            frozen_of[key] = (cfg, label, source, freeze_subnet(source, cfg))
            tuned.append([label, evaluate(sn, cfg, exp.test_loader, exp.bn_batches),
                          evaluate(source.supernet, cfg, exp.test_loader, exp.bn_batches)])
        _print_table(tuned, ["fine-tuned subnet", "test accuracy before", f"after {args.finetune_steps} steps"])
    rows = []
    for t, key in plan:
        cfg, _, source, frozen = frozen_of[key]
        files = export_subnet(source, cfg, t, Path(args.out) / t if len(targets) > 1 else args.out,
                              unsigned_activations=args.unsigned_activations,
                              encoding_version=args.encoding_version, frozen=frozen)
        for kind, path in files.items():
            check = "-"
            if args.check and kind in get_target(t).ort_checkable:
                check = f"ORT top-1 agreement {onnx_agreement(path, frozen, exp.test_loader):.4f}"
            rows.append([t, kind, path, os.path.getsize(path), check])
    _print_table(rows, ["target", "file", "path", "bytes", "check"])
    return 0


def cmd_demo(args) -> int:
    from dataclasses import replace
    from .demo import BUDGETS, run_demo
    if args.budget not in BUDGETS:
        raise UsageError(f"unknown budget {args.budget!r}; choose one of {', '.join(BUDGETS)}")
    over = {k: getattr(args, k) for k in ("float_epochs", "epochs", "max_steps", "records", "generations")
            if getattr(args, k) is not None}
    budget = replace(BUDGETS[args.budget], **over)
    _check_out(args.out)
    s = run_demo(args.out, budget=budget, spec=_spec(args), targets=tuple(args.targets), device=_device(args),
                 progress=args.progress)
    rows = [[k, f"{v:.1f}"] for k, v in s["seconds"].items()]
    _print_table(rows, ["stage", "seconds"], "time per stage")
    u = s["uniform"]
    if u:
        schemes = list(next(iter(u.values())).keys())
        _print_table([[k, *v.values()] for k, v in u.items()], ["bits", *schemes],
                     "accuracy of uniform subnets (test)")
    rows = [[n, r["scheme"], r["predicted_accuracy"], r["measured_accuracy"],
             f"{100 * r['costs']['bitops'] / r['w8a8_bitops']:.0f}%"] for n, r in s["searches"].items()]
    _print_table(rows, ["search profile", "scheme", "predicted", "measured (test)", "BitOps vs W8A8"],
                 "searched subnets")
    rows = [[t, ", ".join(e["files"].values()), e.get("ort_top1_agreement", "-")] for t, e in s["exports"].items()]
    _print_table(rows, ["target", "files", "ORT top-1 agreement"], "exports")
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "search": cmd_search, "export": cmd_export, "demo": cmd_demo}


def _user_errors() -> tuple[type, ...]:
    from ..frontends.fx import PlacementError, TraceError
    return (ValueError, OSError, ImportError, TraceError, PlacementError)


def _one_line(message: str, keep: int = 2) -> str:
    """A multi-line message (e.g. a list of broken rules) as one line: the first `keep` lines, the last one."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) > keep + 1:
        lines = lines[:keep] + [f"... ({len(lines) - keep - 1} more)"] + lines[-1:]
    return " ".join(" ".join(lines).split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eqnet` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"eqnet {cmd}" if cmd else "eqnet"
    try:
        try:
            args = parser.parse_args(_expand_config(parser, argv))
        except SystemExit as e:            # --help, --version, or a usage error already printed as one line
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads {args.threads}: use a positive integer")
            import torch
            torch.set_num_threads(args.threads)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "No CUDA runtime" on CPU hosts
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
            warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        msg = _one_line(str(e)) or type(e).__name__
        print(f"{prog}: error: {msg} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
