"""Mixed-precision search on trained supernets: CQAP ranking quality, searched vs random and vs dedicated QAT, time.

Digits (default): TinyResNet on the embedded digits, trained here; the supernet and the measured records are cached
under runs/bench_search/<model>/, so a rerun redoes only the search and the random-subnet measurements (--fresh
starts over):
  1. TinyResNet(widths) on the digits at 8x8 (validation = 40% of all images, taken from the non-test part, i.e.
     held-out training data; test = 20%, untouched): float pretraining, calibration, sandwich-rule supernet
     training (`train_float`, `Supernet.calibrate`, `train_supernet`).
  2. `collect_records`: 1000 + 200 subnets drawn the paper's way, BN recalibrated on the whole training split (the
     same 6 batches for every subnet), measured on the validation split. CQAP (each regressor: the ensemble, the
     default; gradient-boosted trees alone; the paper's MLP) is fitted on the first 250 / 500 / 1000 and ranked on
     the last 200. Each record also stores the accuracy on the two halves of the validation split (even / odd
     images): their Kendall tau is the measurement-noise ceiling.
  3. Constraint: BitOps <= the uniform W4A4 subnet's. `evolution_search` (paper defaults: population 100, 25%
     parents, 500 generations) with the accuracy CQAP, timed together with its fit; then `measure_top` measures
     its 10 best-predicted subnets on the validation split and keeps the best measured; `refine_search` repeats
     that for 3 rounds, refitting the CQAP on the records plus the subnets measured so far.
  4. 1000 random feasible subnets (`sample_feasible`, same constraint), measured on validation and test, against
     the searched subnets measured the same way; GA picks at other budgets and under the tensorrt / qnn profiles.
Fashion-MNIST (`--data fashion-mnist`): the same steps on the supernets that `bench_supernet.py --budget fashion
--save-supernets` trains, against bench_supernet's dedicated runs of the same model and seed; see
benchmarks/_search_fashion.py.

Commands (budget; wall time on 2 cores):
    python benchmarks/bench_search.py --widths 16,32,64      # 1200 records + 1000 random subnets; ~5 min (est.)
    python benchmarks/bench_search.py --widths 4,8,16        # a small TinyResNet, where quantization costs accuracy
    python benchmarks/bench_search.py --data fashion-mnist --models tiny_resnet --seed 0 --jobs 2
                                                             # one (model, seed): 1200 records, 1000 random; 28-34 min
    python benchmarks/bench_search.py --data fashion-mnist --smoke     # 24 records, 10 generations; writes nothing
    python benchmarks/bench_search.py --data fashion-mnist --speed 4   # evaluation speed vs train.evaluate
    python benchmarks/bench_search.py --report-only                    # rebuild the section; seconds

Each run (a digits width, or a Fashion-MNIST model and seed) replaces its entry in benchmarks/results/bench_search.json
(digits_<model>, fashion_<model>_seed<seed>), its Pareto plot goes to benchmarks/results/pareto_*.png, and the
`bench_search` section of BENCHMARKS.md is rebuilt from every entry.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS_DIR, ROOT, headline, load_results, machine, save_run, update_section  # noqa: E402
from _search_stats import equal_budget, tau_ceiling  # noqa: E402

IMAGE_SIZE, VAL_FRACTION, N_TRAIN_RECORDS, N_HELDOUT, TOP_K, REFINE_ROUNDS = 8, 0.4, 1000, 200, 10, 3
CURVE_ROUNDS = 6             # a longer refine_search: best measured subnet vs validation measurements spent
BN_TAG = "bn-all-train"      # records and random measurements are cached per BN-recalibration setting


def build_supernet(run_dir: Path, widths: tuple[int, ...], epochs: int, float_epochs: int, log):
    """Float-train, prepare, calibrate and supernet-train TinyResNet on digits (cached checkpoint)."""
    import eqnet_plugin as eq
    from eqnet_plugin.app.data import digits_loaders
    from eqnet_plugin.app.models import TinyResNet
    from eqnet_plugin.train import (TrainConfig, bn_batches_from, cosine_scheduler, load_checkpoint, save_checkpoint,
                                    train_float, train_supernet)
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    loaders = digits_loaders(batch_size=64, image_size=IMAGE_SIZE, val_fraction=VAL_FRACTION, seed=0)
    train = loaders[0]
    torch.manual_seed(0)
    model = TinyResNet(widths=widths)
    ckpt, meta = run_dir / "supernet.pt", run_dir / "supernet.json"
    info = {}
    if not ckpt.exists():
        t = time.perf_counter()
        h = train_float(model, train, float_epochs, val_loader=loaders[1])
        info.update(float_val_acc=h["val_acc"], float_seconds=time.perf_counter() - t, float_epochs=float_epochs)
        log(f"float: val acc {h['val_acc']:.4f} in {info['float_seconds']:.0f} s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = prepare_qat_fx(model.train(), eq.elastic_qconfig_mapping(), (next(iter(train))[0],))
    sn = eq.Supernet(gm)
    if ckpt.exists():
        load_checkpoint(ckpt, sn, restore_rng=False)
        info = json.loads(meta.read_text())
        log(f"loaded cached supernet {ckpt}")
    else:
        sn.calibrate(train, max_batches=4)
        opt = torch.optim.Adam(gm.parameters(), 1e-3)
        t = time.perf_counter()
        train_supernet(sn, train, opt, TrainConfig(epochs=epochs), scheduler=cosine_scheduler(opt, epochs * len(train)),
                       generator=torch.Generator().manual_seed(0))
        info.update(supernet_seconds=time.perf_counter() - t, supernet_epochs=epochs)
        save_checkpoint(ckpt, sn, None, None, epochs * len(train), None)
        meta.write_text(json.dumps(info))
        log(f"supernet: {epochs} epochs in {info['supernet_seconds']:.0f} s")
    bn = bn_batches_from(train.dataset, num_batches=-(-len(train.dataset) // 128), batch_size=128, seed=1)  # all
    return sn, loaders, bn, info


@torch.no_grad()
def _run(sn, cfg, bn, datasets):
    """Recalibrate BN for `cfg` once, then (correct (N,) bool, true-class probability (N,)) per dataset."""
    out = []
    with sn.activate(cfg):
        sn.recalibrate_bn(bn)
        was = sn.model.training
        sn.model.eval()
        try:
            for ds in datasets:
                x, y = ds.tensors
                logits = sn.model(x)                                         # (N, 10)
                out.append((logits.argmax(1) == y, logits.softmax(1).gather(1, y[:, None])[:, 0]))
        finally:
            sn.model.train(was)
    return out


def record_metrics(sn, cfg, loader, bn) -> dict:
    """`collect_records` evaluation: accuracy on the validation split plus halves and the true-class probability."""
    (ok, prob), = _run(sn, cfg, bn, [loader.dataset])
    ok = ok.double()
    return {"accuracy": float(ok.mean()), "acc_even": float(ok[0::2].mean()), "acc_odd": float(ok[1::2].mean()),
            "true_prob": float(prob.double().mean())}


def measure(sn, cfg, loaders, bn) -> tuple[float, float]:
    """(validation, test) accuracy of one subnet, BN recalibrated once on training batches."""
    return tuple(float(ok.double().mean()) for ok, _ in _run(sn, cfg, bn, [loaders[1].dataset, loaders[2].dataset]))


def run_model(args, widths: tuple[int, ...], log) -> dict:
    from eqnet_plugin.search import (CQAP, CostModel, RandomSearchConfig, RefineConfig, Regressor, SearchSpace,
                                     collect_records, evolution_search, kendall_tau, measure_top, random_search,
                                     refine_search, sample_feasible)
    name = "tiny_resnet_" + "-".join(map(str, widths))
    run_dir = ROOT / "runs" / "bench_search" / name
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sn, loaders, bn, info = build_supernet(run_dir, widths, args.epochs, args.float_epochs, log)
    cm = CostModel.from_supernet(sn, loaders[0].dataset[0][0][None])
    space = SearchSpace.from_supernet(sn)

    # --- records and CQAP ranking ------------------------------------------------------------------------------
    t = time.perf_counter()
    recs = collect_records(sn, lambda c: record_metrics(sn, c, loaders[1], bn), N_TRAIN_RECORDS + N_HELDOUT,
                           run_dir / f"records_{BN_TAG}.jsonl", cost_model=cm,
                           progress=lambda i, r: (i + 1) % 200 == 0 and log(f"records: {i + 1} measured"))
    rec_seconds = time.perf_counter() - t
    train_recs, held = recs[:N_TRAIN_RECORDS], recs[N_TRAIN_RECORDS:]
    held_cfg = [r.config for r in held]
    held_acc = np.array([r.accuracy for r in held])
    ceiling = kendall_tau([r.metrics["acc_even"] for r in held], [r.metrics["acc_odd"] for r in held])
    taus = []
    for regressor in (Regressor.MLP, Regressor.GBT, Regressor.ENSEMBLE):   # the default last: it drives the GA
        for n in (250, 500, 1000):
            t = time.perf_counter()
            cqap = CQAP(space, seed=0, regressor=regressor).fit([r.config for r in train_recs[:n]],
                                                                [r.accuracy for r in train_recs[:n]])
            fit_s = time.perf_counter() - t
            taus.append({**cqap.evaluate(held_cfg, held_acc), "records": n, "fit_seconds": fit_s,
                         "regressor": regressor.value})
            log(f"CQAP {regressor.value} n={n}: tau {taus[-1]['kendall_tau']:.3f} pearson {taus[-1]['pearson']:.3f} "
                f"fit {fit_s:.1f} s")
    soft = CQAP(space, seed=0).fit([r.config for r in train_recs], [r.metrics["true_prob"] for r in train_recs])
    soft_m = soft.evaluate(held_cfg, [r.metrics["true_prob"] for r in held])
    log(f"noise ceiling (tau of the two validation halves) {ceiling:.3f}; true-prob CQAP tau "
        f"{soft_m['kendall_tau']:.3f}")
    cqap.save(run_dir / "cqap.pt")

    # --- GA vs random at the W4A4 budget ---------------------------------------------------------------------
    limit = cm(sn.uniform(4, 4)).bitops
    cons = {"max_bitops": limit}
    ga = evolution_search(cqap, space, cons, cost_model=cm)
    ga_val, ga_test = measure(sn, ga.best.config, loaders, bn)
    log(f"GA: {ga.evaluations} distinct subnets in {ga.seconds:.1f} s; predicted {ga.best.predicted_accuracy:.4f}, "
        f"val {ga_val:.4f}, test {ga_test:.4f}")
    measured: dict = {}

    def val(c):                                     # validation accuracy, each subnet measured once
        if c not in measured:
            measured[c] = measure(sn, c, loaders, bn)
        return measured[c][0]
    t = time.perf_counter()
    top = measure_top(ga, val, k=TOP_K)                                            # validation split only
    top_seconds = time.perf_counter() - t
    top_val, top_test = measured[top.best.config]
    log(f"GA + measure_top({TOP_K}): val {top_val:.4f}, test {top_test:.4f} ({top_seconds:.1f} s)")
    t = time.perf_counter()
    ref = refine_search(CQAP(space, seed=0), train_recs, val, space, cons, RefineConfig(rounds=REFINE_ROUNDS, k=TOP_K),
                        cost_model=cm)
    ref_seconds = time.perf_counter() - t
    ref_val, ref_test = measured[ref.best.config]
    log(f"refine_search({REFINE_ROUNDS} x {TOP_K}): val {ref_val:.4f}, test {ref_test:.4f} ({ref_seconds:.1f} s, "
        f"{len(ref.top)} measured)")
    rnd_pred = random_search(cqap, space, cons, RandomSearchConfig(n=args.random, seed=1), cost_model=cm)
    rp_val, rp_test = measure(sn, rnd_pred.best.config, loaders, bn)
    t = time.perf_counter()
    rand_cfgs = sample_feasible(space, cm, cons, args.random, seed=1)
    rand_ops = np.array([cm(c).bitops for c in rand_cfgs])
    cache = run_dir / f"random_{args.random}_{BN_TAG}.json"     # measured accuracies depend only on the supernet
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached is not None and cached["configs"] == [c.to_dict() for c in rand_cfgs]:
        rand, rand_seconds = np.array(cached["acc"]), cached["seconds"]
        log(f"random: reused {len(rand)} cached measurements")
    else:
        rand = np.array([measure(sn, c, loaders, bn) for c in rand_cfgs])              # (R, 2): val, test
        rand_seconds = time.perf_counter() - t
        cache.write_text(json.dumps({"configs": [c.to_dict() for c in rand_cfgs], "acc": rand.tolist(),
                                     "seconds": rand_seconds}))
    by_val = int(np.argmax(rand[:, 0]))
    log(f"random: {len(rand_cfgs)} measured in {rand_seconds:.0f} s; best val {rand[:, 0].max():.4f}, best test "
        f"{rand[:, 1].max():.4f}, test of best-by-val {rand[by_val, 1]:.4f}")

    order: list = []                                     # measurement order of the long refine_search

    def val_logged(c):
        if c not in order:
            order.append(c)
        return val(c)
    refine_search(CQAP(space, seed=0), train_recs, val_logged, space, cons, RefineConfig(rounds=CURVE_ROUNDS, k=TOP_K),
                  cost_model=cm)
    curve = []
    for m in range(TOP_K, len(order) + 1, TOP_K):
        b = max(order[:m], key=lambda c: measured[c][0])          # first measured wins ties
        curve.append({"measured": m, "val": measured[b][0], "test": measured[b][1],
                      "random": equal_budget(rand, m, measured[b])})
        log(f"refine curve: {m} measured, best val {measured[b][0]:.4f} (test {measured[b][1]:.4f})")

    picks = []
    for label, prof, (wb, ab) in [("W3A3 budget", None, (3, 3)), ("W5A5 budget", None, (5, 5)),
                                  ("W6A6 budget", None, (6, 6)), ("tensorrt, W4A8 budget", "tensorrt", (4, 8)),
                                  ("qnn, W4A8 budget", "qnn", (4, 8))]:
        lim = cm(sn.uniform(wb, ab)).bitops
        r = evolution_search(cqap, SearchSpace.from_supernet(sn, prof), {"max_bitops": lim}, cost_model=cm)
        r = measure_top(r, val, k=TOP_K)
        v, te = measured[r.best.config]
        picks.append({"search": label, "limit": lim, "bitops": r.best.costs["bitops"],
                      "predicted": r.best.predicted_accuracy, "val": v, "test": te})
        log(f"GA {label}: predicted {r.best.predicted_accuracy:.4f} val {v:.4f} test {te:.4f}")
    uniform = [{"subnet": f"uniform W{b}A{b} sym/per-channel", "bitops": cm(sn.uniform(b, b, per_channel=True)).bitops,
                **dict(zip(("val", "test"), measure(sn, sn.uniform(b, b, per_channel=True), loaders, bn)))}
               for b in (2, 3, 4, 8)]
    res = {"model": name, "widths": list(widths), "info": info, "machine": machine(), "n_records": len(recs),
           "record_seconds_this_run": rec_seconds, "taus": taus, "ga_regressor": cqap.regressor.value,
           "noise_ceiling_tau": ceiling, "true_prob_cqap": {**soft_m, "regressor": soft.regressor.value},
           "limit": limit, "full_bitops": cm(sn.max_config()).bitops,
           "ga": {**ga.best.costs, "predicted": ga.best.predicted_accuracy, "val": ga_val, "test": ga_test,
                  "seconds": ga.seconds, "evaluations": ga.evaluations},
           "ga_top": {**top.best.costs, "predicted": top.best.predicted_accuracy, "val": top_val, "test": top_test,
                      "k": TOP_K, "seconds": top_seconds,
                      "val_rank": int((rand[:, 0] > top_val).sum()) + 1,
                      "test_rank": int((rand[:, 1] > top_test).sum()) + 1},
           "equal_budget": equal_budget(rand, len(ref.top), (ref_val, ref_test)), "curve": curve,
           "noise_ceiling_full_tau": tau_ceiling(ceiling),
           "refine": {**ref.best.costs, "predicted": ref.best.predicted_accuracy, "val": ref_val, "test": ref_test,
                      "k": TOP_K, "rounds": REFINE_ROUNDS, "measured": len(ref.top), "seconds": ref_seconds,
                      "val_rank": int((rand[:, 0] > ref_val).sum()) + 1,
                      "test_rank": int((rand[:, 1] > ref_test).sum()) + 1},
           "random_predicted": {**rnd_pred.best.costs, "predicted": rnd_pred.best.predicted_accuracy,
                                "val": rp_val, "test": rp_test, "n": rnd_pred.evaluations},
           "random_measured": {"n": len(rand_cfgs), "best_val": rand[:, 0].max(), "best_test": rand[:, 1].max(),
                               "test_of_best_val": rand[by_val, 1], "val_of_best_val": rand[by_val, 0],
                               "median_val": float(np.median(rand[:, 0])), "median_test": float(np.median(rand[:, 1])),
                               "ga_val_rank": int((rand[:, 0] > ga_val).sum()) + 1,
                               "ga_test_rank": int((rand[:, 1] > ga_test).sum()) + 1, "seconds": rand_seconds},
           "picks": picks, "uniform": uniform}
    if not args.no_write:
        save_run("bench_search", f"digits_{name}", res)
        if args.plot == ",".join(map(str, widths)):
            ref.plot(RESULTS_DIR / "pareto_digits.png", title=f"digits, TinyResNet{tuple(widths)}: accuracy vs BitOps",
                     ylabel="accuracy (front, star: predicted; markers: measured val)",
                     extra={"1000 random feasible, measured val": (rand_ops, rand[:, 0]),
                            "GA picks at other budgets, measured val": ([p["bitops"] for p in picks[:3]],
                                                                        [p["val"] for p in picks[:3]]),
                            "refine_search pick (W4A4 budget), measured val": ([ref.best.costs["bitops"]],
                                                                              [ref_val])})
    return res


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.2f}"


def _taus(r: dict) -> dict:
    """Each regressor's Kendall tau of its last (1000-record) fit."""
    return {t["regressor"]: t["kendall_tau"] for t in r["taus"]}


