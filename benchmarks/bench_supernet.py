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
      without GPG (plain cross-entropy for every subnet), and with torch.ao's BatchNorm handling (its
      running-variance fold, running statistics from all three subnets), the last three evaluated on the low-bit
      and per-channel configs.
Every subnet is evaluated on the test split after BN recalibration on fixed training batches. Wall times count
training only (the float model and the calibration are shared by all runs).

Commands (budget; wall time on 2 cores):
    python benchmarks/bench_supernet.py --budget fashion --jobs 2 --save-supernets
                                                                       # 2 models x 2 seeds, 1500 steps; 66 min;
                                                                       # keeps the supernets bench_search needs
    python benchmarks/bench_supernet.py --budget fashion-x2 --jobs 2   # TinyMobileNetV2 at 2x width, 4 configs,
                                                                       # 2 seeds; 47 min (12 of them float starts)
    python benchmarks/bench_supernet.py --budget full --jobs 2         # digits, 2 models x 3 seeds; 14 min
    python benchmarks/bench_supernet.py --budget torchvision           # torchvision ResNet-18 and MobileNetV2 at
                                                                       # full width, 2 seeds; hours: resumes unit by
                                                                       # unit (benchmarks/_supernet_torchvision.py)
    python benchmarks/bench_supernet.py --budget fashion-small         # smoke run, writes nothing; ~2 min (est.)
    python benchmarks/bench_supernet.py --report-only                  # rebuild the section; seconds

A recorded budget's run replaces its entry (keyed by budget) in benchmarks/results/bench_supernet.json, and the
`bench_supernet` section of BENCHMARKS.md is rebuilt from every entry. `--save-supernets` keeps the trained
supernets in runs/bench_supernet/ for bench_search.
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
from _report import headline, load_results, machine, save_run, update_section  # noqa: E402
import _supernet_torchvision  # noqa: E402

from eqnet_plugin import Supernet, elastic_backend_config, elastic_qconfig_mapping  # noqa: E402
from eqnet_plugin.quant.bn_fold import use_running_bn_fold  # noqa: E402
from eqnet_plugin.app.data import digits_loaders, fashion_mnist_splits, make_loaders  # noqa: E402
from eqnet_plugin.train.losses import WDRLoss  # noqa: E402
from eqnet_plugin.app.models import build_model  # noqa: E402
from eqnet_plugin.train.optim import SubnetOptimizer  # noqa: E402
from eqnet_plugin.train import (QATConfig, SandwichConfig, TrainConfig, accuracy, bn_batches_from,  # noqa: E402
                                cosine_scheduler, evaluate, evaluate_configs, lsq_qat, train_float, train_supernet)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class LatentWDR(WDRLoss):
    """Test hook of the "old_bn" ablation: WDR on each layer's raw conv weight (before the BatchNorm fold) instead of
    the tensor its weight quantizer sees; it overrides `WDRLoss.layer_weights`, the tensors the penalty reads."""

    def layer_weights(self, supernet) -> list[torch.Tensor]:
        layers = list(supernet.layers)[1 if self.exclude_first else 0:]
        return [supernet.model.get_submodule(lay.name).weight for lay in layers]


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
    # capacity check: TinyMobileNetV2 with twice the channels, 4 configs, no ablations
    "fashion-x2": dict(data="fashion-mnist", models=("tiny_mobilenet_v2_x2",), seeds=(0, 1), float_epochs=8, epochs=2,
                       max_steps=1500, float_max_steps=None, stem_stride=2, bn_batches=16, limit_test=None,
                       configs=("W8A8 sym/channel", "W4A4 sym/channel", "W3A3 sym/channel", "W2A2 sym/tensor"),
                       no_ablations=True),
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
    model = build_model(model_name, stem_stride=cfg.get("stem_stride", 1))
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

    def supernet_run(key: str, recipe: SandwichConfig, old_bn: bool = False, shared_adam: bool = False
                     ) -> tuple[Supernet, float]:
        sn = _copy(base)
        if old_bn:                     # torch.ao's BN handling: running-variance fold, BN from all subnets
            use_running_bn_fold(sn.model)          # the ablation hook (eqnet_plugin.quant.bn_fold)
        # the recipe: one Adam state per sandwich subnet; shared_adam: one Adam over the summed gradient (the
        # paper's and the official trainer's optimizer), as an ablation
        opt = (torch.optim.Adam(sn.model.parameters(), lr=lr) if shared_adam
               else SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=lr))
        fresh_loader_state()
        cpu = time.process_time()
        h = train_supernet(sn, train, opt, TrainConfig(epochs=cfg["epochs"], recipe=recipe, max_steps=steps),
                           scheduler=cosine_scheduler(opt, steps), generator=torch.Generator().manual_seed(seed))
        cpu_seconds[key] = time.process_time() - cpu
        return sn, h["seconds"]

    sn, out["supernet_seconds"] = supernet_run("supernet", SandwichConfig())
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
        h = lsq_qat(d, c, train, opt, QATConfig(epochs=cfg["epochs"], recipe=SandwichConfig(wdr=None), max_steps=steps),
                    scheduler=cosine_scheduler(opt, steps))
        cpu_seconds[name] = time.process_time() - cpu
        out["dedicated_seconds"][name] = h["seconds"]
        out["dedicated"][name] = evaluate(d, c, test, bn)
    ablations = (("shared_adam", dict(recipe=SandwichConfig(), shared_adam=True)),
                 ("no_wdr", dict(recipe=SandwichConfig(wdr=None))),
                 ("no_gpg", dict(recipe=SandwichConfig(lam=0.0))),              # label loss alone for R and L
                 ("old_bn", dict(recipe=SandwichConfig(wdr=LatentWDR()), old_bn=True)))
    for key, kw in () if cfg.get("no_ablations") else ablations:
        sn, out[f"{key}_seconds"] = supernet_run(key, **kw)
        out[key] = evaluate_configs(sn, configs if key == "shared_adam" else low, test, bn)
    return out


