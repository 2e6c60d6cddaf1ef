"""Short LSQ fine-tuning of a searched subnet, against the dedicated uniform QAT model of the same BitOps.

bench_search picks a mixed-precision subnet of the supernet at the BitOps of uniform W3A3 and W4A4. This benchmark
takes those picks (the `refine_search` subnet of each `bench_search_fashion_*.json` result), copies the supernet,
trains the copy with that one subnet active (`eqnet_plugin.train.lsq_qat`: the same optimizer, schedule and batches
as the dedicated runs, a fraction of their steps) and measures it. The recipe is chosen per pick on the validation
split from a small grid (steps x learning rate); the test split is read only for the chosen recipe and for the
pick before fine-tuning.

    python benchmarks/bench_finetune.py                      # every bench_search_fashion result with a supernet
    python benchmarks/bench_finetune.py --models tiny_resnet --seeds 0
    python benchmarks/bench_finetune.py --report-only        # rebuild the BENCHMARKS.md section

Results: benchmarks/results/bench_finetune.json and the `bench_finetune` section of BENCHMARKS.md. Needs the saved
supernets of bench_supernet (`--save-supernets`) and the result files of bench_search --data fashion-mnist.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine, update_section  # noqa: E402
from _search_fashion import Context, checkpoint_path  # noqa: E402
from tune_supernet import _param_kind  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "bench_finetune.json"
STEPS = (150, 500)            # against the dedicated runs' 1500
LRS = (1e-4, 3e-4, 1e-3)      # the dedicated runs' Adam lr is 1e-3, cosine to 0
BUDGETS = ("W3A3", "W4A4")
PARTS = {                     # --train-only: which parameters learn (the rest stay the supernet's), and their lrs
    "all": (lambda name: True, LRS),
    "bn": (lambda name: _param_kind(name) == "bn", (1e-3, 3e-3, 1e-2)),
    "bn+quantizers": (lambda name: _param_kind(name) in ("bn", "quantizer"), (1e-3, 3e-3, 1e-2)),
}


def results_path(part: str) -> Path:
    return OUT if part == "all" else OUT.with_name(f"bench_finetune_{part.replace('+', '_')}.json")


def _search_results(models, seeds) -> list[dict]:
    out = []
    for f in sorted(RESULTS.glob("bench_search_fashion_*_f8.json")):
        r = json.loads(f.read_text())
        if (models and r["model"] not in models) or (seeds is not None and r["seed"] not in seeds):
            continue
        out.append(r)
    return out


def _accuracy(ctx: Context, sn, cfg, split: str) -> float:
    """The subnet's accuracy after BN recalibration on the supernet's BN batches (bench_search's measurement)."""
    return ctx.measure(cfg, (split,), sn=sn)["accuracy" if split == "val" else "test"]


def run_one(r: dict, log, part: str = "all") -> dict:
    """The grid for both budgets' picks of one bench_search result (the library's `finetune_subnet` does the
    "all" case for an `Experiment`; this works on bench_search's measurement context and can freeze parts)."""
    from eqnet_plugin.search.records import supernet_fingerprint
    from eqnet_plugin.quant.space import SubnetConfig
    from eqnet_plugin.train import cosine_scheduler, lsq_qat

    ctx = Context(r["model"], r["seed"])
    if supernet_fingerprint(ctx.sn) != r["fingerprint"]:
        raise SystemExit(f"{checkpoint_path(r['model'], r['seed'])} is not the supernet bench_search searched "
                         f"(fingerprint {r['fingerprint'][:12]}): rerun bench_search on it first")
    res = {"model": r["model"], "seed": r["seed"], "fingerprint": r["fingerprint"], "budgets": {}}
    for budget in BUDGETS:
        pick = r["main"][budget]["refine"]
        cfg = SubnetConfig.from_json(json.dumps(pick["config"]))
        ded = {k: v for k, v in r["dedicated"].items() if k.startswith(budget + " ")}
        runs, best, best_sn = [], None, None
        learns, lrs = PARTS[part]
        for steps in STEPS:
            for lr in lrs:
                sn = copy.deepcopy(ctx.sn)
                params = [p for n, p in sn.model.named_parameters() if learns(n)]
                for n, p in sn.model.named_parameters():
                    p.requires_grad_(learns(n))
                opt = torch.optim.Adam(params, lr=lr)
                ctx.train.generator.manual_seed(r["seed"])          # the dedicated runs' batches, in order
                t = time.perf_counter()
                lsq_qat(sn, cfg, ctx.train, opt, 1, scheduler=cosine_scheduler(opt, steps), max_steps=steps)
                sec = time.perf_counter() - t
                runs.append({"steps": steps, "lr": lr, "seconds": sec, "val": _accuracy(ctx, sn, cfg, "val")})
                if best is None or runs[-1]["val"] > best["val"]:          # the first of equal ones, as max() did
                    best, best_sn = runs[-1], sn
                log(f"{r['model']} seed {r['seed']} {budget}: {steps} steps lr {lr:g}: val {runs[-1]['val']:.4f} "
                    f"({sec:.0f} s)")
        best["test"] = _accuracy(ctx, best_sn, cfg, "test")
        res["budgets"][budget] = {"pick_val": pick["val"], "pick_test": pick["test"], "bitops": pick["bitops"],
                                  "dedicated": ded, "runs": runs, "chosen": {k: best[k] for k in
                                                                           ("steps", "lr", "val", "test")}}
        log(f"{r['model']} seed {r['seed']} {budget}: chosen {best['steps']} steps lr {best['lr']:g}: test "
            f"{best['test']:.4f} (pick before fine-tuning {pick['test']:.4f}, best dedicated {max(ded.values()):.4f})")
    return res


def report(res: dict, parts: dict | None = None) -> str:
    out = ["## bench_finetune: a short fine-tune of the searched subnet (Fashion-MNIST)", "",
           f"Machine: {res['machine']}. `python benchmarks/bench_finetune.py`: the W3A3- and W4A4-budget "
           "`refine_search` picks of bench_search (current supernets), each trained alone from the supernet's weights "
           f"with `lsq_qat` (Adam, cosine, the dedicated runs' batches) for {' or '.join(map(str, STEPS))} steps at "
           f"lr {' or '.join(f'{x:g}' for x in LRS)}, the recipe chosen on validation; the dedicated runs train "
           "1500 steps at lr 0.001 from the float model. Test accuracy in %.", "",
           "| model, seed | budget | searched (no fine-tune) | fine-tuned (steps, lr) | dedicated, best scheme | "
           "fine-tuned - dedicated |",
           "|---|---|---:|---:|---:|---:|"]
    met = total = 0
    for m in res["runs"]:
        for budget, b in m["budgets"].items():
            c = b["chosen"]
            ded = max(b["dedicated"].values())
            total += 1
            met += c["test"] >= ded
            out.append(f"| {m['model']}, {m['seed']} | {budget} | {100 * b['pick_test']:.2f} | {100 * c['test']:.2f} "
                       f"({c['steps']}, {c['lr']:g}) | {100 * ded:.2f} | {100 * (c['test'] - ded):+.2f} |")
    corner = sum(b["chosen"]["steps"] == max(STEPS) and b["chosen"]["lr"] == max(LRS)
                 for m in res["runs"] for b in m["budgets"].values())
    out += ["", f"* Fine-tuned subnet at least as accurate as the best dedicated scheme on test: {met} of {total}.",
            f"* The chosen recipe is the grid's longest and fastest ({max(STEPS)} steps, lr {max(LRS):g}) for "
            f"{corner} of {total} picks: longer fine-tunes were not tried.",
            "* This is a second training run per deployed subnet, not the supernet's subnet as searched: the "
            "bench_search rows report the searched subnets themselves. Its cost is the chosen steps against a "
            "dedicated run's 1500 (one forward and backward per step each)."]
    if parts:
        columns = {f"{p} only": {(m["model"], m["seed"]): m for m in v["runs"]} for p, v in parts.items()}
        keys = sorted({k for runs in columns.values() for k in runs}, key=lambda k: (k[0] != "tiny_resnet", k[1]))
        columns["all"] = {(m["model"], m["seed"]): m for m in res["runs"]}
        lrs = ", ".join(f"{x:g}" for x in PARTS["bn"][1])
        out += ["", "Which parameters carry the gain (a diagnosis, `--train-only`): the same picks fine-tuned with "
                "only some parameters learning, the rest kept at the supernet's (BN = the BatchNorm affine; "
                f"quantizers = the active scales and zero points), lr from {{{lrs}}} and steps chosen on validation; "
                "the last column is the table above (all parameters). Validation accuracy in % (the searched pick's "
                "own validation number is the best of 30 measurements, so it reads high), test in brackets.", "",
                "| model, seed | budget | searched | " + " | ".join(columns) + " |",
                "|---|---|---:|" + "---:|" * len(columns)]
        gains: dict[str, list[float]] = {name: [] for name in columns}
        for key in keys:
            for budget in BUDGETS:
                pick = next(runs[key] for runs in columns.values() if key in runs)["budgets"][budget]
                cells = []
                for name, runs in columns.items():
                    c = runs[key]["budgets"][budget]["chosen"] if key in runs else None
                    cells.append(f"{100 * c['val']:.2f} ({100 * c['test']:.2f})" if c else "")
                    if c:
                        gains[name].append(c["test"] - pick["pick_test"])
                out.append(f"| {key[0]}, {key[1]} | {budget} | {100 * pick['pick_val']:.2f} "
                           f"({100 * pick['pick_test']:.2f}) | " + " | ".join(cells) + " |")
        out += ["", "* Mean test gain over the searched pick, on these rows: "
                + ", ".join(f"{name} {100 * sum(g) / len(g):+.2f}" for name, g in gains.items() if g) + "."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--train-only", choices=sorted(PARTS), default="all",
                    help="fine-tune only these parameters (a diagnosis: how much of the gain each part carries)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the BENCHMARKS.md section from the results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not args.report_only:
        t0 = time.perf_counter()

        def log(msg):
            print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
        todo = _search_results(args.models, args.seeds)
        if not todo:
            raise SystemExit("no bench_search_fashion_*_f8.json results: run `python benchmarks/bench_search.py "
                             "--data fashion-mnist` first")
        new = [run_one(r, log, args.train_only) for r in todo]
        out = results_path(args.train_only)
        old = json.loads(out.read_text()) if out.exists() else {"runs": []}     # read last: parallel runs merge
        keys = {(m["model"], m["seed"]) for m in new}
        runs = sorted([m for m in old["runs"] if (m["model"], m["seed"]) not in keys] + new,
                      key=lambda m: (m["model"] != "tiny_resnet", m["seed"]))
        res = {"machine": machine(), "runs": runs}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)
    res = json.loads(OUT.read_text())
    parts = {p: json.loads(results_path(p).read_text()) for p in PARTS if p != "all" and results_path(p).exists()}
    text = report(res, parts)
    print(text)
    update_section("bench_finetune", text)


if __name__ == "__main__":
    main()
