"""The Fashion-MNIST mode of bench_search.py (`--data fashion-mnist`): search on the supernets of bench_supernet.

Per model and split seed, on the supernet `bench_supernet.py --budget fashion --save-supernets` (`--budget fashion-x2`
for tiny_mobilenet_v2_x2, the twice-the-width model of its capacity check) trained and saved in
runs/bench_supernet/<model>_seed<seed>.pt (rebuilt here with the same recipe: 28x28 Fashion-MNIST, stride-2 stem,
`prepare_qat_fx` with the elastic qconfig mapping, `Supernet`, then the saved state_dict with its calibrated and
trained quantizer cells):

  1. Records: 1000 + 200 subnets drawn the paper's way (`collect_records`, resumable JSON lines under
     runs/bench_search_fashion/<model>_seed<seed>/), each measured on the validation split (10,000 images held out
     of the 60,000 training images by the seed) after BN recalibration on the same fixed training batches
     bench_supernet uses (`bn_batches_from(train, 16, 64, seed)`). Each record also keeps the accuracy on the even
     and the odd validation images (their Kendall tau over the 200 held-out records is the noise ceiling) and the
     mean probability of the true class (a lower-noise proxy of accuracy), also per half.
  2. CQAP (the default ensemble, its gradient-boosted trees alone and the paper's MLP) fitted on the first 250 /
     500 / 1000 records, Kendall tau on the last 200.
  3. Search under BitOps <= uniform W3A3 and W4A4 (default space) and <= uniform W4A8 (tensorrt profile, its own
     lowest uniform budget): 3 rounds of (refit CQAP on records + measured, genetic search, measure its 10 best
     predicted on validation), best measured on validation kept (`refine_search`'s rule). Picks at W2A2 / W5A5 /
     W6A6 / W8A8 budgets complete the Pareto front. Only picks (and step 5's subnets) are measured on test.
  4. Random search: the first 1000 subnets of the same sampling stream (record indices 0, 1, 2, ...) that meet the
     W4A4 budget, best by validation accuracy, measured on test. Records meeting the budget are part of it
     (same draw, same measurement).
  5. The supernet's uniform subnets (W2A2 ... W8A8, three schemes) on test, the dedicated LSQ QAT runs of
     bench_supernet (same model, seed, QAT steps and float epochs; benchmarks/results/bench_supernet.json) and the
     searched front in one Pareto plot (benchmarks/results/pareto_fashion_<model>_seed<seed>.png).

Evaluation (the bottleneck): the library's `SubnetMeasurer` (one for validation, one for test, each cached in a
JSON-lines file of the run directory) with `--jobs` worker processes (one thread each, each with its own copy of
the supernet) measures subnets in parallel; for each split a subnet's BN statistics are re-estimated, then the
split runs in batches of `EVAL_BATCH` images. The accuracies equal `eqnet_plugin.train.evaluate` with the
1000-image loaders of bench_supernet bit for bit (`--speed` checks this and times both).
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, load_results, machine  # noqa: E402

MODELS = ("tiny_resnet", "tiny_mobilenet_v2", "tiny_mobilenet_v2_x2")   # _x2: bench_supernet's capacity check
SUPERNET_DIR = ROOT / "runs" / "bench_supernet"
RUN_DIR = ROOT / "runs" / "bench_search_fashion"
EVAL_BATCH = 250            # images per eval forward: the activations stay in cache (`--speed` times it vs 1000)
RECORD_SEED = 0             # sampling seed of the records stream (record i: rng([RECORD_SEED, i]))
FULL = {"train": 1000, "held": 200, "sizes": (250, 500, 1000), "random": 1000, "generations": 500, "rounds": 3,
        "k": 10, "front_k": 5}
SMOKE = {"train": 16, "held": 8, "sizes": (8, 16), "random": 12, "generations": 10, "rounds": 1, "k": 2, "front_k": 1}
SCHEMES = {"sym/tensor": (True, False), "asym/tensor": (False, False), "sym/channel": (True, True)}
UNIFORM_BITS = (2, 3, 4, 8)
FRONT_BITS = (2, 5, 6, 8)   # extra budgets (uniform WbAb BitOps) for the searched front; W3A3 / W4A4 are the main ones


def checkpoint_path(model: str, seed: int) -> Path:
    return SUPERNET_DIR / f"{model}_seed{seed}.pt"


def supernet_budget(model: str) -> str:
    """The bench_supernet budget that trains `model`'s supernets and dedicated runs: fashion, or fashion-x2 for the
    twice-the-width TinyMobileNetV2 of the capacity check."""
    import bench_supernet as B
    return next(b for b in ("fashion", "fashion-x2") if model in B.BUDGETS[b]["models"])


def _missing(model: str, seed: int) -> SystemExit:
    return SystemExit(
        f"no saved supernet {checkpoint_path(model, seed)}: train it with\n"
        f"    python benchmarks/bench_supernet.py --budget {supernet_budget(model)} --models {model} --seeds {seed} "
        "--save-supernets "
        "--supernet-only\n"
        "(bench_supernet writes runs/bench_supernet/<model>_seed<seed>.pt; for a quick stand-in, --budget "
        "fashion-small --save-supernets --no-ablations)")


class Context:
    """One process's supernet, data and BN batches, and the measurement of one subnet."""

    def __init__(self, model: str, seed: int, bn_batches: int | None = None, eval_batch: int = EVAL_BATCH) -> None:
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        import eqnet_plugin as eq
        from eqnet_plugin.app.data import fashion_mnist_splits, make_loaders
        from eqnet_plugin.app.models import build_model
        from eqnet_plugin.train import bn_batches_from

        path = checkpoint_path(model, seed)
        if not path.exists():
            raise _missing(model, seed)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.model_name, self.seed, self.eval_batch = model, seed, int(eval_batch)
        self.saved_bn = int(saved.get("bn_batches", 16))     # bench_supernet's BN recalibration batches
        self.n_bn = int(bn_batches or self.saved_bn)
        self.steps = int(saved["steps"])                    # QAT steps the supernet was trained for
        self.float_epochs = int(saved["float_epochs"])      # ... from a float start this long
        self.optimizer = str(saved["optimizer"])            # ... with one Adam state per subnet
        self.reported = saved.get("supernet_test")      # bench_supernet's test accuracies of the uniform subnets
        # bench_supernet's recipe (the checkpoint may name it; these are the fashion budget's values): data, loaders
        # and BN batches (seeded), so every number is measured the same way
        batch = int(saved.get("batch_size", 64))
        splits = fashion_mnist_splits(image_size=int(saved.get("image_size", 28)), seed=seed, val_size=10000)
        self.train, self.val, self.test = make_loaders(splits, batch, seed=seed, eval_batch_size=1000)
        self.bn = bn_batches_from(self.train.dataset, self.n_bn, batch, seed=seed)
        torch.manual_seed(seed)
        float_model = build_model(model, stem_stride=int(saved.get("stem_stride", 2)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bc = eq.elastic_backend_config() if "mobilenet" in model else None
            gm = prepare_qat_fx(float_model, eq.elastic_qconfig_mapping(), (self.bn[0][0],), backend_config=bc)
        self.sn = eq.Supernet(gm)
        self.sn.model.load_state_dict(saved["state_dict"])          # strict: the same architecture and cells
        self.sn.mark_bn_trained()
        if not self.sn.is_calibrated():
            raise SystemExit(f"{path} holds uncalibrated quantizers; it was not saved by bench_supernet")
        self.data = {"val": self.val.dataset.tensors, "test": self.test.dataset.tensors}
        if saved.get("test_images") != len(self.data["test"][1]):
            self.reported = None                          # measured on another test subset (e.g. limit_test)

    @torch.no_grad()
    def logits(self, split: str, sn=None) -> torch.Tensor:
        model = (self.sn if sn is None else sn).model
        x = self.data[split][0]
        b = self.eval_batch
        return torch.cat([model(x[i:i + b]) for i in range(0, len(x), b)])

    @torch.no_grad()
    def measure(self, cfg, splits=("val",), sn=None) -> dict:
        """BN recalibrated once for `cfg`, then its metrics on each split: val -> accuracy (+ halves, true-class
        probability), test -> test accuracy. Mode and cells are restored afterwards; the BN buffers keep `cfg`'s
        statistics (the supernet remembers them for `cfg`, as after `Supernet.recalibrate_bn`). `sn`: another
        supernet measured the same way (default: this context's)."""
        sn = self.sn if sn is None else sn
        t, w = time.process_time(), time.perf_counter()
        out = {}
        with sn.activate(cfg):
            sn.recalibrate_bn(self.bn)
            was = sn.model.training
            sn.model.eval()
            try:
                for split in splits:
                    y = self.data[split][1]
                    logits = self.logits(split, sn)                                         # (N, 10)
                    ok = (logits.argmax(1) == y).double()
                    if split == "test":
                        out["test"] = float(ok.mean())
                        continue
                    prob = logits.softmax(1).gather(1, y[:, None])[:, 0].double()
                    out.update(accuracy=float(ok.mean()), acc_even=float(ok[0::2].mean()),
                               acc_odd=float(ok[1::2].mean()), true_prob=float(prob.mean()),
                               prob_even=float(prob[0::2].mean()), prob_odd=float(prob[1::2].mean()))
            finally:
                sn.model.train(was)
        out["cpu_seconds"] = time.process_time() - t
        out["seconds"] = time.perf_counter() - w
        return out

    def evaluate(self, split: str):
        """`measure` of one split as a `SubnetMeasurer` wants it: cfg -> metrics with the split's accuracy under
        ``"accuracy"``."""
        def run(cfg) -> dict:
            m = self.measure(cfg, (split,))
            return {"accuracy": m.pop("test"), **m} if split == "test" else m
        return run


def worker_evaluate(model: str, seed: int, bn_batches: int | None, eval_batch: int, split: str):
    """Called once in each worker process of a `SubnetMeasurer`: its own `Context`, measuring `split`."""
    warnings.filterwarnings("ignore")
    return Context(model, seed, bn_batches, eval_batch).evaluate(split)


class Measurers:
    """This benchmark's two `eqnet_plugin.search.SubnetMeasurer`s (validation and test), each with `jobs` worker
    processes and its own cache file, so an interrupted run repeats no measurement. `many(cfgs, test=True)` adds
    the test accuracy under ``"test"`` to the validation metrics."""

    def __init__(self, ctx: Context, jobs: int, cache_dir: Path, tag: str) -> None:
        from functools import partial

        from eqnet_plugin.search import SubnetMeasurer
        self.val, self.test = (
            SubnetMeasurer(ctx.evaluate(split), jobs=jobs, cache_path=cache_dir / f"measured_{split}_{tag}.jsonl",
                           worker_evaluate=partial(worker_evaluate, ctx.model_name, ctx.seed, ctx.n_bn,
                                                   ctx.eval_batch, split))
            for split in ("val", "test"))

    @property
    def count(self) -> int:                    # measurements made by this run (not from the caches)
        return self.val.count + self.test.count

    @property
    def seconds(self) -> float:                # wall time spent measuring
        return self.val.seconds + self.test.seconds

    def close(self) -> None:
        self.val.close()
        self.test.close()

    def many(self, cfgs, test: bool = False) -> list[dict]:
        cfgs = list(cfgs)
        vals = self.val.many(cfgs)
        if not test:
            return vals
        return [{**v, "test": t["accuracy"]} for v, t in zip(vals, self.test.many(cfgs))]

    def one(self, cfg, test: bool = False) -> dict:
        return self.many([cfg], test)[0]


# --- the benchmark ---------------------------------------------------------------------------------------------
def _uniform_configs(sn) -> dict:
    return {f"W{b}A{b} {s}": sn.uniform(b, b, symmetric=sym, per_channel=pc)
            for b in UNIFORM_BITS for s, (sym, pc) in SCHEMES.items()}


def _dedicated(model: str, seed: int, steps: int, float_epochs: int) -> tuple[dict, dict]:
    """(dedicated test accuracies, the supernet's own uniform test accuracies) of bench_supernet, same model, seed
    and budget (QAT steps, float epochs) as the searched supernet; empty when its results file has no such run."""
    for r in load_results("bench_supernet").get(supernet_budget(model), {}).get("runs", []):
        if (r["model"] == model and r["seed"] == seed and r["steps"] == steps
                and r["recipe"]["float_epochs"] == float_epochs):
            return dict(r.get("dedicated", {})), dict(r.get("supernet", {}))
    return {}, {}


def refine(cqap, records, measurer: Measurers, space, cons, cm, p: dict):
    """`refine_search` on the validation measurer (its k measurements per round run in parallel). Returns (last
    SearchResult, ranked measured candidates)."""
    from eqnet_plugin.search import EvolutionConfig, RefineConfig, refine_search
    res = refine_search(cqap, records, measurer.val, space, cons,
                        RefineConfig(p["rounds"], p["k"], EvolutionConfig(generations=p["generations"])), cost_model=cm)
    return res, list(res.top)


def _pick(label: str, cand, measurer: Measurers, cm, extra: dict | None = None) -> dict:
    m = measurer.one(cand.config, test=True)
    costs = cm(cand.config).to_dict()
    return {"search": label, **costs, "predicted": cand.predicted_accuracy, "val": m["accuracy"],
            "test": m["test"], "config": cand.config.to_dict(), **(extra or {})}


def run(model: str, seed: int, jobs: int, smoke: bool, bn_batches: int | None, eval_batch: int, log) -> dict:
    from _search_stats import equal_budget, tau_ceiling

    from eqnet_plugin.search import (
        CQAP,
        CostModel,
        EvolutionConfig,
        RecordsConfig,
        Regressor,
        SearchSpace,
        collect_records,
        evolution_search,
        kendall_tau,
    )
    from eqnet_plugin.search.records import load_records, sample_config, supernet_fingerprint

    p = SMOKE if smoke else FULL
    t_start = time.perf_counter()
    ctx = Context(model, seed, bn_batches, eval_batch)
    sn = ctx.sn
    fp = supernet_fingerprint(sn)
    run_dir = RUN_DIR / f"{model}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{fp[:12]}_bn{ctx.n_bn}"               # a new supernet or BN recipe gets new files, never mixed
    measurer = Measurers(ctx, jobs, run_dir, tag)
    cm = CostModel.from_supernet(sn, ctx.data["val"][0][:1])
    space = SearchSpace.from_supernet(sn)
    log(f"{model} seed {seed}: supernet {checkpoint_path(model, seed)} (fingerprint {fp[:12]}), BN recalibration "
        f"on {ctx.n_bn} x 64 training images, {jobs} worker process(es); setup {time.perf_counter() - t_start:.0f} s")
    try:
        # --- records ---------------------------------------------------------------------------------------
        n = p["train"] + p["held"]
        rec_path = run_dir / f"records_{tag}.jsonl"
        have = len(load_records(rec_path)) if rec_path.exists() else 0
        t = time.perf_counter()
        # the validation measurer learns the records' accuracies: the random pool reuses them
        recs = collect_records(sn, measurer.val, n, rec_path, RecordsConfig(seed=RECORD_SEED, fingerprint=fp),
                               cost_model=cm,
                               progress=lambda i, r: (i + 1) % 100 == 0 and log(f"records: {i + 1} of {n}"))
        rec_seconds = time.perf_counter() - t
        new_recs = n - have
        cpu = [r.metrics.get("cpu_seconds", float("nan")) for r in recs[have:]]
        log(f"records: {new_recs} measured in {rec_seconds:.0f} s ({have} reused); cpu per subnet "
            f"{np.nanmean(cpu) if cpu else float('nan'):.2f} s")

        # --- CQAP ranking ----------------------------------------------------------------------------------
        train_recs, held = recs[:p["train"]], recs[p["train"]:]
        held_cfg = [r.config for r in held]
        held_acc = [r.accuracy for r in held]
        ceiling = kendall_tau([r.metrics["acc_even"] for r in held], [r.metrics["acc_odd"] for r in held])
        prob_ceiling = kendall_tau([r.metrics["prob_even"] for r in held], [r.metrics["prob_odd"] for r in held])
        taus = []
        for regressor in (Regressor.MLP, Regressor.GBT, Regressor.ENSEMBLE):   # the default drives the searches
            for k in p["sizes"]:
                t = time.perf_counter()
                cq = CQAP(space, seed=0, regressor=regressor).fit([r.config for r in train_recs[:k]],
                                                                  [r.accuracy for r in train_recs[:k]])
                fit_s = time.perf_counter() - t
                taus.append({**cq.evaluate(held_cfg, held_acc), "records": k, "fit_seconds": fit_s,
                             "regressor": regressor.value})
                log(f"CQAP {regressor.value} n={k}: tau {taus[-1]['kendall_tau']:.3f} (noise ceiling: split-half tau "
                    f"{ceiling:.3f}, full-split ~{tau_ceiling(ceiling):.2f}) fit {fit_s:.1f} s")
        soft = CQAP(space, seed=0).fit([r.config for r in train_recs], [r.metrics["true_prob"] for r in train_recs])
        soft_m = soft.evaluate(held_cfg, [r.metrics["true_prob"] for r in held])
        soft_vs_acc = kendall_tau(soft.predict(held_cfg), held_acc)
        log(f"true-prob CQAP: tau {soft_m['kendall_tau']:.3f} vs true-prob (ceiling {prob_ceiling:.3f}), "
            f"{soft_vs_acc:.3f} vs top-1")

        # --- searches --------------------------------------------------------------------------------------
        t_search = time.perf_counter()
        limits = {b: cm(sn.uniform(b, b)).bitops for b in sorted(set(UNIFORM_BITS + FRONT_BITS))}
        main = {}
        ga_seconds = []
        t = time.perf_counter()
        cq_all = CQAP(space, seed=0).fit([r.config for r in train_recs], [r.accuracy for r in train_recs])
        fit_seconds = time.perf_counter() - t
        for b in (3, 4):
            cons = {"max_bitops": limits[b]}
            t = time.perf_counter()
            ga = evolution_search(cq_all, space, cons, EvolutionConfig(generations=p["generations"]), cost_model=cm)
            ga_seconds.append(time.perf_counter() - t)
            _, ranked = refine(CQAP(space, seed=0), train_recs, measurer, space, cons, cm, p)
            ga_label = f"W{b}A{b} budget, GA ({cq_all.regressor.value} CQAP-{len(train_recs)}), best predicted"
            main[b] = {"ga": _pick(ga_label, ga.best, measurer, cm,
                                   {"seconds": ga_seconds[-1], "evaluations": ga.evaluations}),
                       "refine": _pick(f"W{b}A{b} budget, refine ({p['rounds']} x {p['k']} measured)", ranked[0],
                                       measurer, cm,
                                       {"measured": len(ranked)}),
                       "limit": limits[b]}
            log(f"W{b}A{b} budget: GA pick val {main[b]['ga']['val']:.4f} test {main[b]['ga']['test']:.4f} "
                f"({ga_seconds[-1]:.1f} s); refine pick val {main[b]['refine']['val']:.4f} test "
                f"{main[b]['refine']['test']:.4f}")
        trt_space = SearchSpace.from_supernet(sn, "tensorrt")
        trt_limit = cm(sn.uniform(4, 8, per_channel=True)).bitops
        _, trt_ranked = refine(CQAP(space, seed=0), train_recs, measurer, trt_space, {"max_bitops": trt_limit}, cm, p)
        trt = _pick(f"tensorrt profile, refine ({p['rounds']} x {p['k']})", trt_ranked[0], measurer, cm,
                    {"limit": trt_limit, "measured": len(trt_ranked)})
        log(f"tensorrt, W4A8 budget: val {trt['val']:.4f} test {trt['test']:.4f}")
        front = []
        for b in FRONT_BITS:
            res = evolution_search(cq_all, space, {"max_bitops": limits[b]},
                                   EvolutionConfig(generations=p["generations"]), cost_model=cm)
            top = res.top[:p["front_k"]]
            accs = [m["accuracy"] for m in measurer.many([c.config for c in top])]
            best = top[int(np.argmax(accs))]                               # first (best predicted) wins ties
            front.append(_pick(f"W{b}A{b} budget, GA + best of {p['front_k']} measured", best, measurer, cm,
                               {"limit": limits[b]}))
        front += [dict(main[b]["refine"], limit=limits[b]) for b in (3, 4)]
        front.sort(key=lambda f: f["limit"])
        search_seconds = time.perf_counter() - t_search
        log(f"searches done in {search_seconds:.0f} s")

        # --- random search from the records stream ---------------------------------------------------------
        t = time.perf_counter()
        pool_cfgs, i = [], 0
        while len(pool_cfgs) < p["random"] and i < 200 * p["random"]:
            c = recs[i].config if i < len(recs) else sample_config(space, RECORD_SEED, i)
            if cm(c).bitops <= limits[4]:
                pool_cfgs.append(c)
            i += 1
        pool = np.array([m["accuracy"] for m in measurer.many(pool_cfgs)])
        by_val = int(np.argmax(pool))
        rnd_best = measurer.one(pool_cfgs[by_val], test=True)
        rand_seconds = time.perf_counter() - t
        rec_cfgs = {r.config for r in recs}
        from_records = sum(1 for c in pool_cfgs if c in rec_cfgs)
        log(f"random: {len(pool_cfgs)} feasible of the first {i} stream subnets ({from_records} of them records) "
            f"in {rand_seconds:.0f} s; best val {pool[by_val]:.4f}, its test {rnd_best['test']:.4f}")
        w3 = [j for j, c in enumerate(pool_cfgs) if cm(c).bitops <= limits[3]]
        rnd3 = None
        if w3:
            j = max(w3, key=lambda j: (pool[j], -j))
            rnd3 = {"n": len(w3), "val": float(pool[j]), "test": measurer.one(pool_cfgs[j], test=True)["test"]}
        ref4 = main[4]["refine"]
        random_res = {"n": len(pool_cfgs), "stream_draws": i, "from_records": from_records,
                      "val_of_best_val": float(pool[by_val]), "test_of_best_val": rnd_best["test"],
                      "median_val": float(np.median(pool)), "seconds": rand_seconds,
                      "refine_val_rank": int((pool > ref4["val"]).sum()) + 1,
                      "equal_budget": equal_budget(np.stack([pool, np.full_like(pool, np.nan)], 1),
                                                   min(ref4["measured"], len(pool)), (ref4["val"], float("nan"))),
                      "w3a3": rnd3}

        # --- uniform subnets and the dedicated runs --------------------------------------------------------
        t = time.perf_counter()
        ucfg = _uniform_configs(sn)
        um = measurer.many(list(ucfg.values()), test=True)
        uniform = [{"subnet": k, "bitops": cm(c).bitops, "val": m["accuracy"], "test": m["test"]}
                   for (k, c), m in zip(ucfg.items(), um)]
        dedicated, sn_reported = _dedicated(model, seed, ctx.steps, ctx.float_epochs)
        # bench_supernet's own test accuracies of these subnets (should be equal: same supernet, BN batches and
        # test images): from the checkpoint when it holds them, else from its results file when the READY marker
        # says that file and the checkpoint come from the same finished run
        if ctx.reported is not None and ctx.n_bn == ctx.saved_bn:
            sn_reported = dict(ctx.reported)          # saved with the checkpoint: the same supernet for sure
        elif not (SUPERNET_DIR / "READY").exists():
            sn_reported = {}
        consistency = {u["subnet"]: u["test"] - sn_reported[u["subnet"]] for u in uniform
                       if u["subnet"] in sn_reported}
        uniform_seconds = time.perf_counter() - t
        total = time.perf_counter() - t_start
        log(f"uniform subnets in {uniform_seconds:.0f} s; total {total:.0f} s ({measurer.count} subnets measured "
            "by this run)")
    finally:
        measurer.close()

    return {"model": model, "seed": seed, "fingerprint": fp, "supernet_steps": ctx.steps,
            "supernet_float_epochs": ctx.float_epochs, "supernet_optimizer": ctx.optimizer, "machine": machine(),
            "jobs": jobs, "smoke": smoke,
            "settings": p, "bn_batches": ctx.n_bn, "eval_batch": ctx.eval_batch, "n_records": len(recs),
            "val_images": len(ctx.data["val"][1]), "test_images": len(ctx.data["test"][1]),
            "records_measured_this_run": new_recs, "record_seconds_this_run": rec_seconds,
            "record_cpu_seconds_mean": float(np.nanmean(cpu)) if cpu else None,
            # every record keeps its own measurement time, so a run on reused records still knows their cost
            "record_cpu_seconds_all": float(sum(r.metrics.get("cpu_seconds", float("nan")) for r in recs)),
            "record_wall_seconds_all": float(sum(r.metrics.get("seconds", float("nan")) for r in recs)) / jobs,
            "taus": taus, "noise_ceiling_tau": ceiling, "noise_ceiling_full_tau": tau_ceiling(ceiling),
            "true_prob_cqap": {**soft_m, "ceiling_tau": prob_ceiling, "tau_vs_top1": soft_vs_acc,
                               "regressor": soft.regressor.value},
            "limits": {f"W{b}A{b}": v for b, v in limits.items()}, "full_bitops": cm(sn.max_config()).bitops,
            "main": {f"W{b}A{b}": v for b, v in main.items()}, "tensorrt": trt, "front": front,
            "random": random_res, "uniform": uniform, "dedicated": dedicated,
            "bench_supernet_consistency": consistency,
            "seconds": {"records": rec_seconds, "search": search_seconds, "random": rand_seconds,
                        "uniform": uniform_seconds, "total": total, "measuring": measurer.seconds,
                        "ga": ga_seconds, "cqap_fit": fit_seconds},
            "measured_this_run": measurer.count}


# --- plot ------------------------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.0, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    f = sorted(res["front"], key=lambda x: x["bitops"])
    ax.plot([x["bitops"] / 1e6 for x in f], [100 * x["test"] for x in f], "-o", c="tab:blue", ms=5,
            label="searched (default space), test")
    t = res["tensorrt"]
    ax.scatter([t["bitops"] / 1e6], [100 * t["test"]], marker="*", s=140, c="tab:red", zorder=5,
               label="searched (tensorrt profile), test")
    for i, s in enumerate(SCHEMES):
        u = [x for x in res["uniform"] if x["subnet"].endswith(s)]
        ax.scatter([x["bitops"] / 1e6 for x in u], [100 * x["test"] for x in u], marker="s", s=28,
                   facecolors="none", edgecolors=f"C{i + 2}", label=f"supernet uniform {s}")
        d = [(x["bitops"], res["dedicated"][x["subnet"]]) for x in u if x["subnet"] in res["dedicated"]]
        if d:
            ax.scatter([b / 1e6 for b, _ in d], [100 * a for _, a in d], marker="x", s=40, c=f"C{i + 2}",
                       label=f"dedicated LSQ QAT {s}")
    r = res["random"]
    ax.axvline(res["limits"]["W4A4"] / 1e6, ls=":", c="0.5", lw=1)
    ax.axvline(res["limits"]["W3A3"] / 1e6, ls=":", c="0.5", lw=1)
    ax.axhline(100 * r["test_of_best_val"], ls="--", c="0.6", lw=1,
               label=f"best-by-val of {r['n']} random (W4A4 budget), test")
    ax.set_xscale("log")
    ax.set_xticks([v / 1e6 for v in res["limits"].values()],
                  [f"{v / 1e6:.1f}\n{k}" for k, v in res["limits"].items()], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("BitOps (millions, log scale; ticks at the uniform subnets' BitOps)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {res['model']} (seed {res['seed']}): test accuracy vs BitOps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def speed(model: str, seed: int, n: int, jobs: int, log, bn_batches: int | None = None) -> dict:
    """Time `eqnet_plugin.train.evaluate` (bench_supernet's loader of 1000 images) against this benchmark's
    measurement (batches of `EVAL_BATCH`) on the same `n` subnets in this process (one thread), checking that both
    give identical accuracies; then how far fewer BN recalibration batches move the accuracy, and the wall time per
    subnet of `jobs` worker processes. CPU seconds (process time) are reported next to wall seconds: on a shared
    machine they are the fairer comparison."""
    from eqnet_plugin.search import SearchSpace
    from eqnet_plugin.search.records import sample_config
    from eqnet_plugin.train import evaluate
    ctx = Context(model, seed, bn_batches)
    space = SearchSpace.from_supernet(ctx.sn)
    cfgs = [sample_config(space, 12345, i) for i in range(n)]
    times = {"train.evaluate": [], f"batch {ctx.eval_batch}": []}
    accs, bn_delta = [], {}
    for c in cfgs:
        t, w = time.process_time(), time.perf_counter()
        a = evaluate(ctx.sn, c, ctx.val, ctx.bn)
        times["train.evaluate"].append((time.process_time() - t, time.perf_counter() - w))
        m = ctx.measure(c)
        times[f"batch {ctx.eval_batch}"].append((m["cpu_seconds"], m["seconds"]))
        assert m["accuracy"] == a, (a, m["accuracy"])
        accs.append(a)
        full = ctx.bn                                   # fewer BN recalibration batches: how far do accuracies move?
        for nb in sorted({max(1, ctx.n_bn // 2), max(1, ctx.n_bn // 4)}, reverse=True):
            ctx.bn = full[:nb]
            m = ctx.measure(c)
            times.setdefault(f"batch {ctx.eval_batch}, {nb} BN batches", []).append((m["cpu_seconds"], m["seconds"]))
            bn_delta.setdefault(nb, []).append(m["accuracy"] - a)
        ctx.bn = full
    for nb, d in bn_delta.items():
        log(f"{model}: BN recalibration on {nb} instead of {ctx.n_bn} batches moves validation accuracy by "
            f"{100 * np.mean(np.abs(d)):.2f} points on average (largest {100 * np.max(np.abs(d)):.2f}) over {n} "
            "subnets")
    base = np.mean([c for c, _ in times["train.evaluate"]])
    out = {"model": model, "n": n}
    for k, v in times.items():
        cpu, wall = np.mean([c for c, _ in v]), np.mean([w for _, w in v])
        out[k] = {"cpu": cpu, "wall": wall}
        log(f"{model}: {k}: {cpu:.2f} CPU s ({wall:.2f} wall s) per subnet, {base / cpu:.2f}x train.evaluate's "
            f"CPU time" + ("" if "BN batches" in k else f"; identical accuracy on all {n}"))
    if jobs > 1:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            ms = Measurers(ctx, jobs, Path(d), "speed")
            try:
                ms.many([sample_config(space, 54321, i) for i in range(jobs)])      # start the workers first
                t = time.perf_counter()
                got = ms.many(cfgs)
                wall = time.perf_counter() - t
            finally:
                ms.close()
        assert [g["accuracy"] for g in got] == accs
        out["workers"] = {"jobs": jobs, "wall": wall / n}
        log(f"{jobs} worker processes: {wall / n:.2f} wall s per subnet, identical accuracy on all {n}; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)")
    # projection for the full run: how many subnets it measures, at this CPU time per subnet, on `jobs` cores
    from eqnet_plugin.search import CostModel
    cm = CostModel.from_supernet(ctx.sn, ctx.data["val"][0][:1])
    p = FULL
    n_rec = p["train"] + p["held"]
    lim = cm(ctx.sn.uniform(4, 4)).bitops
    feasible, i = [], 0
    while len(feasible) < p["random"]:
        if cm(sample_config(space, RECORD_SEED, i)).bitops <= lim:
            feasible.append(i)
        i += 1
    extra = sum(1 for j in feasible if j >= n_rec)
    search = 3 * p["rounds"] * p["k"] + len(FRONT_BITS) * p["front_k"] + 8     # upper bound: + picks on test
    uniform = 2 * len(UNIFORM_BITS) * len(SCHEMES)                                 # val and test
    total = n_rec + extra + search + uniform
    cpu = out[f"batch {ctx.eval_batch}"]["cpu"]
    ref = out["train.evaluate"]["cpu"]
    out["projection"] = {"records": n_rec, "random_extra": extra, "search": search, "uniform": uniform,
                         "total": total, "cpu_per_subnet": cpu, "jobs": max(jobs, 1),
                         "wall_seconds": total * cpu / max(jobs, 1), "wall_seconds_train_evaluate": total * ref}
    log(f"{model}: a full run measures about {total} subnets ({n_rec} records, {extra} more for the random pool: "
        f"{len(feasible)} of the first {i} stream subnets meet W4A4, {len(feasible) - extra} of them records; <= "
        f"{search} for the searches, {uniform} for the uniform subnets): at {cpu:.2f} CPU s each on {max(jobs, 1)} "
        f"idle cores ~{total * cpu / max(jobs, 1) / 60:.0f} min (train.evaluate on one thread: "
        f"~{total * ref / 60:.0f} min)")
    out["load_average"] = os.getloadavg()[0]
    return out
