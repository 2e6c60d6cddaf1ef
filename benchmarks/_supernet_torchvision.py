"""The torchvision mode of bench_supernet.py (`--budget torchvision`): ResNet-18 and MobileNetV2 at full width.

``torchvision.models.resnet18(num_classes=10)`` and ``torchvision.models.mobilenet_v2(num_classes=10)``, unmodified:
Fashion-MNIST's 1-channel 28x28 images are repeated to 3 channels (as `eqnet train` does for RGB stems) and kept at
28x28, so the models see their own stems (ResNet-18's 7x7 stride-2 conv and max-pool, MobileNetV2's stride-2 conv;
the last stage runs at 1x1). Prepared as a user does: ``prepare_qat_fx(model, elastic_qconfig_mapping(), example,
backend_config=...)`` with `elastic_backend_config()` for MobileNetV2 (its ReLU6 patterns), then `Supernet`.

Per split seed and model, in this order, each a unit whose result is saved to benchmarks/results/bench_supernet.json
as soon as it finishes (a rerun skips finished units, so the benchmark resumes run by run across sessions):
  1. float: the float start (Adam, cosine, `FLOAT_EPOCHS` epochs); its test accuracy and a fingerprint of its
     weights (a later session retrains it bit for bit from the same seed, or says that it could not).
  2. supernet: the calibrated float start (`Supernet.calibrate` on the fixed BN batches) trained as ONE supernet
     (`SubnetOptimizer` + `SandwichConfig()`, the README's recipe), its subnets at the reference configs on test,
     then the search as `eqnet search` runs it: records on validation, CQAP, `refine_search`, under the BitOps of
     uniform W3A3 and of W4A4; the chosen subnets measured on test.
  3. one dedicated LSQ QAT run per reference config from the same calibrated start, same per-step recipe and batches.
Timings: wall and CPU seconds of each training run (the float start and calibration excluded). The 12-run
comparison of the target is 12 x the mean dedicated run time measured here (5 configs are trained).
"""
from __future__ import annotations

import copy
import hashlib
import os
import statistics
import time
import types
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from eqnet_plugin import Supernet, elastic_backend_config, elastic_qconfig_mapping
from eqnet_plugin.app.data import fashion_mnist_splits, make_loaders
from eqnet_plugin.app.models import build_model
from eqnet_plugin.app.pipeline.search import SearchSettings, search_experiment
from eqnet_plugin.search import CostModel
from eqnet_plugin.train import (QATConfig, SandwichConfig, TrainConfig, accuracy, bn_batches_from, cosine_scheduler,
                                evaluate, lsq_qat, train_float, train_supernet)
from eqnet_plugin.train.optim import SubnetOptimizer

from _report import headline, load_results, machine, save_run

MODELS = ("resnet18", "mobilenet_v2")
SEEDS = (0, 1)
CONFIGS = {"W8A8 sym/channel": (8, True, True), "W4A4 sym/channel": (4, True, True),
           "W3A3 sym/channel": (3, True, True), "W2A2 sym/tensor": (2, True, False),
           "W4A4 asym/tensor": (4, False, False)}
TARGETS = {8: 0.3, 4: 0.3, 3: 1.0, 2: 2.0}                         # dedicated - supernet, points, mean of seeds
SEARCH_BUDGETS = {"W3A3": 3, "W4A4": 4}                             # searched MP at these uniform BitOps
RECIPE = dict(data="fashion-mnist", image_size=28, channels=3, batch_size=64, lr=1e-3, float_lr=1e-3,
              float_epochs=6, steps=1500, bn_batches=16, val_size=10000, search_records=60, search_top_k=5,
              search_rounds=2)
SMOKE = dict(RECIPE, float_epochs=1, float_max_steps=3, steps=3, search_records=4, search_top_k=1, search_rounds=1)
RUNS_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench_supernet_torchvision"      # git-ignored
KEY = "torchvision"


def _rgb(ds: TensorDataset, channels: int) -> TensorDataset:
    x, y = ds.tensors
    return TensorDataset(x.expand(-1, channels, -1, -1).contiguous(), y)


def data(seed: int, r: dict):
    s = fashion_mnist_splits(image_size=r["image_size"], seed=seed, val_size=r["val_size"])
    s = types.SimpleNamespace(train=_rgb(s.train, r["channels"]), val=_rgb(s.val, r["channels"]),
                              test=_rgb(s.test, r["channels"]))
    return make_loaders(s, r["batch_size"], seed=seed, eval_batch_size=1000)