# The budgets recorded in BENCHMARKS.md, in the section's order: title, and whether only the summary table is shown
RECORDED = {"fashion": ("Fashion-MNIST", True),
            "fashion-x2": ("Fashion-MNIST, twice the width", True),
            "full": ("digits, the quick check", True)}
HEADLINE_BUDGETS = ("fashion", "fashion-x2")                     # the budgets in BENCHMARKS.md's summary table
TARGETS = (("W4A4/W8A8", 0.3), ("W3A3", 1.0), ("W2A2", 2.0))     # worst gap (points) per bit-width group


def _run_job(job: tuple) -> dict:
    warnings.filterwarnings("ignore")
    return run_split(*job)


def _ms(values: list[float]) -> str:
    """mean +- sample std in percent points."""
    m = 100 * statistics.fmean(values)
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def _model_summary(rs: list[dict]) -> dict:
    """Mean gap per config, worst gap per bit-width group, wall and CPU-time ratio of one model's runs."""
    names = list(rs[0]["supernet"])
    gaps = {n: statistics.fmean(100 * (r["dedicated"][n] - r["supernet"][n]) for r in rs) for n in names}
    worst = {}
    for group, _ in TARGETS:
        vals = [v for k, v in gaps.items() if k.split()[0] in group.split("/")]
        worst[group] = max(vals) if vals else float("nan")
    t_a = statistics.fmean(r["supernet_seconds"] for r in rs)
    t_b = statistics.fmean(sum(r["dedicated_seconds"].values()) for r in rs)
    cpu = (statistics.fmean(r["cpu_seconds"]["supernet"] for r in rs)
           / statistics.fmean(sum(r["cpu_seconds"][n] for n in r["dedicated_seconds"]) for r in rs))
    return {"gaps": gaps, "worst": worst, "t_a": t_a, "t_b": t_b, "cpu": cpu, "n_ded": len(rs[0]["dedicated_seconds"])}


def _models(runs: list[dict]) -> list[str]:
    return sorted({r["model"] for r in runs}, key=lambda m: m != "tiny_resnet")


