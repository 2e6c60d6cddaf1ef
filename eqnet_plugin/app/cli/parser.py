"""The `eqnet` argument parser: subcommands, option types that name the option in their errors, and option
files (``--config file``: YAML or JSON, keys are option names; command-line flags win)."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from ..._version import __version__
from ...quant.grid import Scheme
from ...search.profiles import PROFILES
from ..pipeline import SearchSettings, target_names

__all__ = ["build_parser", "expand_config", "UsageError", "EXIT_USAGE"]

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


def _scheme(text: str) -> Scheme:
    try:
        return Scheme.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    TARGETS = target_names()
    parser = _Parser(prog="eqnet", description="EQ-Net elastic quantization: train one supernet, search subnets, "
                                               "export them to TensorRT / Brevitas / QNN / ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
                        "with zero point 0), which TensorRT runs exactly; `eqnet export --target tensorrt` refuses "
                        "supernets calibrated without it. Costs one bit of resolution on post-ReLU tensors. Fixed "
                        "at calibration: a resumed run keeps its checkpoint's grids")
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
    p.add_argument("--schemes", nargs="+", type=_scheme, default=[Scheme.SYM, Scheme.ASYM, Scheme.SYM_PC],
                   help=f"uniform schemes for the table: {', '.join(Scheme.names())} (default: sym asym sym-pc)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("search", help="records -> CQAP -> genetic search under constraints",
                       description=_doc("search"))
    _checkpoint(p)
    _common(p, False)
    p.add_argument("--profile", default="brevitas", choices=tuple(PROFILES),
                   help="backend profile: only subnets the target runs (default: %(default)s)")
    _constraints(p)
    p.add_argument("--records", type=_AT_LEAST_2, default=SearchSettings.records,
                   help="measured subnets for the predictor (>= 2)")
    p.add_argument("--predictor", default=None, help="a fitted CQAP file (cqap.pt): skip measuring records")
    p.add_argument("--population", type=_AT_LEAST_2, default=SearchSettings.population)
    p.add_argument("--generations", type=_NONNEG, default=SearchSettings.generations)
    p.add_argument("--cqap-epochs", type=_POSITIVE, default=SearchSettings.cqap_epochs,
                   help="training epochs of the CQAP's MLP (part of the default ensemble)")
    p.add_argument("--measure-top", type=_NONNEG, default=SearchSettings.measure_top_k,
                   help="measure this many best-predicted subnets on the validation split and keep the best "
                        "measured (0: keep the best predicted; default: %(default)s)")
    p.add_argument("--refine-rounds", type=_NONNEG, default=SearchSettings.refine_rounds,
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
    p.add_argument("--encoding-version", choices=("0.6.1", "1.0.0", "2.0.0"), default="1.0.0",
                   help="qnn: AIMET encodings version (default: %(default)s)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run Q/DQ ONNX files in ONNX Runtime and report top-1 agreement with PyTorch")
    p.add_argument("--finetune-steps", type=_NONNEG, default=0,
                   help="train the subnet alone for this many LSQ QAT steps from the supernet's weights before "
                        "export (a copy: the checkpoint is not changed; default: %(default)s, off)")
    p.add_argument("--finetune-lr", type=_positive_float, default=1e-3,
                   help="Adam learning rate of --finetune-steps, cosine-decayed to 0 (default: %(default)s)")
    p.add_argument("--out", default="runs/export", help="output folder; one subfolder per target")

    p = sub.add_parser("demo", help="the whole flow on the embedded digits data",
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
    # The demo's models are tiny: one thread avoids the slowdown of oversubscribed OpenMP threads on a busy machine.
    # --threads N overrides it.
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
                  "(explicit-quantization ONNX; the supernet must be trained with --signed-activations), brevitas "
                  "(QCDQ + QONNX ONNX), qnn (float ONNX + AIMET "
                  "encodings). With --finetune-steps the subnet is first trained alone for that many steps from "
                  "the supernet's weights (the checkpoint is not changed).",
        "demo": "Float pretraining, supernet training, the uniform accuracy table, search with a Pareto plot and "
                "export of the chosen subnets to every target, with a Markdown report in OUT. With tensorrt among "
                "--targets the supernet is calibrated with signed activations, so its TensorRT export is exact.",
    }[cmd]


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


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
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

