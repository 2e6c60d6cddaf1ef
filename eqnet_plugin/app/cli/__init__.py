"""The `eqnet` command line: train | eval | search | export | demo.

    eqnet demo                                                   # the whole flow on the embedded digits data
    eqnet train --model resnet18 --data path/to/imagefolder --epochs 20 --out runs/r18
    eqnet eval --checkpoint runs/r18/supernet.pt
    eqnet search --checkpoint runs/r18/supernet.pt --profile qnn --bitops-fraction 0.7 --out runs/r18/qnn
    eqnet export --checkpoint runs/r18/supernet.pt --subnet runs/r18/qnn/best.json --target qnn

Every option can also come from a YAML or JSON file (``--config file``; keys are option names, ``epochs`` or
``float-epochs``); options given on the command line win. Bad input ends with exit status 2 and one line naming
the problem (``--debug`` shows the traceback).

`parser` builds the argparse parser (and reads option files), `commands` maps each subcommand onto the pipeline
(`eqnet_plugin.app.pipeline`); `main` runs one and turns bad input into one line.
"""
from __future__ import annotations

import logging
import sys
import warnings

import torch

from ...frontends.fx import PlacementError, TraceError
from .commands import COMMANDS
from .parser import EXIT_USAGE, UsageError, build_parser, expand_config

__all__ = ["main", "build_parser", "expand_config", "UsageError"]

_USER_ERRORS = (ValueError, OSError, ImportError, TraceError, PlacementError)


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
            args = parser.parse_args(expand_config(parser, argv))
        except SystemExit as e:            # --help, --version, or a usage error already printed as one line
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        if args.threads is not None:
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
    except _USER_ERRORS as e:
        if debug:
            raise
        msg = _one_line(str(e)) or type(e).__name__
        print(f"{prog}: error: {msg} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
