"""One EQ-Net supernet vs a dedicated LSQ QAT run per reference config, on Fashion-MNIST (or the embedded digits).

For every model (TinyResNet, TinyMobileNetV2) and every split seed:
  0. a float model is trained (Adam, cosine) and calibrated once (`Supernet.calibrate`, all cells);
  (a) ONE supernet training from that start: sandwich rule (H / R / L), GPG (lam 0.5, T 1), WDR (1.0 / 0.015),
      one Adam state per subnet (`SubnetOptimizer`: each subnet's gradient takes its own Adam step, as each
      dedicated run's does);
  (b) a dedicated LSQ QAT run per reference config, W2A2 / W3A3 / W4A4 / W8A8 x {sym per-tensor, asym per-tensor,
      sym per-channel}, from the same calibrated start, with the same per-step recipe (Adam, lr, cosine schedule,
      batches in the same order, same number of steps), one forward per step, cross-entropy;
  (c) ablations of (a): one Adam over the summed gradient (the paper's optimizer; every config), without WDR,
      without GPG (plain cross-entropy for every subnet), and with the first release's BatchNorm handling
      (torch.ao's running-variance fold, running statistics from all three subnets), the last three evaluated on
      the low-bit and per-channel configs.
Every subnet is evaluated on the test split after BN recalibration on fixed training batches. Wall times count
training only (the float model and the calibration are shared by all runs).

    python benchmarks/bench_supernet.py --budget fashion-small  # smoke run on Fashion-MNIST, writes nothing
    python benchmarks/bench_supernet.py --budget fashion --jobs 2   # the recorded configuration (BENCHMARKS.md)
    python benchmarks/bench_supernet.py --budget full           # the digits quick mode (BENCHMARKS.md)
    python benchmarks/bench_supernet.py --budget fashion-x2 --jobs 2   # capacity check: TinyMobileNetV2 x2 width
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, update_section  # noqa: E402

from eqnet_plugin import Supernet, elastic_backend_config, elastic_qconfig_mapping  # noqa: E402
from eqnet_plugin.quant.bn_fold import use_running_bn_fold  # noqa: E402
from eqnet_plugin.app.data import digits_loaders, fashion_mnist_splits, make_loaders  # noqa: E402
from eqnet_plugin.train.losses import WDRLoss  # noqa: E402
from eqnet_plugin.app.models import TinyMobileNetV2, TinyResNet, build_model  # noqa: E402
from eqnet_plugin.train.optim import SubnetOptimizer  # noqa: E402
from eqnet_plugin.train import (accuracy, bn_batches_from, cosine_scheduler, evaluate, evaluate_configs,  # noqa: E402
                                lsq_qat, train_float, train_supernet)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTIAL_DIR = Path(__file__).resolve().parent.parent / "runs"                                 # git-ignored
SCHEMES = {"sym/tensor": (True, False), "asym/tensor": (False, False), "sym/channel": (True, True)}
BITS = (2, 3, 4, 8)
LR = 1e-3                   # QAT Adam lr (paper: 1e-3, cosine), supernet and dedicated runs alike
FLOAT_LR = 3e-3             # float pretraining lr
BATCH_SIZE = 64
BUDGETS = {
    # name: data, models, split seeds, float epochs, QAT epochs, max QAT steps (None = all), and for Fashion-MNIST
    # the stem stride of the compact models and the BN recalibration batches
    "small": dict(data="digits", models=("tiny_resnet", "tiny_mobilenet_v2"), seeds=(0,), float_epochs=1, epochs=1,
                  max_steps=3),
    "full": dict(data="digits", models=("tiny_resnet", "tiny_mobilenet_v2"), seeds=(0, 1, 2), float_epochs=30,
                 epochs=8, max_steps=None),
    "fashion-small": dict(data="fashion-mnist", models=("tiny_resnet", "tiny_mobilenet_v2"), seeds=(0,),
                          float_epochs=1, epochs=1, max_steps=3, float_max_steps=5, stem_stride=2, bn_batches=2,
                          limit_test=500),
    "fashion": dict(data="fashion-mnist", models=("tiny_resnet", "tiny_mobilenet_v2"), seeds=(0, 1),
                    float_epochs=8, epochs=2, max_steps=1500, float_max_steps=None, stem_stride=2, bn_batches=16,
                    limit_test=None),
    # capacity check: TinyMobileNetV2 with twice the channels, the 4 configs of tune_supernet, no ablations
    "fashion-x2": dict(data="fashion-mnist", models=("tiny_mobilenet_v2_x2",), seeds=(0, 1), float_epochs=8, epochs=2,
                       max_steps=1500, float_max_steps=None, stem_stride=2, bn_batches=16, limit_test=None,
                       configs=("W8A8 sym/channel", "W4A4 sym/channel", "W3A3 sym/channel", "W2A2 sym/tensor"),
                       no_ablations=True, section="bench_supernet_fashion_x2",
                       title="Fashion-MNIST, TinyMobileNetV2 at twice the width"),
}
ABLATION_CONFIGS = ("W2A2 sym/tensor", "W2A2 asym/tensor", "W2A2 sym/channel", "W3A3 sym/tensor", "W3A3 sym/channel",
                    "W4A4 sym/channel", "W8A8 sym/channel")


def reference_configs(sn: Supernet) -> dict[str, object]:
    return {f"W{b}A{b} {s}": sn.uniform(b, b, symmetric=sym, per_channel=pc)
            for b in BITS for s, (sym, pc) in SCHEMES.items()}


def _prepare(model, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bc = elastic_backend_config() if "mobilenet" in type(model).__name__.lower() else None
        from torch.ao.quantization.quantize_fx import prepare_qat_fx
        gm = prepare_qat_fx(copy.deepcopy(model), elastic_qconfig_mapping(), example, backend_config=bc)
    return Supernet(gm)


def build_bench_model(name: str, stem_stride: int = 1) -> torch.nn.Module:
    """A compact model by name; ``<name>_x<K>`` (e.g. ``tiny_mobilenet_v2_x2``) is the same model with K times the
    channels in every layer, for the capacity check of BENCHMARKS.md (does a wider model close the gap?)."""
    base, _, mult = name.rpartition("_x")
    if not (base and mult.isdigit()):
        return build_model(name, stem_stride=stem_stride)
    k = int(mult)
    if base == "tiny_resnet":
        return TinyResNet(widths=tuple(k * w for w in TinyResNet.WIDTHS), stem_stride=stem_stride)
    if base == "tiny_mobilenet_v2":
        return TinyMobileNetV2(settings=tuple((k * c, s, e) for c, s, e in TinyMobileNetV2.SETTINGS),
                               stem=k * TinyMobileNetV2.STEM, stem_stride=stem_stride)
    raise ValueError(f"unknown model {name!r}: tiny_resnet or tiny_mobilenet_v2, optionally with _x<K>")


def _copy(sn: Supernet) -> Supernet:
    return Supernet(copy.deepcopy(sn.model), sn.space)


def float_cache_path(model_name: str, seed: int, cfg: dict, float_lr: float, batch_size: int, image_size: int
                     ) -> Path:
    """Where the float start of one (model, seed, float recipe) is cached (git-ignored runs/)."""
    return PARTIAL_DIR / "bench_supernet_float" / (
        f"{cfg['data']}_{model_name}_seed{seed}_e{cfg['float_epochs']}_s{cfg.get('float_max_steps')}_lr{float_lr}"
        f"_b{batch_size}_i{image_size}_stem{cfg.get('stem_stride', 1)}.pt")


def load_or_train_float(model: torch.nn.Module, train, cfg: dict, float_lr: float, cache: Path) -> float:
    """Load the cached float start into `model`, or train it (cfg's float recipe) and cache it. The float start
    depends only on its own recipe, so variants reuse it. Returns its training time in seconds."""
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return saved["seconds"]
    t = time.perf_counter()
    train_float(model, train, cfg["float_epochs"], lr=float_lr, max_steps=cfg.get("float_max_steps"))
    seconds = time.perf_counter() - t
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "seconds": seconds}, cache.with_suffix(".tmp"))
    os.replace(cache.with_suffix(".tmp"), cache)
    return seconds


def run_split(model_name: str, seed: int, cfg: dict, lr: float, batch_size: int, image_size: int,
              float_lr: float = FLOAT_LR) -> dict:
    if cfg["data"] == "fashion-mnist":
        splits = fashion_mnist_splits(image_size=image_size, seed=seed, val_size=10000,
                                      limit_test=cfg.get("limit_test"))
        train, val, test = make_loaders(splits, batch_size, seed=seed, eval_batch_size=1000)
    else:
        train, val, test = digits_loaders(batch_size, image_size, seed=seed, split_seed=seed)
    steps = cfg["epochs"] * len(train) if cfg["max_steps"] is None else min(cfg["max_steps"],
                                                                             cfg["epochs"] * len(train))
    if cfg.get("eval_split", "test") == "val":
        test = val                    # tuning: every accuracy on the validation split, the test split untouched
    torch.manual_seed(seed)
    model = build_bench_model(model_name, stem_stride=cfg.get("stem_stride", 1))
    cache = float_cache_path(model_name, seed, cfg, float_lr, batch_size, image_size)
    float_seconds = load_or_train_float(model, train, cfg, float_lr, cache)
    out = {"model": model_name, "seed": seed, "steps": steps, "float_seconds": float_seconds,
           "float_acc": accuracy(model, test), "test_images": len(test.dataset), "train_images": len(train.dataset),
           "eval_split": cfg.get("eval_split", "test")}
    bn = bn_batches_from(train.dataset, cfg.get("bn_batches", 8), batch_size, seed=seed)
    base = _prepare(model, (bn[0][0],))
    t = time.perf_counter()
    base.calibrate(bn)
    out["calibration_seconds"] = time.perf_counter() - t
    configs = reference_configs(base)
    if cfg.get("configs"):
        configs = {k: v for k, v in configs.items() if k in cfg["configs"]}
    low = {k: v for k, v in configs.items() if k in ABLATION_CONFIGS}

    def fresh_loader_state():
        train.generator.manual_seed(seed)            # every run sees the same batches in the same order

    # CPU seconds of this process next to the wall times (one thread per process): another job competing for the
    # cores inflates wall time only; a slower host (throttling, shared caches) inflates both
    cpu_seconds: dict[str, float] = {}
    out["cpu_seconds"] = cpu_seconds

    def supernet_run(key: str, old_bn: bool = False, shared_adam: bool = False, **kw) -> tuple[Supernet, float]:
        if old_bn:                     # the first release: torch.ao's running-variance fold, BN from all subnets
            gm = copy.deepcopy(base.model)
            use_running_bn_fold(gm)
            sn = Supernet(gm, base.space, bn_fold="running")
        else:
            sn = _copy(base)
        # the recipe: one Adam state per sandwich subnet; shared_adam: one Adam over the summed gradient (the
        # paper's and the official trainer's optimizer), as an ablation
        opt = (torch.optim.Adam(sn.model.parameters(), lr=lr) if shared_adam
               else SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=lr))
        fresh_loader_state()
        cpu = time.process_time()
        h = train_supernet(sn, train, opt, cfg["epochs"], scheduler=cosine_scheduler(opt, steps),
                           generator=torch.Generator().manual_seed(seed), max_steps=steps,
                           progress=False, **kw)
        cpu_seconds[key] = time.process_time() - cpu
        return sn, h["seconds"]

    sn, out["supernet_seconds"] = supernet_run("supernet", wdr=WDRLoss())
    out["supernet"] = evaluate_configs(sn, configs, test, bn)
    if cfg.get("save_dir"):           # the trained supernet, for bench_search (git-ignored runs/ folder)
        dest = Path(cfg["save_dir"]) / f"{model_name}_seed{seed}.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": sn.model.state_dict(), "bn_batches": cfg.get("bn_batches", 8),
                    "batch_size": batch_size, "image_size": image_size, "stem_stride": cfg.get("stem_stride", 1),
                    "test_images": len(test.dataset), "steps": steps, "float_epochs": cfg["float_epochs"],
                    "optimizer": "subnet_adam",
                    "supernet_test": out["supernet"] if cfg.get("eval_split", "test") == "test" else None},
                   dest.with_suffix(".tmp"))
        os.replace(dest.with_suffix(".tmp"), dest)
    if cfg.get("supernet_only"):      # for bench_search: the saved supernet is all that was asked for
        return out
    out["dedicated"], out["dedicated_seconds"] = {}, {}
    for name, c in configs.items():
        d = _copy(base)
        opt = torch.optim.Adam(d.model.parameters(), lr=lr)
        fresh_loader_state()
        cpu = time.process_time()
        h = lsq_qat(d, c, train, opt, cfg["epochs"],
                    scheduler=cosine_scheduler(opt, steps), max_steps=steps)
        cpu_seconds[name] = time.process_time() - cpu
        out["dedicated_seconds"][name] = h["seconds"]
        out["dedicated"][name] = evaluate(d, c, test, bn)
    ablations = (("shared_adam", dict(wdr=WDRLoss(), shared_adam=True)), ("no_wdr", dict(wdr=None)),
                 ("no_gpg", dict(wdr=WDRLoss(), gpg=False)), ("old_bn", dict(wdr=WDRLoss(on="latent"), old_bn=True)))
    for key, kw in () if cfg.get("no_ablations") else ablations:
        sn, out[f"{key}_seconds"] = supernet_run(key, **kw)
        out[key] = evaluate_configs(sn, configs if key == "shared_adam" else low, test, bn)
    return out


def _run_job(job: tuple) -> dict:
    warnings.filterwarnings("ignore")
    return run_split(*job)


def _ms(values: list[float]) -> str:
    """mean +- sample std in percent points."""
    m = 100 * statistics.fmean(values)
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def summarize(runs: list[dict], budget: str, args, machine_line: str | None = None) -> str:
    models = sorted({r["model"] for r in runs}, key=lambda m: m != "tiny_resnet")
    seeds = sorted({r["seed"] for r in runs})
    names = list(runs[0]["supernet"])
    if BUDGETS[budget]["data"] == "fashion-mnist":
        r0 = runs[0]
        data = (f"Fashion-MNIST at {args.image_size}x{args.image_size}: {r0['train_images']} training images "
                f"(10,000 more held out for validation, chosen by the seed; unused here), test = the official "
                f"{r0['test_images']} t10k images (one image = {100 / r0['test_images']:.2f} points); compact models "
                f"with a stride-{BUDGETS[budget]['stem_stride']} stem; BN recalibrated on "
                f"{BUDGETS[budget]['bn_batches']} fixed training batches per subnet")
    else:
        data = (f"stratified train/val/test of the 1797 digits at {args.image_size}x{args.image_size}; test = 360 "
                "images, so one image = 0.28 points")
    lines = [f"Machine: {machine_line or machine()}. Budget `{budget}`: split seeds {seeds} ({data}), "
             f"float pretraining {runs[0].get('recipe', BUDGETS[budget])['float_epochs']} epochs (Adam lr "
             f"{args.float_lr}, cosine), QAT {runs[0]['steps']} steps (batch {args.batch_size}, Adam lr {args.lr}, "
             "cosine) for the supernet and for each dedicated run"
             + (" (the supernet: one Adam state per sandwich subnet, `SubnetOptimizer`; the dedicated runs have "
                "one subnet, so one Adam). " if runs[0].get("recipe", {}).get("optimizer") == "subnet_adam" else
                " (one Adam over the supernet's summed gradient). ")
             + 
             "Accuracies in %, mean ± std over the split seeds; gap = dedicated - supernet (positive: the "
             "supernet is worse).", ""]
    summary = []
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        shared = all(set(r.get("shared_adam", {})) == set(names) for r in rs)
        lines += [f"**{m}** (float: {_ms([r['float_acc'] for r in rs])})", "",
                  "| config | supernet subnet | dedicated LSQ QAT | gap (points) |"
                  + (" supernet, one shared Adam (ablation) | its gap |" if shared else ""),
                  "|---|---|---|---|" + ("---|---|" if shared else "")]
        gaps = {}
        for n in names:
            g = [100 * (r["dedicated"][n] - r["supernet"][n]) for r in rs]
            gaps[n] = statistics.fmean(g)
            extra = ""
            if shared:
                g2 = statistics.fmean(100 * (r["dedicated"][n] - r["shared_adam"][n]) for r in rs)
                extra = f" {_ms([r['shared_adam'][n] for r in rs])} | {g2:+.2f} |"
            lines.append(f"| {n} | {_ms([r['supernet'][n] for r in rs])} | {_ms([r['dedicated'][n] for r in rs])} "
                         f"| {gaps[n]:+.2f} |" + extra)
        t_a = statistics.fmean(r["supernet_seconds"] for r in rs)
        t_b = statistics.fmean(sum(r["dedicated_seconds"].values()) for r in rs)
        cpu = None                    # runs recorded before CPU time was measured have wall time only
        if all("cpu_seconds" in r for r in rs):
            cpu = (statistics.fmean(r["cpu_seconds"]["supernet"] for r in rs)
                   / statistics.fmean(sum(r["cpu_seconds"][n] for n in r["dedicated_seconds"]) for r in rs))
        summary.append((m, gaps, t_a, t_b, cpu))
        if "no_wdr" not in rs[0]:
            lines.append("")
            continue
        lines += ["", "| ablation (supernet subnets) | " + " | ".join(k for k in rs[0]["no_wdr"]) + " | mean |",
                  "|---|" + "---|" * (len(rs[0]["no_wdr"]) + 1)]
        rows = [("EQ-Net (GPG + WDR, fixed BN fold)", "supernet")]
        if shared:
            rows.append(("one shared Adam instead of one per subnet", "shared_adam"))
        rows += [("without WDR", "no_wdr"),
                ("without GPG (CE per subnet)", "no_gpg")]
        if "old_bn" in rs[0]:
            rows.append(("first-release BN handling (running-variance fold)", "old_bn"))
        rows.append(("dedicated LSQ QAT (reference)", "dedicated"))
        for label, key in rows:
            accs = [statistics.fmean(r[key][k] for r in rs) for k in rs[0]["no_wdr"]]
            lines.append(f"| {label} | " + " | ".join(f"{100 * a:.2f}" for a in accs)
                         + f" | {100 * statistics.fmean(accs):.2f} |")
        lines.append("")
    n_ded = len(runs[0]["dedicated_seconds"])
    lines += ["| model | worst gap W4A4/W8A8 (target <= 0.3) | worst gap W3A3 (target <= 1.0) | worst gap W2A2 "
              f"(target <= 2.0) | supernet wall time | sum of {n_ded} dedicated runs | ratio"
              + (" (target <= 0.3)" if n_ded == 12 else " (the target counts 12 runs)") + " | CPU-time ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for m, gaps, t_a, t_b, cpu in summary:
        worst = {p: max((v for k, v in gaps.items() if k.startswith(p)), default=float("nan"))
                 for p in ("W4", "W8", "W3", "W2")}
        lines.append(f"| {m} | {max(worst['W4'], worst['W8']):+.2f} | {worst['W3']:+.2f} | {worst['W2']:+.2f} | "
                     f"{t_a:.0f} s | {t_b:.0f} s | {t_a / t_b:.2f}x | "
                     + ("-" if cpu is None else f"{cpu:.2f}x") + " |")
    return "\n".join(lines)


def _recipe(cfg: dict, args) -> dict:
    return {"data": cfg["data"], "float_epochs": cfg["float_epochs"], "epochs": cfg["epochs"],
            "max_steps": cfg["max_steps"], "float_max_steps": cfg.get("float_max_steps"),
            "stem_stride": cfg.get("stem_stride", 1),
            "lr": args.lr, "optimizer": "subnet_adam", "float_lr": args.float_lr, "batch_size": args.batch_size,
            "image_size": args.image_size,
            **({"eval_split": "val"} if cfg.get("eval_split") == "val" else {}),
            **({"configs": list(cfg["configs"])} if cfg.get("configs") else {}),
            **({"no_ablations": True} if cfg.get("no_ablations") else {}),
            **({"supernet_only": True} if cfg.get("supernet_only") else {})}


def _section_key(budget: str) -> str:
    """BENCHMARKS.md section (and results file stem) of a budget's recorded run."""
    fashion = BUDGETS[budget]["data"] == "fashion-mnist"
    return BUDGETS[budget].get("section", "bench_supernet_fashion" if fashion else "bench_supernet")


def _results_path(budget: str) -> Path:
    return RESULTS_DIR / f"{_section_key(budget)}.json"


def _partial_path(recipe: dict) -> Path:
    tag = "" if len(recipe) == 10 else "_" + hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return PARTIAL_DIR / f"bench_supernet_{recipe['data']}{tag}_partial.json"


def _load_partial(recipe: dict) -> dict:
    """Finished (model, seed) runs of an interrupted invocation with the same recipe."""
    PARTIAL = _partial_path(recipe)
    if not PARTIAL.exists():
        return {}
    done = json.loads(PARTIAL.read_text())
    return {(r["model"], r["seed"]): r for r in done if r.get("recipe") == recipe}


def _save_partial(runs: list[dict], recipe: dict) -> None:
    PARTIAL = _partial_path(recipe)
    PARTIAL.parent.mkdir(parents=True, exist_ok=True)
    tmp = PARTIAL.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs))
    os.replace(tmp, PARTIAL)