def prepare(model: torch.nn.Module, example: torch.Tensor) -> Supernet:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    bc = elastic_backend_config() if "mobilenet" in type(model).__name__.lower() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Supernet(prepare_qat_fx(copy.deepcopy(model), elastic_qconfig_mapping(), (example,),
                                       backend_config=bc))


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Bench:
    """The recorded entry (`bench_supernet.json`, key ``torchvision``) and the units that fill it."""

    def __init__(self, device: str, log, *, smoke: bool = False, on_save=None):
        """`smoke`: a few steps of everything, in runs/ only (nothing recorded); `on_save`: called after each unit."""
        self.device, self.log, self.smoke, self.on_save = torch.device(device), log, smoke, on_save
        self.recipe = SMOKE if smoke else RECIPE
        self.dir = RUNS_DIR / ("smoke" if smoke else "")
        saved = None if smoke else load_results("bench_supernet").get(KEY)
        if saved and saved["recipe"] != RECIPE:
            raise SystemExit(f"benchmarks/results/bench_supernet.json holds torchvision runs of another recipe "
                             f"({saved['recipe']}); delete its '{KEY}' entry to start over with {RECIPE}")
        self.entry = saved or {"recipe": self.recipe, "units": {}}
        self.cache: dict = {}

    def save(self, key: str, result: dict) -> None:
        result.update(machine=machine(), device=str(self.device), finished=time.strftime("%Y-%m-%d %H:%M"))
        self.entry["units"][key] = result
        if not self.smoke:
            save_run("bench_supernet", KEY, self.entry)
            if self.on_save:
                self.on_save()
        self.log(f"[{key}] saved: " + ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, dict)))

    def loaders(self, seed: int):
        if ("data", seed) not in self.cache:
            self.cache.clear()                                  # one seed's data in memory at a time
            self.cache[("data", seed)] = data(seed, self.recipe)
        return self.cache[("data", seed)]

    def float_model(self, name: str, seed: int) -> torch.nn.Module:
        key = f"{name}/seed{seed}/float"
        train, _, test = self.loaders(seed)
        torch.manual_seed(seed)
        model = build_model(name, 10).to(self.device)
        path = self.dir / f"{name}_seed{seed}_float.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True, map_location=self.device))
        else:
            t, cpu = time.perf_counter(), time.process_time()
            train_float(model, train, self.recipe["float_epochs"], lr=self.recipe["float_lr"],
                        max_steps=self.recipe.get("float_max_steps"), progress=True)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            fp = fingerprint(model)
            if key not in self.entry["units"]:
                self.save(key, {"test": accuracy(model, test), "fingerprint": fp, "seconds": wall,
                                "cpu_seconds": cpu})
            elif self.entry["units"][key]["fingerprint"] != fp:
                self.entry["units"][key]["retrained_differs"] = fp
                self.save(key, self.entry["units"][key])
                self.log(f"[{key}] WARNING: the retrained float start differs from the recorded one ({fp})")
        return model

    def base(self, name: str, seed: int) -> tuple[Supernet, list]:
        train, _, _ = self.loaders(seed)
        model = self.float_model(name, seed)
        bn = bn_batches_from(train.dataset, self.recipe["bn_batches"], self.recipe["batch_size"], seed=seed)
        sn = prepare(model, bn[0][0][:1].to(self.device))
        t = time.perf_counter()
        sn.calibrate(bn)
        self.cache["calibration_seconds"] = time.perf_counter() - t
        return sn, bn

    def configs(self, sn: Supernet) -> dict:
        return {k: sn.uniform(b, b, symmetric=sym, per_channel=pc) for k, (b, sym, pc) in CONFIGS.items()}

    def supernet_unit(self, name: str, seed: int) -> None:
        base, bn = self.base(name, seed)
        train, val, test = self.loaders(seed)
        steps = self.recipe["steps"]
        sn = Supernet(copy.deepcopy(base.model), base.space)
        path = self.dir / f"{name}_seed{seed}_supernet.pt"     # trained supernet + its timings: search resumes here
        if path.exists():
            saved = torch.load(path, weights_only=True, map_location=self.device)
            sn.model.load_state_dict(saved["state_dict"])
            res = saved["result"]
        else:
            opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=self.recipe["lr"])
            train.generator.manual_seed(seed)
            cpu = time.process_time()
            h = train_supernet(sn, train, opt, TrainConfig(epochs=steps // len(train) + 1, max_steps=steps,
                                                           progress=True),
                               scheduler=cosine_scheduler(opt, steps), generator=torch.Generator().manual_seed(seed))
            res = {"seconds": h["seconds"], "cpu_seconds": time.process_time() - cpu, "steps": steps,
                   "calibration_seconds": self.cache["calibration_seconds"]}
            res["test"] = {k: evaluate(sn, c, test, bn) for k, c in self.configs(sn).items()}
            torch.save({"state_dict": sn.model.state_dict(), "result": res}, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        self.log(f"[{name}/seed{seed}/supernet] test {res['test']}")
        res["search"] = self.search(sn, name, seed, val, test, bn)
        self.save(f"{name}/seed{seed}/supernet", res)

    def search(self, sn: Supernet, name: str, seed: int, val, test, bn) -> dict:
        example = (bn[0][0][:1].to(self.device),)
        exp = types.SimpleNamespace(supernet=sn, example_inputs=example, val_loader=val, test_loader=test,
                                    bn_batches=bn)
        cm = CostModel.from_supernet(sn, example)
        out = {}
        for label, bits in SEARCH_BUDGETS.items():
            t = time.perf_counter()
            limit = cm(sn.uniform(bits, bits)).bitops
            run_dir = self.dir / f"{name}_seed{seed}_search_{label}"
            run_dir.mkdir(parents=True, exist_ok=True)
            settings = SearchSettings(constraints={"max_bitops": limit}, records=self.recipe["search_records"],
                                      records_path=self.dir / f"{name}_seed{seed}_records.jsonl", seed=seed,
                                      measure_top_k=self.recipe["search_top_k"],
                                      refine_rounds=self.recipe["search_rounds"])
            o = search_experiment(exp, run_dir, settings, progress=True)
            best = o.result.best
            out[label] = {"test": o.measured_accuracy, "val": best.measured_accuracy, "bitops": best.costs["bitops"],
                          "limit_bitops": limit, "seconds": time.perf_counter() - t,
                          "config": best.config.to_dict() if hasattr(best.config, "to_dict") else None}
            self.log(f"[{name}/seed{seed}/search {label}] test {o.measured_accuracy:.4f}")
        return out

    def dedicated_unit(self, name: str, seed: int, cfg_name: str) -> None:
        if "base" not in self.cache or self.cache.get("base_key") != (name, seed):
            self.cache["base"], self.cache["bn"] = self.base(name, seed)
            self.cache["base_key"] = (name, seed)
        base, bn = self.cache["base"], self.cache["bn"]
        train, _, test = self.loaders(seed)
        steps = self.recipe["steps"]
        d = Supernet(copy.deepcopy(base.model), base.space)
        c = self.configs(d)[cfg_name]
        opt = torch.optim.Adam(d.model.parameters(), lr=self.recipe["lr"])
        train.generator.manual_seed(seed)
        cpu = time.process_time()
        h = lsq_qat(d, c, train, opt, QATConfig(epochs=steps // len(train) + 1, recipe=SandwichConfig(wdr=None),
                                                max_steps=steps, progress=True),
                    scheduler=cosine_scheduler(opt, steps))
        self.save(f"{name}/seed{seed}/{cfg_name}", {"seconds": h["seconds"], "cpu_seconds": time.process_time() - cpu,
                                                     "test": evaluate(d, c, test, bn)})

    def run(self, models=MODELS, seeds=SEEDS) -> None:
        units = self.entry["units"]
        for seed in seeds:
            for name in models:
                if f"{name}/seed{seed}/supernet" not in units:
                    self.supernet_unit(name, seed)
                for cfg_name in CONFIGS:
                    if f"{name}/seed{seed}/{cfg_name}" not in units:
                        self.dedicated_unit(name, seed, cfg_name)
                self.cache.pop("base", None)


# --- the report ---------------------------------------------------------------------------------------------------
def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _model_rows(units: dict, name: str) -> dict:
    """Per config: supernet and dedicated test accuracies over the seeds where both exist."""
    rows = {}
    for cfg in CONFIGS:
        pairs = [(units[f"{name}/seed{s}/supernet"]["test"][cfg], units[f"{name}/seed{s}/{cfg}"]["test"])
                 for s in SEEDS if f"{name}/seed{s}/supernet" in units and f"{name}/seed{s}/{cfg}" in units]
        rows[cfg] = pairs
    return rows


def _pm(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    return f"{m:.2f} ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{m:.2f}"


def section(entry: dict) -> tuple[list[str], list[str]]:
    """(headline rows, body lines) of the torchvision runs recorded so far."""
    units, r = entry["units"], entry["recipe"]
    body = ["### torchvision ResNet-18 and MobileNetV2 at full width (`--budget torchvision`)", "",
            f"Fashion-MNIST, 50,000 training / {r['val_size']:,} validation / 10,000 test images at "
            f"{r['image_size']}x{r['image_size']}, repeated to {r['channels']} channels (the models are unmodified); "
            f"float start {r['float_epochs']} epochs (Adam lr {r['float_lr']}, cosine); QAT {r['steps']} steps of "
            f"batch {r['batch_size']} (Adam lr {r['lr']}, cosine) for the supernet (`SubnetOptimizer`, "
            f"`SandwichConfig()`) and each dedicated LSQ run; BN recalibrated on {r['bn_batches']} fixed training "
            f"batches. Search: {r['search_records']} records on validation, CQAP, `refine_search` "
            f"({r['search_rounds']} rounds, {r['search_top_k']} measured per round). Accuracies in % on test, mean "
            "± std over the seeds finished; gap = dedicated - supernet.", ""]
    heads = []
    for name in MODELS:
        floats = [units[f"{name}/seed{s}/float"]["test"] for s in SEEDS if f"{name}/seed{s}/float" in units]
        if not floats:
            continue
        rows = _model_rows(units, name)
        done = [s for s in SEEDS if f"{name}/seed{s}/supernet" in units]
        body += [f"**{name}** (float: {_pm(floats)}; supernet seeds finished: {done or 'none'})", "",
                 "| config | supernet subnet | dedicated LSQ QAT | gap (points) | target | seeds |",
                 "|---|---|---|---|---|---|"]
        worst = {}
        for cfg, pairs in rows.items():
            bits = CONFIGS[cfg][0]
            gap = 100 * _mean([d - s for s, d in pairs])
            if pairs:
                worst[bits] = max(worst.get(bits, -1e9), gap)
            body.append(f"| {cfg} | {_pm([s for s, _ in pairs])} | {_pm([d for _, d in pairs])} | "
                        + (f"{gap:+.2f}" if pairs else "-") + f" | <= {TARGETS[bits]} | {len(pairs)} |")
        sup = [units[f"{name}/seed{s}/supernet"] for s in done]
        ded = [units[f"{name}/seed{s}/{c}"] for s in SEEDS for c in CONFIGS if f"{name}/seed{s}/{c}" in units]
        lines = []
        if sup and ded:
            t_a = _mean([u["seconds"] for u in sup])
            t_1 = _mean([u["seconds"] for u in ded])
            c_a, c_1 = _mean([u["cpu_seconds"] for u in sup]), _mean([u["cpu_seconds"] for u in ded])
            ratio = t_a / (12 * t_1)
            lines.append(f"Training time: supernet {t_a:.0f} s; one dedicated run {t_1:.0f} s (mean of {len(ded)}); "
                         f"supernet / 12 dedicated runs = {ratio:.2f}x wall, {c_a / (12 * c_1):.2f}x CPU "
                         "(target <= 0.3).")
            cal = _mean([u["calibration_seconds"] for u in sup])
            lines.append(f"Calibration of the float start (all cells, {r['bn_batches']} batches): {cal:.0f} s.")
        searched = []
        for label, bits in SEARCH_BUDGETS.items():
            cfgs = [c for c in CONFIGS if CONFIGS[c][0] == bits]
            pairs = []
            for s in done:
                srch = units[f"{name}/seed{s}/supernet"]["search"][label]
                deds = [units[f"{name}/seed{s}/{c}"]["test"] for c in cfgs if f"{name}/seed{s}/{c}" in units]
                if deds:
                    pairs.append((srch["test"], max(deds)))
            if pairs:
                diff = 100 * _mean([a - b for a, b in pairs])
                searched.append(f"{label}: searched MP {_pm([a for a, _ in pairs])} vs best dedicated uniform "
                                f"{_pm([b for _, b in pairs])} ({diff:+.2f})")
        if searched:
            lines.append("Searched mixed precision at the BitOps of uniform " + "; ".join(searched)
                         + " (target: >= 0).")
        body += [""] + lines + [""]
        if worst:
            gaps = " · ".join(f"{worst[b]:+.2f}" + ("" if worst[b] <= TARGETS[b] else " (not met)")
                              for b in (8, 4, 3, 2) if b in worst)
            heads.append(headline(f"torchvision {name} at full width, Fashion-MNIST: worst gap to dedicated LSQ QAT at "
                                  "W8 · W4 · W3 · W2 (targets 0.3 · 0.3 · 1.0 · 2.0 points)",
                                  f"{gaps} ({len(done)} of {len(SEEDS)} seeds)"))
    machines = sorted({u["machine"] + " (" + u["device"] + ")" for u in units.values()})
    total = len(MODELS) * len(SEEDS) * (2 + len(CONFIGS))
    body += [f"Units finished: {len(units)} of {total} (float start, supernet with its search, {len(CONFIGS)} "
             "dedicated runs per model and seed); `--budget torchvision` continues with the next one. Measured on: "
             + "; ".join(machines) + ".", ""]
    return heads, body
