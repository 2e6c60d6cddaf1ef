"""Why does the supernet trail dedicated QAT on a small SiLU residual net at a short budget? One factor at a time.

The setting (issue 29's outside check): a conv-BN-SiLU net with two residual blocks (`RecipeNet`: stem, two
blocks, global pool, linear), 12,000 Fashion-MNIST training images (a stratified subset of the 50,000-image training
split), batch 128, Adam from lr 1e-3 with cosine decay, 282 steps for the supernet and for each dedicated run, the
README's recipe (`SubnetOptimizer` + `SandwichConfig()`). The dedicated baseline is LSQ QAT of one subnet with
``SandwichConfig(wdr=None)``, from the same calibrated start, batches in the same order. A converged float start per
activation (cached in runs/bench_recipe/). Every accuracy is on the 10,000-image VALIDATION split (the test split is
never read), after BN recalibration on fixed training batches. Factors, each changed alone from that setting:
  budget: 4x the steps; activation: ReLU instead of SiLU; per-step recipe: one shared Adam, no WDR, no GPG
  (lam 0); the narrowest subnet's pull: L's loss at half weight, or L not trained (weight 0); the activation grid
  after SiLU: the gap at asymmetric per-tensor cells (W2A2, W4A4) next to the symmetric ones.

Commands (one thread, as torch.set_num_threads(1); wall time on a loaded 2-core machine in the section):
    python benchmarks/bench_recipe.py                 # every run; resumes run by run; writes the section at the end
    python benchmarks/bench_recipe.py --dry-run --steps 10 --float-epochs 1   # smoke run, writes nothing
    python benchmarks/bench_recipe.py --report-only   # rebuild the section from the results; seconds

Each finished run is one entry of benchmarks/results/bench_recipe.json (keyed by activation, steps and run), so a
stopped run continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import headline, load_results, machine, save_run, update_section  # noqa: E402

from eqnet_plugin import Supernet, elastic_qconfig_mapping  # noqa: E402
from eqnet_plugin.app.data import fashion_mnist_splits, make_loaders  # noqa: E402
from eqnet_plugin.train import (QATConfig, SandwichConfig, TrainConfig, bn_batches_from, cosine_scheduler,  # noqa
                                evaluate, lsq_qat, train_float, train_supernet)
from eqnet_plugin.train.optim import SubnetOptimizer  # noqa: E402

NAME = "bench_recipe"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / NAME
TRAIN_IMAGES, BATCH, LR, SEED = 12000, 128, 1e-3, 0
# (bits, symmetric, per_channel): the outside check's four configs, then the asymmetric per-tensor counterparts
CONFIGS = {"W8A8 sym/channel": (8, True, True), "W4A4 sym/channel": (4, True, True),
           "W3A3 asym/tensor": (3, False, False), "W2A2 sym/tensor": (2, True, False),
           "W2A2 asym/tensor": (2, False, False), "W4A4 asym/tensor": (4, False, False)}
CHECK = tuple(CONFIGS)[:4]
# supernet variants: (description, factor, SandwichConfig kwargs, shared Adam)
VARIANTS = {"base": ("SubnetOptimizer + SandwichConfig() (the README's recipe)", "-", {}, False),
            "shared_adam": ("one Adam over the summed gradient", "per-step recipe", {}, True),
            "no_wdr": ("SandwichConfig(wdr=None)", "per-step recipe", {"wdr": None}, False),
            "no_gpg": ("SandwichConfig(lam=0.0): label loss for R and L", "per-step recipe", {"lam": 0.0}, False),
            "l_half": ("SandwichConfig(subnet_weights=(1, 1, 0.5))", "narrowest pull",
                       {"subnet_weights": (1.0, 1.0, 0.5)}, False),
            "l_off": ("SandwichConfig(subnet_weights=(1, 1, 0)): L not trained", "narrowest pull",
                      {"subnet_weights": (1.0, 1.0, 0.0)}, False)}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())
        self.act2 = act()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.short(x))


class RecipeNet(nn.Module):
    """conv-BN-act stem (stride 2), two residual blocks (16 and 32 channels), global pool, linear."""

    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        a = {"silu": nn.SiLU, "relu": nn.ReLU}[act]
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), a())
        self.blocks = nn.Sequential(_Block(16, 16, 1, a), _Block(16, 32, 2, a))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):                                   # (B, 1, 28, 28) -> (B, 10)
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class Bench:
    """Data, float starts and the calibrated supernet per activation, built once and shared by every run."""

    def __init__(self, float_epochs: int, dry_run: bool) -> None:
        splits = fashion_mnist_splits(seed=SEED, val_size=10000, limit_train=TRAIN_IMAGES)
        self.train, self.val, _ = make_loaders(splits, BATCH, seed=SEED, eval_batch_size=1000)
        self.bn = bn_batches_from(self.train.dataset, 8, BATCH, seed=SEED)
        self.float_epochs, self.dry_run, self.bases, self.float_acc = float_epochs, dry_run, {}, {}

    def base(self, act: str) -> Supernet:
        if act not in self.bases:
            torch.manual_seed(SEED)
            model = RecipeNet(act)
            cache = CACHE / f"float_{act}_e{self.float_epochs}.pt"
            if cache.exists():
                model.load_state_dict(torch.load(cache, weights_only=True))
            else:
                h = train_float(model, self.train, self.float_epochs, lr=LR, val_loader=self.val)
                print(f"float {act}: val {h['val_acc']:.4f} in {h['seconds']:.0f} s", flush=True)
                if not self.dry_run:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(model.state_dict(), cache.with_suffix(".tmp"))
                    os.replace(cache.with_suffix(".tmp"), cache)
            from eqnet_plugin.train import accuracy
            self.float_acc[act] = accuracy(model, self.val)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.ao.quantization.quantize_fx import prepare_qat_fx
                gm = prepare_qat_fx(copy.deepcopy(model), elastic_qconfig_mapping(), (self.bn[0][0],))
            sn = Supernet(gm)
            sn.calibrate(self.bn)
            self.bases[act] = sn
        return self.bases[act]

    def fresh(self, act: str) -> Supernet:
        base = self.base(act)
        self.train.generator.manual_seed(SEED)                 # every run sees the same batches in the same order
        return Supernet(copy.deepcopy(base.model), base.space)

    def configs(self, sn: Supernet) -> dict:
        return {k: sn.uniform(b, b, symmetric=s, per_channel=p) for k, (b, s, p) in CONFIGS.items()}

    def supernet(self, act: str, steps: int, variant: str) -> dict:
        _, _, kw, shared = VARIANTS[variant]
        sn = self.fresh(act)
        params = sn.model.parameters()
        opt = torch.optim.Adam(params, lr=LR) if shared else SubnetOptimizer(params, torch.optim.Adam, lr=LR)
        epochs = -(-steps // len(self.train))
        cpu = time.process_time()
        h = train_supernet(sn, self.train, opt, TrainConfig(epochs=epochs, recipe=SandwichConfig(**kw),
                                                            max_steps=steps),
                           scheduler=cosine_scheduler(opt, steps), generator=torch.Generator().manual_seed(SEED))
        cpu = time.process_time() - cpu
        acc = {k: evaluate(sn, c, self.val, self.bn) for k, c in self.configs(sn).items()}
        return {"acc": acc, "seconds": h["seconds"], "cpu_seconds": cpu}

    def dedicated(self, act: str, steps: int, name: str) -> dict:
        d = self.fresh(act)
        c = self.configs(d)[name]
        opt = torch.optim.Adam(d.model.parameters(), lr=LR)
        epochs = -(-steps // len(self.train))
        cpu = time.process_time()
        h = lsq_qat(d, c, self.train, opt, QATConfig(epochs=epochs, recipe=SandwichConfig(wdr=None), max_steps=steps),
                    scheduler=cosine_scheduler(opt, steps))
        return {"acc": evaluate(d, c, self.val, self.bn), "seconds": h["seconds"],
                "cpu_seconds": time.process_time() - cpu}


def plan(steps: int) -> list[tuple[str, int, str, str]]:
    """(activation, steps, kind, name) in priority order: the outside check's setting, then one factor at a time."""
    out = [("silu", steps, "supernet", "base")] + [("silu", steps, "dedicated", c) for c in CONFIGS]
    out += [("relu", steps, "supernet", "base")] + [("relu", steps, "dedicated", c) for c in CONFIGS]
    out += [("silu", steps, "supernet", v) for v in VARIANTS if v != "base"]
    out += [("silu", 4 * steps, "supernet", "base")] + [("silu", 4 * steps, "dedicated", c) for c in CONFIGS]
    return out