def _print_run(r: dict) -> None:
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--seeds", nargs="*", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the budget's QAT epochs")
    p.add_argument("--steps", type=int, default=None, help="override the budget's QAT steps")
    p.add_argument("--float-epochs", type=int, default=None, help="override the budget's float epochs")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="val: tune on the validation split (results go to runs/, never to BENCHMARKS.md)")
    p.add_argument("--configs", nargs="*", default=None, help="only these reference configs, e.g. 'W4A4 sym/channel'")
    p.add_argument("--no-ablations", action="store_true", help="skip the three ablation supernets")
    p.add_argument("--supernet-only", action="store_true",
                   help="train, evaluate and save (with --save-supernets) the supernets only: no dedicated runs, no "
                        "ablations, nothing recorded")
    p.add_argument("--save-supernets", action="store_true",
                   help="keep each trained supernet in runs/bench_supernet/ (bench_search reads them)")
    p.add_argument("--lr", type=float, default=LR, help="QAT learning rate (paper: Adam 1e-3, cosine)")
    p.add_argument("--float-lr", type=float, default=FLOAT_LR, help="float pretraining learning rate")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--image-size", type=int, default=None, help="default: 16 for digits, 28 for Fashion-MNIST")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1, help="run (model, seed) pairs in this many processes")
    p.add_argument("--resume", action="store_true", help="reuse finished runs saved in runs/ by an interrupted run")
    p.add_argument("--from-results", action="store_true",
                   help="only rebuild the BENCHMARKS.md section from benchmarks/results (no training)")
    p.add_argument("--write", action="store_true", help="record in BENCHMARKS.md (default for --budget full)")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 28 if BUDGETS[args.budget]["data"] == "fashion-mnist" else 16
    RESULTS = _results_path(args.budget)
    if args.from_results:
        saved = json.loads(RESULTS.read_text())
        for k in ("lr", "float_lr", "batch_size", "image_size"):
            setattr(args, k, saved["recipe"][k])
        _report_section(saved["runs"], saved["budget"], args, saved["footer"], True, saved.get("machine"))
        return
    if args.threads or args.jobs > 1:
        torch.set_num_threads(1 if args.jobs > 1 else args.threads)
    cfg = dict(BUDGETS[args.budget])
    cfg["models"] = tuple(args.models or cfg["models"])
    cfg["seeds"] = tuple(args.seeds if args.seeds is not None else cfg["seeds"])
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.steps is not None:
        cfg["max_steps"] = args.steps
    if args.float_epochs is not None:
        cfg["float_epochs"] = args.float_epochs
    cfg.update(eval_split=args.eval_split, configs=args.configs or cfg.get("configs"),
               no_ablations=args.no_ablations or cfg.get("no_ablations", False),
               supernet_only=args.supernet_only,
               save_dir=str(PARTIAL_DIR / "bench_supernet") if args.save_supernets else None)
    recipe = _recipe(cfg, args)
    t0 = time.perf_counter()
    done = _load_partial(recipe) if args.resume else {}
    runs = [done[(m, s)] for m in cfg["models"] for s in cfg["seeds"] if (m, s) in done]
    jobs = [(m, s, cfg, args.lr, args.batch_size, args.image_size, args.float_lr) for m in cfg["models"]
            for s in cfg["seeds"] if (m, s) not in done]
    for r in runs:
        _print_run(r)

    def finished(r: dict) -> None:
        r["recipe"] = recipe
        runs.append(r)
        _save_partial(runs, recipe)
        _print_run(r)

    if args.jobs > 1:
        # independent (model, seed) runs in parallel processes, one thread each; every ratio is measured inside
        # one process, so the runs' timings stay comparable
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            for fut in as_completed([pool.submit(_run_job, job) for job in jobs]):
                finished(fut.result())
    else:
        for job in jobs:
            finished(_run_job(job))
    if args.supernet_only:
        return
    order = {(m, s): i for i, (m, s) in enumerate((m, s) for m in cfg["models"] for s in cfg["seeds"])}
    runs.sort(key=lambda r: order[(r["model"], r["seed"])])
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else float("nan")
    footer = (f"Whole benchmark: {time.perf_counter() - t0:.0f} s wall time"
              + (f" ({args.jobs} processes in parallel, 1 thread each)" if args.jobs > 1 else "")
              + (f", {len(done)} of the runs reused from an interrupted invocation (--resume)" if done else "")
              + f"; machine load average (5 min) at the end: {load:.1f} on {os.cpu_count()} cores.")
    write = (args.write or args.budget in ("full", "fashion", "fashion-x2")) and args.eval_split == "test" \
        and not args.configs
    if args.eval_split == "val":      # tuning results: kept in runs/, never recorded as a benchmark
        PARTIAL_DIR.mkdir(parents=True, exist_ok=True)
        (PARTIAL_DIR / f"bench_supernet_tune_{args.lr}_{cfg['float_epochs']}_{cfg['max_steps']}.json").write_text(
            json.dumps({"recipe": recipe, "runs": runs}, indent=1))
    if write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"budget": args.budget, "recipe": recipe, "machine": machine(),
                                       "footer": footer, "runs": runs}, indent=1))
    _report_section(runs, args.budget, args, footer, write)


def _report_section(runs: list[dict], budget: str, args, footer: str, write: bool,
                    machine_line: str | None = None) -> None:
    text = summarize(runs, budget, args, machine_line) + "\n\n" + footer + "\n"
    print(text)
    if write:
        key = _section_key(budget)
        title = BUDGETS[budget].get("title", "Fashion-MNIST" if BUDGETS[budget]["data"] == "fashion-mnist"
                                    else "digits")
        protocol = __doc__.split("\n\n")[1].strip()
        if BUDGETS[budget].get("configs"):          # the capacity check: a subset of that protocol
            protocol = (f"bench_supernet_fashion's protocol (float start, ONE supernet, a dedicated LSQ QAT run "
                        f"per config from the same calibrated start with the same per-step recipe, test on all "
                        f"10,000 images) for {', '.join(BUDGETS[budget]['models'])} (every layer with twice the "
                        f"channels), on {len(BUDGETS[budget]['configs'])} reference configs only and without "
                        f"ablations.")
        update_section(key, f"## {key}: one supernet vs dedicated QAT ({title})\n\n" + protocol + "\n\n" + text)


if __name__ == "__main__":
    main()
