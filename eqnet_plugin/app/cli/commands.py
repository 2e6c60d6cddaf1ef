"""The `eqnet` subcommands: each maps its parsed options onto the pipeline (`eqnet_plugin.app.pipeline`) and prints
its tables. Bad input raises `UsageError` (or the pipeline's ValueError / OSError), which `main` prints as one
line."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ...quant.space import ElasticSpace
from ...search import CQAP, CostModel
from ...train import CheckpointError, evaluate, load_checkpoint, read_checkpoint
from .. import pipeline as P
from ..demo import BUDGETS, run_demo
from .parser import UsageError

__all__ = ["COMMANDS", "cmd_train", "cmd_eval", "cmd_search", "cmd_export", "cmd_demo"]


# --- options -> run spec, device, output folders --------------------------------------------------------------
def _space(args, base=None):
    """The ElasticSpace of --weight-bits / --act-bits, on top of `base` (default: the default space)."""
    kw = {}
    if getattr(args, "weight_bits", None):
        kw["weight_bits"] = tuple(args.weight_bits)
    if getattr(args, "act_bits", None):
        kw["act_bits"] = tuple(args.act_bits)
    return replace(base if base is not None else ElasticSpace(), **kw)


def _spec(args) -> P.RunSpec:
    return P.RunSpec(model=args.model, data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                     seed=args.seed, space=_space(args))


def _device(args) -> str:
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


def _load(args) -> P.Experiment:
    """The experiment of --checkpoint; model/data flags given explicitly override the stored run spec (not
    --image-size: the supernet was trained at one size)."""
    path = args.checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; write one with `eqnet train` or "
                                "`eqnet demo`")
    ckpt = read_checkpoint(path, "cpu")
    extra = ckpt.get("extra") or {}
    info: dict = {}
    if "run" in extra:
        spec, info = P.RunSpec.from_dict(extra["run"]), dict(extra.get("info") or {})
        size = spec.resolved_image_size()
        if args.image_size is not None and args.image_size != size:
            raise UsageError(f"--image-size {args.image_size}: {path} was trained on {size}x{size} images and "
                             f"evaluates correctly only at that size; omit --image-size (or give {size})")
    elif args.model is None or args.data is None:
        raise UsageError(f"{path} holds no run description (written by save_checkpoint directly, not by `eqnet "
                         "train`); pass --model and --data (and --image-size, --batch-size, --seed as it was "
                         "trained) to rebuild its model")
    else:
        spec = P.RunSpec(model=args.model, data=args.data, space=ElasticSpace.from_dict(ckpt["space"]))
    train = extra.get("train") or {}
    if train.get("schedule_steps") and int(ckpt.get("step", 0)) < int(train["schedule_steps"]):
        print(f"note: {path} is from an unfinished run (step {ckpt['step']} of {train['schedule_steps']}); "
              "`eqnet train` with the same options resumes it")
    del ckpt
    over = {k: getattr(args, k) for k in ("model", "data", "image_size", "batch_size", "seed")
            if getattr(args, k) is not None}
    if args.weight_bits or args.act_bits:
        over["space"] = _space(args, spec.space)
    exp = P.load_experiment(path, spec=replace(spec, **over), device=_device(args))
    exp.info.update(info)
    return exp


def _print_table(rows, headers, title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    print(P.format_table(rows, headers))


# --- train ------------------------------------------------------------------------------------------------------
_FLAGS = {"model": "--model", "data": "--data", "image_size": "--image-size", "batch_size": "--batch-size",
          "seed": "--seed", "weight_bits": "--weight-bits", "act_bits": "--act-bits", "lr": "--lr",
          "epochs": "--epochs", "max_steps": "--max-steps"}
_START_OVER = "a new --out, or --no-resume to overwrite it"


def _setting(name: str, value) -> str:
    """A run setting as the command line spells it (for resume errors)."""
    if name == "max_steps" and value is None:
        return "no --max-steps"
    if name not in _FLAGS:
        return f"{name} {value}"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return f"{_FLAGS[name]} {value:g}" if isinstance(value, float) else f"{_FLAGS[name]} {value}"


def _check_resume(args, spec: P.RunSpec, ckpt: Path) -> None:
    """Refuse to resume `ckpt` with settings other than its run's (`resume_conflicts`), or activation grids other
    than --signed-activations asks for; before any work."""
    try:
        stored = read_checkpoint(ckpt, "cpu")
        conflicts, finished = P.resume_conflicts(stored, spec, epochs=args.epochs, lr=args.lr,
                                                 max_steps=args.max_steps)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. To start over instead of resuming it: --no-resume (overwrites it) or a new "
                              "--out") from None
    info = (stored.get("extra") or {}).get("info") or {}
    if args.signed_activations and info.get("signed_activations") is False:
        raise UsageError(f"{ckpt} was calibrated without --signed-activations and resuming keeps its activation "
                         "grids; use a new --out or --no-resume to start over with them")
    if conflicts:
        raise UsageError(P.resume_error(ckpt, conflicts, finished, _setting, _START_OVER))


def cmd_train(args) -> int:
    _check_out(args.out)
    spec = _spec(args)
    ckpt = Path(args.out) / "supernet.pt"
    resuming = args.resume and ckpt.exists()
    if resuming:
        _check_resume(args, spec, ckpt)                                 # before any work
    t0 = time.perf_counter()
    settings = P.BuildSettings(float_epochs=0 if resuming else args.float_epochs, calibrate=not resuming,
                               calib_batches=args.calib_batches, signed_activations=args.signed_activations)
    exp = P.build_experiment(spec, settings, device=_device(args), progress=args.progress)
    if resuming:
        print(f"resuming from {ckpt}")
        if args.signed_activations:         # the grids were fixed when the checkpoint's run calibrated
            load_checkpoint(ckpt, exp.supernet, restore_rng=False)
            if not P.activations_signed(exp.supernet):
                raise UsageError(f"{ckpt} was calibrated without --signed-activations and resuming keeps its "
                                 "activation grids; use a new --out or --no-resume to start over with them")
    hist = P.train_experiment(exp, args.epochs, ckpt, lr=args.lr, max_steps=args.max_steps, resume=args.resume,
                              progress=args.progress)
    if resuming:
        exp.info.update(P.read_run_spec(ckpt)[1])
    sn = exp.supernet
    rows = [["float model", exp.info.get("float_test_accuracy", "-")]]
    for w, a in ((8, 8), (4, 4), (min(sn.space.weight_bits), min(sn.space.act_bits))):
        if w in sn.space.weight_bits and a in sn.space.act_bits and f"w{w}a{a}" not in [r[0] for r in rows]:
            rows.append([f"w{w}a{a}", evaluate(sn, P.uniform_config(sn, w, a), exp.test_loader, exp.bn_batches)])
    _print_table(rows, ["model (test split)", "accuracy"],
                 f"trained {spec.model} on {spec.data}: {hist['step']} steps, {time.perf_counter() - t0:.1f} s; "
                 f"checkpoint {ckpt}" + ("; signed activations (TensorRT-exact)" if P.activations_signed(sn) else ""))
    return 0


# --- eval ---------------------------------------------------------------------------------------------------------
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
            cfg = P.parse_subnet(s, exp.supernet)
            acc = evaluate(exp.supernet, cfg, loader, exp.bn_batches)
            c = cm(cfg)
            results[s] = {"accuracy": acc, "costs": c.to_dict()}
            rows.append([s, acc, f"{c.bitops:.4g}", f"{c.size_bytes:.0f}", c.avg_weight_bits, c.avg_act_bits])
        _print_table(rows, ["subnet", f"accuracy ({args.split})", "BitOps", "size (B)", "avg W bits", "avg A bits"])
    else:
        table = P.uniform_table(exp, bits, args.schemes, split=args.split, progress=args.progress)
        results = table
        _print_table([[k, *v.values()] for k, v in table.items()], ["bits", *map(str, args.schemes)],
                     f"accuracy of uniform subnets ({args.split} split)")
    if args.out:
        P.write_json(args.out, results)
    return 0


# --- search -------------------------------------------------------------------------------------------------------
def _search_settings(args, seed: int) -> P.SearchSettings:
    cons = {k: getattr(args, k) for k in ("max_bitops", "max_size_bytes", "max_avg_weight_bits", "max_avg_act_bits")
            if getattr(args, k) is not None}
    frac = args.bitops_fraction
    if not cons and frac is None:
        frac = P.default_bitops_fraction(args.profile)
    return P.SearchSettings(profile=args.profile, constraints=cons, bitops_fraction=frac, records=args.records,
                            population=args.population, generations=args.generations, cqap_epochs=args.cqap_epochs,
                            seed=seed, measure_top_k=args.measure_top, refine_rounds=args.refine_rounds)


def cmd_search(args) -> int:
    _search_settings(args, 0)                   # bad settings fail before the checkpoint is loaded
    _check_out(args.out)
    predictor = CQAP.load(args.predictor) if args.predictor else None
    exp = _load(args)
    o = P.search_experiment(exp, args.out, _search_settings(args, exp.spec.seed), predictor=predictor,
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


# --- export -------------------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    _check_out(args.out)
    exp = _load(args)
    targets = P.target_names() if args.target == "all" else (args.target,)
    plan = P.ExportPlan(targets, args.out, subnet=P.parse_subnet(args.subnet, exp.supernet) if args.subnet else None,
                        subnet_label=args.subnet or "subnet", options={"encoding_version": args.encoding_version},
                        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, check=args.check)
    try:
        out = P.export_targets(exp, plan, progress=args.progress)
    except P.ExportRefused as e:
        several = len(targets) > 1
        raise UsageError(("nothing written: " if several else "") + "; ".join(e.refusals) +
                         ("; choose a subnet every target runs, or export the others one --target at a time"
                          if several else "")) from None
    if out.finetuned:
        _print_table([list(r) for r in out.finetuned],
                     ["fine-tuned subnet", "test accuracy before", f"after {args.finetune_steps} steps"])
    rows = [[t, kind, path, size, "-" if agree is None else f"ORT top-1 agreement {agree:.4f}"]
            for t, kind, path, size, agree in out.files]
    _print_table(rows, ["target", "file", "path", "bytes", "check"])
    from eqnet_plugin.adapters.report import REPORT_HEADERS, report_table
    _print_table(report_table(out.reports), REPORT_HEADERS, "export report (report.json per target)")
    return 0


# --- demo ---------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
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