def key(act: str, steps: int, kind: str, name: str) -> str:
    return f"{act}/{steps}/{kind}/{name}"


def _gap(runs: dict, act: str, steps: int, variant: str, cfg: str) -> float | None:
    d, s = runs.get(key(act, steps, "dedicated", cfg)), runs.get(key(act, steps, "supernet", variant))
    return None if d is None or s is None else 100 * (d["acc"] - s["acc"][cfg])


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def section(results: dict) -> str:
    """The `bench_recipe` section from benchmarks/results/bench_recipe.json."""
    runs = {k: v for k, v in results.items() if "/" in k}
    meta = results.get("meta", {})
    steps = meta.get("steps", 282)
    doc = __doc__.split("\n\n")
    out = ["## bench_recipe", "", doc[0].strip() + " Protocol and commands: the script's docstring "
           "(`python benchmarks/bench_recipe.py`; `--report-only` rebuilds this section).", ""]
    rows = [("-", "silu", steps, "base", f"SiLU, {steps} steps: " + VARIANTS["base"][0])]
    rows += [("activation", "relu", steps, "base", "ReLU instead of SiLU")]
    rows += [(VARIANTS[v][1], "silu", steps, v, VARIANTS[v][0]) for v in VARIANTS if v != "base"]
    rows += [("budget", "silu", 4 * steps, "base", f"{4 * steps} steps")]
    cols = list(CONFIGS)
    base_gap = [_gap(runs, "silu", steps, "base", c) for c in CHECK]
    if all(g is not None for g in base_gap):
        out.append(headline("recipe check: dedicated - supernet, SiLU net, 282 steps, W8/W4/W3/W2 (validation)",
                            " / ".join(_cell(g) for g in base_gap) + " points"))
    long_gap = [_gap(runs, "silu", 4 * steps, "base", c) for c in CHECK]
    if all(g is not None for g in long_gap):
        out.append(headline(f"same at {4 * steps} steps", " / ".join(_cell(g) for g in long_gap) + " points"))
    out += ["", "Dedicated - supernet on the validation split, points (positive: the supernet trails); the last "
            "columns: supernet training time and its ratio to the dedicated runs of the four checked configs.", "",
            "| factor | run | " + " | ".join(cols) + " | supernet s | / 4 dedicated |",
            "|---|---|" + "---|" * (len(cols) + 2)]
    for factor, act, st, v, desc in rows:
        sn = runs.get(key(act, st, "supernet", v))
        if sn is None:                                         # not run yet: the footer counts it
            continue
        ded = [runs.get(key(act, st, "dedicated", c)) for c in CHECK]
        ratio = (f"{sn['seconds'] / sum(d['seconds'] for d in ded):.2f}x" if all(ded) else "-")
        out.append(f"| {factor} | {desc} | " + " | ".join(_cell(_gap(runs, act, st, v, c)) for c in cols)
                   + f" | {sn['seconds']:.0f} | {ratio} |")
    total = sum(r["seconds"] for r in runs.values())
    out += ["", f"{len(runs)} of {len(plan(steps))} runs finished; their training wall time {total / 60:.0f} min "
            f"(float starts {meta.get('float_epochs', '-')} epochs, not counted; validation accuracy "
            + ", ".join(f"{a} {100 * v:.2f}%" for a, v in sorted(meta.get("float_acc", {}).items()))
            + f"). Machine: {meta.get('machine', '-')}.",
            ""]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=282, help="steps of the base budget (the factor runs 4x of it)")
    p.add_argument("--float-epochs", type=int, default=10, help="epochs of the float start")
    p.add_argument("--dry-run", action="store_true", help="write nothing (no results, no section, no float cache)")
    p.add_argument("--report-only", action="store_true", help="rebuild the section from the results file")
    p.add_argument("--start", type=int, default=0, help="begin at this run of the plan (wrapping around), so a "
                   "second process can work on the same plan from another end")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    args = p.parse_args(argv)
    if args.report_only:
        update_section(NAME, section(load_results(NAME)))
        return
    torch.set_num_threads(1)
    results = {} if args.dry_run else load_results(NAME)
    bench = Bench(args.float_epochs, args.dry_run)
    meta = {"steps": args.steps, "float_epochs": args.float_epochs, "machine": machine(), "float_acc": {}}
    if results.get("meta", meta)["steps"] != args.steps:
        raise SystemExit(f"{NAME}.json holds runs of --steps {results['meta']['steps']}; delete it or pass that")
    done, todo = 0, plan(args.steps)
    for act, steps, kind, name in todo[args.start:] + todo[:args.start]:
        k = key(act, steps, kind, name)
        if k in results or (not args.dry_run and k in load_results(NAME)):    # another process may have run it
            continue
        if args.max_runs is not None and done >= args.max_runs:
            break
        r = bench.supernet(act, steps, name) if kind == "supernet" else bench.dedicated(act, steps, name)
        meta["float_acc"] = dict(results.get("meta", {}).get("float_acc", {}), **bench.float_acc)
        print(time.strftime("%H:%M:%S"), k, {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()}, flush=True)
        results[k], results["meta"] = r, meta
        if not args.dry_run:
            CACHE.mkdir(parents=True, exist_ok=True)
            with open(CACHE / "results.lock", "w") as lock:     # a second process (--start) may save too
                fcntl.flock(lock, fcntl.LOCK_EX)
                meta["float_acc"] = dict(load_results(NAME).get("meta", {}).get("float_acc", {}), **bench.float_acc)
                save_run(NAME, k, r)
                save_run(NAME, "meta", meta)
        done += 1
    if not args.dry_run:
        update_section(NAME, section(load_results(NAME)))
    else:
        print(section(results))


if __name__ == "__main__":
    main()
