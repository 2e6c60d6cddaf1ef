"""Dead channels and the fixed BN fold: the same supernet trained with and without the dead-channel rule.

    python benchmarks/bench_dead_channel.py            # TinyMobileNetV2 x2, split seed 0 (about 25 min, 2 cores)

`eqnet_plugin.quant.bn_fold.fold_variance` gives a channel whose running variance is below ``DEAD_CHANNEL_VAR`` (1e-3)
times its layer's median the median as its fixed fold variance. With ``DEAD_CHANNEL_VAR = 0`` the fold is the plain
running variance (the rule off). This benchmark runs bench_supernet's fashion-x2 recipe (Fashion-MNIST, the cached
or freshly trained 8-epoch float start, one supernet with `SubnetOptimizer` and WDR for 1500 steps, BN recalibrated
on 16 training batches per subnet) once per setting, in two processes, and reports on the test split:

* the float start's dead channels per layer;
* all 12 uniform subnets (W2/3/4/8, three schemes) of each supernet;
* a dedicated LSQ QAT run of W2A2 sym/tensor (bench_supernet's recipe) under each setting, since plain QAT with
  eqnet_plugin's fixed fold quantizes the same folded weight.

With the rule on, the numbers equal bench_supernet_fashion_x2's for the same seed (same code path and seeds).
Results: benchmarks/results/bench_dead_channel.json and the BENCHMARKS.md section `bench_dead_channel`.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_supernet as B  # noqa: E402
from _report import machine, update_section  # noqa: E402

RESULTS = B.RESULTS_DIR / "bench_dead_channel.json"
DEDICATED = "W2A2 sym/tensor"


def variant(model_name: str, seed: int, rule: bool) -> dict:
    import eqnet_plugin.quant.bn_fold as bf
    from eqnet_plugin.app.data import fashion_mnist_splits, make_loaders
    from eqnet_plugin.train.losses import WDRLoss
    from eqnet_plugin.train.optim import SubnetOptimizer
    from eqnet_plugin.train import (bn_batches_from, cosine_scheduler, evaluate, evaluate_configs, lsq_qat,
                                    train_supernet)
    torch.set_num_threads(1)
    cfg, lr, batch = B.BUDGETS["fashion-x2"], B.LR, B.BATCH_SIZE
    splits = fashion_mnist_splits(image_size=28, seed=seed, val_size=10000)
    train, _, test = make_loaders(splits, batch, seed=seed, eval_batch_size=1000)
    steps = min(cfg["max_steps"], cfg["epochs"] * len(train))
    torch.manual_seed(seed)
    model = B.build_bench_model(model_name, stem_stride=cfg["stem_stride"])
    cache = B.float_cache_path(model_name, seed, cfg, B.FLOAT_LR, batch, 28)
    B.load_or_train_float(model, train, cfg, B.FLOAT_LR, cache)
    dead = {}                                       # the channels the rule (library default) changes
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            v = m.running_var
            n = int((bf.fold_variance(v) != v).sum())
            if n:
                dead[name] = {"channels": n, "min_var": float(v.min()), "median_var": float(v.median())}
    if not rule:
        bf.DEAD_CHANNEL_VAR = 0.0                   # read by fold_variance when the Supernet is built
    bn = bn_batches_from(train.dataset, cfg["bn_batches"], batch, seed=seed)
    base = B._prepare(model, (bn[0][0],))
    base.calibrate(bn)
    configs = B.reference_configs(base)
    out = {"dead_channel_var": bf.DEAD_CHANNEL_VAR, "float_dead_channels": dead}

    sn = B._copy(base)
    opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=lr)
    train.generator.manual_seed(seed)
    t = time.process_time()
    train_supernet(sn, train, opt, cfg["epochs"], scheduler=cosine_scheduler(opt, steps),
                   generator=torch.Generator().manual_seed(seed), max_steps=steps, progress=False, wdr=WDRLoss())
    out["supernet_cpu_seconds"] = time.process_time() - t
    out["supernet"] = evaluate_configs(sn, configs, test, bn)

    d = B._copy(base)
    opt = torch.optim.Adam(d.model.parameters(), lr=lr)
    train.generator.manual_seed(seed)
    lsq_qat(d, configs[DEDICATED], train, opt, cfg["epochs"], scheduler=cosine_scheduler(opt, steps),
            max_steps=steps)
    out["dedicated"] = {DEDICATED: evaluate(d, configs[DEDICATED], test, bn)}
    return out


def report(res: dict) -> str:
    off, on = res["runs"]["off"], res["runs"]["on"]
    dead = on["float_dead_channels"]
    lines = [f"## bench_dead_channel: a dead channel and the fixed BN fold ({res['model']}, split seed {res['seed']})",
             "", f"Machine: {res['machine']}. `benchmarks/bench_dead_channel.py`: bench_supernet's fashion-x2 recipe "
             "(8-epoch float start, one supernet with `SubnetOptimizer` + WDR for 1500 steps, BN recalibrated on 16 "
             "training batches per subnet, all 10,000 test images) trained twice from the same float start: with "
             "`bn_fold.DEAD_CHANNEL_VAR = 0` (fold with the plain running variance, the rule off) and with the "
             "default 1e-3 (dead channels fold with their layer's median variance). Test accuracy in %.", "",
             "Dead channels of the float start (running variance below 1e-3 of the layer median): "
             + ("; ".join(f"`{k}`: {v['channels']} (variance {v['min_var']:.1e}, median {v['median_var']:.3f})"
                          for k, v in dead.items()) or "none") + ".", "",
             "| subnet | rule off | rule on (default) |", "|---|---:|---:|"]
    for k in on["supernet"]:
        lines.append(f"| supernet {k} | {100 * off['supernet'][k]:.2f} | {100 * on['supernet'][k]:.2f} |")
    lines.append(f"| dedicated LSQ QAT {DEDICATED} | {100 * off['dedicated'][DEDICATED]:.2f} | "
                 f"{100 * on['dedicated'][DEDICATED]:.2f} |")
    lines += ["", f"Whole benchmark: {res['seconds']:.0f} s wall time (2 processes, 1 thread each)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_mobilenet_v2_x2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rebuild the BENCHMARKS.md section from the results")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads(RESULTS.read_text())
    else:
        t = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            futs = {key: pool.submit(variant, args.model, args.seed, key == "on") for key in ("off", "on")}
            runs = {key: f.result() for key, f in futs.items()}
        res = {"model": args.model, "seed": args.seed, "machine": machine(), "runs": runs,
               "seconds": time.perf_counter() - t}
        RESULTS.write_text(json.dumps(res, indent=1))
    text = report(res)
    print(text)
    update_section("bench_dead_channel", text)


if __name__ == "__main__":
    main()