def summarize(runs: list[dict], budget: str, recipe: dict, machine_line: str, compact: bool = False) -> str:
    """The tables of one budget's runs (`compact`: the worst-gap and time table only)."""
    seeds = sorted({r["seed"] for r in runs})
    names = list(runs[0]["supernet"])
    cfg = BUDGETS[budget]
    if cfg["data"] == "fashion-mnist":
        r0 = runs[0]
        data = (f"Fashion-MNIST at {recipe['image_size']}x{recipe['image_size']}: {r0['train_images']} training "
                f"images, test = the official {r0['test_images']} t10k images (one image = "
                f"{100 / r0['test_images']:.2f} points); stride-{cfg['stem_stride']} stem; BN recalibrated on "
                f"{cfg['bn_batches']} fixed training batches per subnet")
    else:
        data = (f"stratified train/val/test of the 1797 digits at {recipe['image_size']}x{recipe['image_size']}; "
                "test = 360 images, so one image = 0.28 points")
    lines = [f"Machine: {machine_line}. Split seeds {seeds} ({data}); float pretraining {recipe['float_epochs']} "
             f"epochs (Adam lr {recipe['float_lr']}, cosine); QAT {runs[0]['steps']} steps (batch "
             f"{recipe['batch_size']}, Adam lr {recipe['lr']}, cosine) for the supernet (one Adam state per sandwich "
             "subnet, `SubnetOptimizer`) and for each dedicated run. Accuracies in %, mean ± std over the split "
             "seeds; gap = dedicated - supernet (positive: the supernet is worse).", ""]
    summary = []
    for m in _models(runs):
        rs = [r for r in runs if r["model"] == m]
        s = _model_summary(rs)
        summary.append((m, s))
        if compact:
            continue
        shared = all(set(r.get("shared_adam", {})) == set(names) for r in rs)
        lines += [f"**{m}** (float: {_ms([r['float_acc'] for r in rs])})", "",
                  "| config | supernet subnet | dedicated LSQ QAT | gap (points) |"
                  + (" supernet, one shared Adam (ablation) | its gap |" if shared else ""),
                  "|---|---|---|---|" + ("---|---|" if shared else "")]
        for n in names:
            extra = ""
            if shared:
                g2 = statistics.fmean(100 * (r["dedicated"][n] - r["shared_adam"][n]) for r in rs)
                extra = f" {_ms([r['shared_adam'][n] for r in rs])} | {g2:+.2f} |"
            lines.append(f"| {n} | {_ms([r['supernet'][n] for r in rs])} | {_ms([r['dedicated'][n] for r in rs])} "
                         f"| {s['gaps'][n]:+.2f} |" + extra)
        lines.append("")
        if "no_wdr" not in rs[0]:
            continue
        cols = list(rs[0]["no_wdr"])
        lines += ["| ablation (supernet subnets) | " + " | ".join(cols) + " | mean |",
                  "|---|" + "---|" * (len(cols) + 1)]
        rows = [("EQ-Net (GPG + WDR, fixed BN fold)", "supernet")]
        if shared:
            rows.append(("one shared Adam instead of one per subnet", "shared_adam"))
        rows += [("without WDR", "no_wdr"), ("without GPG (CE per subnet)", "no_gpg")]
        if "old_bn" in rs[0]:
            rows.append(("torch.ao BN handling (running-variance fold)", "old_bn"))
        rows.append(("dedicated LSQ QAT (reference)", "dedicated"))
        for label, key in rows:
            accs = [statistics.fmean(r[key][k] for r in rs) for k in cols]
            lines.append(f"| {label} | " + " | ".join(f"{100 * a:.2f}" for a in accs)
                         + f" | {100 * statistics.fmean(accs):.2f} |")
        lines.append("")
    n_ded = summary[0][1]["n_ded"]
    lines += ["| model | " + " | ".join(f"worst gap {g} (target <= {t})" for g, t in TARGETS)
              + f" | supernet wall time | sum of {n_ded} dedicated runs | ratio"
              + (" (target <= 0.3)" if n_ded == 12 else " (the target counts 12 runs)") + " | CPU-time ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for m, s in summary:
        lines.append(f"| {m} | " + " | ".join(f"{s['worst'][g]:+.2f}" for g, _ in TARGETS)
                     + f" | {s['t_a']:.0f} s | {s['t_b']:.0f} s | {s['t_a'] / s['t_b']:.2f}x | {s['cpu']:.2f}x |")
    return "\n".join(lines)


def _headlines(budget: str, runs: list[dict]) -> list[str]:
    """Summary-table rows: per model, the worst gaps against their targets and the time ratio."""
    out = []
    for m in _models(runs):
        s = _model_summary([r for r in runs if r["model"] == m])
        gaps = " · ".join(f"{s['worst'][g]:+.2f}" + ("" if s["worst"][g] <= t else " (not met)") for g, t in TARGETS)
        ratio = s["t_a"] / s["t_b"]
        time_ = (f"{ratio:.2f}x wall" + (" (not met)" if ratio > 0.3 else "") + f", {s['cpu']:.2f}x CPU"
                 if s["n_ded"] == 12 else f"{ratio:.2f}x of {s['n_ded']} dedicated runs")
        out.append(headline(f"{RECORDED[budget][0]}, {m}: worst gap to dedicated LSQ QAT at W4A4/W8A8 · W3A3 · W2A2 "
                            "(targets 0.3 · 1.0 · 2.0 points); training time vs the dedicated runs "
                            "(target 0.3x of 12)",
                            f"{gaps}; {time_}"))
    return out


def section(results: dict) -> str:
    """The whole `bench_supernet` section from benchmarks/results/bench_supernet.json (every recorded budget)."""
    protocol = __doc__.split("\n\n")[1].strip()
    commands = __doc__.split("\n\n")[2].strip()
    out = ["## bench_supernet", "", "One EQ-Net supernet vs dedicated LSQ QAT per reference config.", "", protocol, "",
           "```", commands, "```", ""]
    for budget in HEADLINE_BUDGETS:
        if budget in results:
            out += _headlines(budget, results[budget]["runs"])
    tv_heads, tv_body = (_supernet_torchvision.section(results[_supernet_torchvision.KEY])
                         if _supernet_torchvision.KEY in results else ([], []))
    out += tv_heads
    out.append("")
    out += tv_body
    for budget, (title, compact) in RECORDED.items():
        if budget not in results:
            continue
        saved = results[budget]
        out += [f"### {title} (`--budget {budget}`)", "",
                summarize(saved["runs"], budget, saved["recipe"], saved["machine"], compact), "", saved["footer"], ""]
    return "\n".join(out)


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
    p.add_argument("--budget", choices=sorted(BUDGETS) + [_supernet_torchvision.KEY], default="small")
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
    p.add_argument("--device", default="cpu", help="torchvision budget: where to train (cpu, cuda)")
    p.add_argument("--smoke", action="store_true", help="torchvision budget: a few steps of every unit, nothing "
                                                         "recorded")
    p.add_argument("--jobs", type=int, default=1, help="run (model, seed) pairs in this many processes")
    p.add_argument("--resume", action="store_true", help="reuse finished runs saved in runs/ by an interrupted run")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the BENCHMARKS.md section from benchmarks/results/bench_supernet.json")
    args = p.parse_args(argv)
    if args.report_only:
        text = section(load_results("bench_supernet"))
        print(text)
        update_section("bench_supernet", text)
        return
    if args.budget == _supernet_torchvision.KEY:
        if args.threads:
            torch.set_num_threads(args.threads)
        _supernet_torchvision.Bench(
            args.device, lambda m: print(m, flush=True), smoke=args.smoke,
            on_save=lambda: update_section("bench_supernet", section(load_results("bench_supernet")))).run(
            tuple(args.models or _supernet_torchvision.MODELS),
            tuple(args.seeds if args.seeds is not None else _supernet_torchvision.SEEDS))
        return
    if args.image_size is None:
        args.image_size = 28 if BUDGETS[args.budget]["data"] == "fashion-mnist" else 16
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
    if args.eval_split == "val":      # tuning results: kept in runs/, never recorded as a benchmark
        PARTIAL_DIR.mkdir(parents=True, exist_ok=True)
        (PARTIAL_DIR / f"bench_supernet_tune_{args.lr}_{cfg['float_epochs']}_{cfg['max_steps']}.json").write_text(
            json.dumps({"recipe": recipe, "runs": runs}, indent=1))
    print(summarize(runs, args.budget, recipe, machine()) + "\n\n" + footer)
    if args.budget in RECORDED and args.eval_split == "test" and not args.configs and not args.models \
            and args.seeds is None:
        save_run("bench_supernet", args.budget, {"budget": args.budget, "recipe": recipe, "machine": machine(),
                                                 "footer": footer, "runs": runs})
        update_section("bench_supernet", section(load_results("bench_supernet")))


if __name__ == "__main__":
    main()