def _tau_cell(r: dict) -> str:
    t = _taus(r)
    return f"{t['ensemble']:.3f} / {t['gbt']:.3f} / {t['mlp']:.3f}; ~{r['noise_ceiling_full_tau']:.2f}"


def digits_report(results: list[dict]) -> list[str]:
    r0 = results[0]
    out = [f"Machine: {r0['machine']}. Digits at 8x8 (1797 images): validation = 40% (held-out training data: the "
           "records, the predictor, every choice), test = 20% (untouched); one validation image is 0.14 points, one "
           "test image 0.28. Full space (2..8 bits, both symmetries and granularities; first/last layer 8-bit); "
           f"BitOps <= the uniform W4A4 subnet's; {r0['n_records']} records, {r0['random_measured']['n']} random "
           "feasible subnets. Accuracies in %.", "",
           "| TinyResNet widths | CQAP tau, 200 held-out (ensemble / gbt / MLP; noise ceiling) | refine_search (30 "
           "measured): val / test | GA + measure_top(10): val / test | best of 1000 random by val: val / test | "
           "uniform W4A4 sym/channel: val / test | GA fit + 500 generations |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        ref, top, rm = r["refine"], r["ga_top"], r["random_measured"]
        u4 = next(u for u in r["uniform"] if u["subnet"].startswith("uniform W4A4"))
        search_s = {t["regressor"]: t for t in r["taus"]}[r["ga_regressor"]]["fit_seconds"] + r["ga"]["seconds"]
        out.append(f"| {tuple(r['widths'])} | {_tau_cell(r)} | {_pct(ref['val'])} / {_pct(ref['test'])} | "
                   f"{_pct(top['val'])} / {_pct(top['test'])} | {_pct(rm['val_of_best_val'])} / "
                   f"{_pct(rm['test_of_best_val'])} | {_pct(u4['val'])} / {_pct(u4['test'])} | {search_s:.0f} s |")
    out += ["", "`refine_search` run for more rounds: its best measured subnet against random search with as many "
            "validation measurements (median of 2000 draws from the measured random subnets):", "",
            "| validation measurements | " + " | ".join(f"{tuple(r['widths'])}: refine_search val / test | random: "
                                                        "val / test" for r in results) + " |",
            "|---:|" + "---|---|" * len(results)]
    for i, c0 in enumerate(results[0]["curve"]):
        cells = [f"{_pct(c['val'])} / {_pct(c['test'])} | {_pct(c['random']['median_val'])} / "
                 f"{_pct(c['random']['median_test'])}" for c in (r["curve"][i] for r in results)]
        out.append(f"| {c0['measured']} | " + " | ".join(cells) + " |")
    return out + ["", "![Pareto front, digits](benchmarks/results/pareto_digits.png)"]


def _best_dedicated(r: dict, bits: str) -> tuple[float | None, str]:
    d = {sch: r["dedicated"].get(f"{bits} {sch}") for sch in ("sym/tensor", "asym/tensor", "sym/channel")}
    d = {k: v for k, v in d.items() if v is not None}
    if not d:
        return None, ""
    k = max(d, key=d.get)
    return d[k], k


def _vs_dedicated(r: dict) -> list[tuple[str, float, float | None]]:
    """(budget, searched test, best dedicated test) of the W3A3 and W4A4 refine_search picks."""
    return [(b, r["main"][b]["refine"]["test"], _best_dedicated(r, b)[0]) for b in ("W3A3", "W4A4")]


def _minutes(r: dict) -> float:
    return (r["seconds"]["records"] + r["seconds"]["search"]) / 60


def fashion_report(results: list[dict]) -> list[str]:
    r0 = results[0]
    out = [f"Machine: {r0['machine']}. Supernets and dedicated runs: bench_supernet's `--budget fashion` (one per "
           f"model and split seed). Validation = {r0['val_images']} images held out of the 60,000 training images "
           f"(the records, the predictor, every choice); test = the official {r0['test_images']} t10k images, "
           "measured only for the chosen subnets (one image = 0.01 points). Every subnet is measured after BN "
           f"recalibration on {r0['bn_batches']} fixed training batches. {r0['n_records']} records; "
           "searches: `refine_search` (3 rounds x 10 measured) under BitOps <= the uniform W3A3, W4A4 and (tensorrt "
           "profile) W4A8 subnet's; random: the best by validation of the first 1000 feasible subnets of the "
           f"records' sampling stream. Records + searches in {r0['jobs']} worker processes. Accuracies in %.", "",
           "| model, seed | CQAP tau, 200 held-out (ensemble / gbt / MLP; noise ceiling) | searched - best-by-val "
           "random (W4A4, test) | records + searches (target 25 min) | whole run |",
           "|---|---|---|---|---|"]
    for r in results:
        rnd = r["main"]["W4A4"]["refine"]["test"] - r["random"]["test_of_best_val"]
        out.append(f"| {r['model']}, {r['seed']} | {_tau_cell(r)} | {100 * rnd:+.2f} | {_minutes(r):.1f} min | "
                   f"{r['seconds']['total'] / 60:.0f} min |")
    out += ["", "Searched mixed precision vs dedicated uniform LSQ QAT of the same BitOps (the best of its three "
            "schemes at that bit-width; at the tensorrt budget, dedicated W8A8 sym/channel at twice the BitOps):", "",
            "| model, seed | budget | searched: val / test | avg W / A bits | dedicated test (scheme) | "
            "searched - dedicated |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows = [(b, r["main"][b]["refine"], *_best_dedicated(r, b)) for b in ("W3A3", "W4A4")]
        rows.append(("W4A8, tensorrt", r["tensorrt"], r["dedicated"].get("W8A8 sym/channel"), "W8A8 sym/channel"))
        for b, x, d, sch in rows:
            diff = "n/a" if d is None else f"{100 * (x['test'] - d):+.2f}"
            out.append(f"| {r['model']}, {r['seed']} | {b} | {_pct(x['val'])} / {_pct(x['test'])} | "
                       f"{x['avg_weight_bits']:.2f} / {x['avg_act_bits']:.2f} | {_pct(d)} ({sch}) | {diff} |")
    links = " · ".join(f"[{r['model']}, seed {r['seed']}](benchmarks/results/{fashion_plot_name(r)})" for r in results)
    return out + ["", f"Pareto plots (test accuracy vs BitOps: searched front, uniform and dedicated subnets): {links}"]


def fashion_plot_name(r: dict) -> str:
    return f"pareto_fashion_{r['model']}_seed{r['seed']}.png"


def _headlines(digits: list[dict], fashion: list[dict]) -> list[str]:
    out = []
    if fashion:
        taus = ", ".join(f"{r['model']} seed {r['seed']} {_taus(r)['ensemble']:.3f}" for r in fashion)
        met = sum(_taus(r)["ensemble"] >= 0.85 for r in fashion)
        out.append(headline("Fashion-MNIST search: default CQAP's Kendall tau on 200 held-out subnets from 1000 "
                            "records (target 0.85)", f"{taus}: met on {met} of {len(fashion)}"))
        vs = [100 * (x - d) for r in fashion for _, x, d in _vs_dedicated(r) if d is not None]
        out.append(headline("Fashion-MNIST search: searched subnet vs the best dedicated uniform LSQ QAT run of the "
                            "same BitOps (W3A3 and W4A4 budgets, test)",
                            f"at or above it in {sum(v >= 0 for v in vs)} of {len(vs)}; {min(vs):+.2f} to "
                            f"{max(vs):+.2f} points"))
        mins = [_minutes(r) for r in fashion]
        out.append(headline("Fashion-MNIST search: records + searches on 2 cores (target 25 min)",
                            f"{min(mins):.1f}-{max(mins):.1f} min"))
    if digits:
        out.append(headline("Digits search: default CQAP's Kendall tau, 1000 records (target 0.85; noise ceiling)",
                            ", ".join(f"TinyResNet{tuple(r['widths'])} {_taus(r)['ensemble']:.3f} (ceiling "
                                      f"~{r['noise_ceiling_full_tau']:.2f})" for r in digits)))
    return out


def section(results: dict) -> str:
    """The whole `bench_search` section from benchmarks/results/bench_search.json."""
    digits = sorted((r for k, r in results.items() if k.startswith("digits_")), key=lambda r: -r["widths"][0])
    fashion = sorted((r for k, r in results.items() if k.startswith("fashion_")),
                     key=lambda r: (r["model"] != "tiny_resnet", r["model"], r["seed"]))
    doc = __doc__.split("\n\n")
    out = ["## bench_search", "", doc[0].strip(), "", "```", doc[2].strip(), "```", "", *_headlines(digits, fashion),
           ""]
    if fashion:
        out += ["### Fashion-MNIST (`--data fashion-mnist`)", "", *fashion_report(fashion), ""]
    if digits:
        out += ["### Digits", "", *digits_report(digits), ""]
    return "\n".join(out)


def write_section() -> None:
    text = section(load_results("bench_search"))
    print(text)
    update_section("bench_search", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="16,32,64", help="TinyResNet stage widths")
    ap.add_argument("--fresh", action="store_true", help="delete this model's cached supernet and records first")
    ap.add_argument("--no-write", action="store_true", help="write no results and do not touch BENCHMARKS.md")
    ap.add_argument("--epochs", type=int, default=20, help="supernet training epochs")
    ap.add_argument("--float-epochs", type=int, default=15)
    ap.add_argument("--random", type=int, default=1000, help="random feasible subnets to measure")
    ap.add_argument("--plot", default="4,8,16", help="widths whose Pareto plot goes to pareto_digits.png")
    ap.add_argument("--data", choices=("digits", "fashion-mnist"), default="digits")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild the BENCHMARKS.md section from benchmarks/results/bench_search.json")
    fm = ap.add_argument_group("fashion-mnist")
    fm.add_argument("--models", default="tiny_resnet,tiny_mobilenet_v2", help="comma-separated")
    fm.add_argument("--seed", type=int, default=0, help="split seed of the bench_supernet supernet")
    fm.add_argument("--jobs", type=int, default=2, help="worker processes measuring subnets (one thread each)")
    fm.add_argument("--smoke", action="store_true", help="a few records and generations; writes no results")
    fm.add_argument("--bn-batches", type=int, default=None,
                    help="BN recalibration batches of 64 (default: the checkpoint's, i.e. bench_supernet's)")
    fm.add_argument("--eval-batch", type=int, default=None, help="images per evaluation forward")
    fm.add_argument("--speed", type=int, default=0, metavar="N",
                    help="only time N subnets: train.evaluate vs this benchmark's measurement (writes nothing)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    if args.report_only:
        write_section()
    elif args.data == "fashion-mnist":
        main_fashion(args, log)
    else:
        widths = tuple(int(w) for w in args.widths.split(","))
        res = run_model(args, widths, log)
        log(f"done: {res['model']}")
        if args.no_write:
            print("\n".join(digits_report([res])))
            return
        write_section()


def main_fashion(args, log) -> None:
    import warnings as _w

    import _search_fashion as fs
    _w.filterwarnings("ignore", module="torch.ao")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in fs.MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {fs.MODELS}")
    missing = [m for m in models if not fs.checkpoint_path(m, args.seed).exists()]
    if missing:
        raise SystemExit(str(fs._missing(missing[0], args.seed)))
    if args.speed:
        for m in models:
            fs.speed(m, args.seed, args.speed, args.jobs, log, args.bn_batches)
        return
    for m in models:
        res = fs.run(m, args.seed, args.jobs, args.smoke, args.bn_batches, args.eval_batch or fs.EVAL_BATCH, log)
        if args.smoke:                  # results and plot go to the git-ignored run folder only
            out = fs.RUN_DIR / f"{m}_seed{args.seed}"
            (out / "smoke_result.json").write_text(json.dumps(res, indent=1, default=float))
            fs.plot(res, out / "smoke_pareto.png")
            print("\n".join(fashion_report([res])))
            continue
        save_run("bench_search", f"fashion_{m}_seed{args.seed}", res)
        fs.plot(res, RESULTS_DIR / fashion_plot_name(res))
    if not args.smoke:
        write_section()


if __name__ == "__main__":
    main()
