"""`eqnet demo`: the whole EQ-Net flow on the embedded digits data, in one output folder with a Markdown report.

Stages: float pretraining -> supernet training (sandwich + GPG + WDR) -> accuracy of uniform subnets -> records +
CQAP + genetic search under a BitOps constraint (Pareto plot) -> per target, a search under that target's profile
and the export of its best subnet (ONNX Runtime, TensorRT, Brevitas, QNN) -> ``report.md``.

Layout of the output folder::

    supernet.pt                 checkpoint (loads with `pipeline.load_experiment` / `eqnet eval --checkpoint`)
    uniform.json                accuracy table of uniform subnets
    records.jsonl, cqap.pt      measured subnets and the accuracy predictor fitted on them
    search/<profile>/           search.json, best.json, pareto.png for each profile searched
    exports/<target>/           the exported files and subnet.json
    summary.json, report.md     everything above in one place
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import pipeline as P
from ..quant.space import atomic_write_text

__all__ = ["DemoBudget", "BUDGETS", "run_demo", "describe_scheme"]


@dataclass(frozen=True)
class DemoBudget:
    """How much work each demo stage does.

    Args:
        float_epochs: float pretraining epochs. epochs: supernet epochs. max_steps: cap on supernet steps.
        records: measured subnets for the predictor. population, generations: genetic search settings.
        cqap_epochs: predictor training epochs. calib_batches, bn_batches: calibration / BN recalibration batches.
        bitops_fraction: the main search's limit, a fraction of the all-8-bit subnet's BitOps.
        target_bitops_fraction: the limit of the TensorRT / QNN searches (their profiles allow 4/8-bit only).
    """

    float_epochs: int = 15
    epochs: int = 30
    max_steps: int | None = None
    records: int = 200
    population: int = 100
    generations: int = 200
    cqap_epochs: int = 300
    calib_batches: int = 8
    bn_batches: int = 8
    bitops_fraction: float = 0.25
    target_bitops_fraction: float = 0.7


BUDGETS = {
    "default": DemoBudget(),
    "small": DemoBudget(float_epochs=3, epochs=3, records=40, population=40, generations=30, cqap_epochs=100,
                        calib_batches=4, bn_batches=4),
    "tiny": DemoBudget(float_epochs=1, epochs=1, max_steps=3, records=8, population=12, generations=3,
                       cqap_epochs=20, calib_batches=2, bn_batches=2),
}

_STAGES = 6
_PROFILE_LABEL = {"brevitas": "brevitas (the whole space)"}


def run_demo(out_dir: str | os.PathLike = "runs/demo", *, budget: str | DemoBudget = "default",
             spec: P.RunSpec | None = None, targets: tuple[str, ...] | None = None, device: str = "cpu",
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the demo into `out_dir` and return the summary (also written to ``summary.json``).

    Args:
        out_dir: output folder (created; files of an earlier demo there are replaced).
        budget: a `BUDGETS` name or a `DemoBudget`.
        spec: model/data/space (default: tiny_resnet on digits).
        targets: export targets (default: every registered target, `eqnet_plugin.adapters.target_names`).
        device: torch device.
        progress: tqdm bars.
        log: where stage headers go.
    Raises:
        ValueError: unknown budget or target; whatever the stages raise for bad input.
    """
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    targets = tuple(targets) if targets is not None else P.target_names()
    bad = [t for t in targets if t not in P.target_names()]
    if bad:
        raise ValueError(f"unknown targets {bad}; choose from {', '.join(P.target_names())}")
    spec = spec or P.RunSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    summary: dict = {"out": os.fspath(out_dir), "spec": spec.to_dict(), "budget": asdict(budget),
                     "machine": _machine(), "files": {}}

    def stage(i: int, name: str, text: str) -> float:
        log(f"[{i}/{_STAGES}] {text}")
        return time.perf_counter()

    t = stage(1, "float", f"float pretraining of {spec.model} on {spec.data} ({budget.float_epochs} epochs), "
                          "prepare + calibrate the supernet")
    signed = P.signed_activations_for(targets)             # TensorRT in play: its export runs what was trained
    exp = P.build_experiment(spec, P.BuildSettings(float_epochs=budget.float_epochs,
                                                   calib_batches=budget.calib_batches, bn_batches=budget.bn_batches,
                                                   signed_activations=signed), device=device, progress=progress)
    times["float + calibrate"] = time.perf_counter() - t
    summary["info"] = dict(exp.info)
    summary["supernet"] = repr(exp.supernet)

    t = stage(2, "train", f"supernet training ({budget.epochs} epochs, sandwich + GPG + WDR, Adam 1e-3 cosine)")
    ckpt = out / "supernet.pt"
    hist = P.train_experiment(exp, budget.epochs, ckpt, max_steps=budget.max_steps, resume=False, progress=progress)
    times["supernet training"] = time.perf_counter() - t
    summary["train"] = {"steps": hist["step"], "last_losses": hist["train"][-1] if hist["train"] else None}
    summary["files"]["checkpoint"] = ckpt.name

    t = stage(3, "table", "accuracy of uniform subnets (test split, BN recalibrated on training batches)")
    table = P.uniform_table(exp, progress=progress)
    P.write_json(out / "uniform.json", table)
    times["uniform table"] = time.perf_counter() - t
    summary["uniform"] = table

    t = stage(4, "search", f"records ({budget.records}) -> CQAP -> genetic search, BitOps <= "
                           f"{budget.bitops_fraction:.0%} of W8A8")
    records = out / "records.jsonl"
    if records.exists():
        records.unlink()                    # records of an earlier supernet would be resumed: start fresh
    main = P.search_experiment(exp, out / "search" / "brevitas",
                               P.SearchSettings(profile="brevitas", bitops_fraction=budget.bitops_fraction,
                                                records=budget.records, records_path=records,
                                                population=budget.population, generations=budget.generations,
                                                cqap_epochs=budget.cqap_epochs, seed=spec.seed), progress=progress)
    shutil.copyfile(main.files["plot"], out / "pareto.png")
    times["records + CQAP + search"] = time.perf_counter() - t
    summary["searches"] = {"brevitas": _search_summary(main, exp.supernet, out)}
    summary["predictor"] = main.predictor

    profiles = [p for p in dict.fromkeys(P.get_target(t).profile for t in targets) if p != "brevitas"]
    t = stage(5, "targets", f"searches under the {' and '.join(profiles) or 'no other'} profile(s) (BitOps <= "
                            f"{budget.target_bitops_fraction:.0%} of W8A8)")
    from ..search import CQAP
    cqap = CQAP.load(main.files["predictor"])
    chosen = {"brevitas": main.result.best.config}           # search profile -> its chosen subnet
    for prof in profiles:
        res = P.search_experiment(exp, out / "search" / prof,
                                  P.SearchSettings(profile=prof, bitops_fraction=max(
                                      budget.target_bitops_fraction, P.default_bitops_fraction(prof)),
                                                   population=budget.population, generations=budget.generations,
                                                   seed=spec.seed), predictor=cqap)
        summary["searches"][prof] = _search_summary(res, exp.supernet, out)
        chosen[prof] = res.result.best.config
    times["target searches"] = time.perf_counter() - t

    t = stage(6, "export", f"export to {', '.join(targets)}")
    exports: dict = {}
    for target in targets:
        tg = P.get_target(target)
        frozen = P.freeze_subnet(exp, chosen[tg.profile])
        files = P.export_subnet(exp, chosen[tg.profile], target, out / "exports" / target, frozen=frozen)
        entry: dict = {"files": {k: _rel(v, out) for k, v in files.items()}, "search": tg.profile}
        runnable = [files[k] for k in tg.ort_checkable if k in files]
        if runnable:
            entry["ort_top1_agreement"] = P.onnx_agreement(runnable[0], frozen, exp.test_loader)
        entry["report"] = json.loads(Path(files["report"]).read_text())
        exports[target] = entry
    times["export"] = time.perf_counter() - t
    summary["exports"] = exports
    times["total"] = time.perf_counter() - t_all
    summary["seconds"] = times
    P.write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", _report(summary))
    return summary


def _rel(path: str, root: Path) -> str:
    return os.path.relpath(path, root)


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"torch threads: {torch.get_num_threads()}")


def _search_summary(o: "P.SearchOutcome", sn, root: Path) -> dict:
    r = o.result
    cfg = r.best.config
    bits = [c.bits for c in cfg.groups.values()]
    return {"profile": r.profile, "constraints": {k: v for k, v in r.constraints.to_dict().items() if v is not None},
            "predicted_accuracy": r.best.predicted_accuracy, "measured_accuracy": o.measured_accuracy,
            "costs": r.best.costs, "w8a8_bitops": o.reference["w8a8_bitops"],
            "scheme": describe_scheme(sn, cfg), "bits_histogram": {b: bits.count(b) for b in sorted(set(bits))},
            "pareto_size": len(r.pareto), "evaluations": r.evaluations, "seconds": r.seconds,
            "files": {k: _rel(v, root) for k, v in o.files.items()}}


def describe_scheme(supernet, cfg) -> str:
    """The quantization scheme of a subnet in words, e.g. ``"W sym per-channel, A asym"``."""
    w = {(c.symmetric, c.per_channel) for g, c in cfg.groups.items() if supernet.groups[g].is_weight}
    a = {c.symmetric for g, c in cfg.groups.items() if not supernet.groups[g].is_weight}
    ws = "W " + ("mixed" if len(w) != 1 else
                 f"{'sym' if next(iter(w))[0] else 'asym'} {'per-channel' if next(iter(w))[1] else 'per-tensor'}")
    return ws + ", A " + ("mixed" if len(a) != 1 else ("sym" if next(iter(a)) else "asym"))


def _activation_note(s: dict) -> str:
    """The report's sentence on the activation grids (TensorRT runs only the signed INT8 grid)."""
    if s["info"].get("signed_activations"):
        return ("TensorRT: the supernet was calibrated with signed activations (every activation quantizer on the "
                "signed INT8 grid with zero point 0, one bit less resolution on post-ReLU tensors), so the TensorRT "
                "file computes exactly the trained subnet and passes `check_tensorrt_onnx`.")
    return "Activations on the unsigned grid where the data is non-negative (no TensorRT target)."


def _report(s: dict) -> str:
    """The Markdown report of a demo summary."""
    d = s["out"]
    L = [f"# EQ-Net demo: {s['spec']['model']} on {s['spec']['data']}", "",
         f"Machine: {s['machine']}. Total wall time: {s['seconds']['total']:.1f} s. "
         f"Float model test accuracy: {s['info'].get('float_test_accuracy', float('nan')):.4f}.", "",
         "One supernet was trained once; every number below is a subnet of it (BN statistics re-estimated on "
         "training batches, accuracy on the test split).", "", "## Accuracy of uniform subnets", ""]
    schemes = list(next(iter(s["uniform"].values())).keys()) if s["uniform"] else []
    L.append(P.format_table([[k, *[v[c] for c in schemes]] for k, v in s["uniform"].items()],
                            ["bits", *schemes], markdown=True))
    main = s["searches"]["brevitas"]
    pred = s["predictor"]
    L += ["", "## Search", "",
          f"Accuracy predictor (CQAP) fitted on {pred.get('n_train')} measured subnets (validation split); on "
          f"{pred.get('n', 0)} held-out subnets: Kendall tau {pred.get('kendall_tau', float('nan')):.3f}, Pearson "
          f"{pred.get('pearson', float('nan')):.3f}.", "",
          f"![Pareto front]({main['files']['plot']})", "",
          "| profile | constraint | scheme | predicted | measured (test) | BitOps (% of W8A8) | size (bytes) | "
          "avg W bits | avg A bits |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["searches"].items():
        c = r["costs"]
        lim = ", ".join(f"{k} {v:.3g}" for k, v in r["constraints"].items())
        L.append(f"| {_PROFILE_LABEL.get(name, name)} | {lim} | {r['scheme']} | {r['predicted_accuracy']:.4f} "
                 f"| {r['measured_accuracy']:.4f} "
                 f"| {c['bitops']:.3g} ({100 * c['bitops'] / r['w8a8_bitops']:.0f}%) | {c['size_bytes']:.0f} | "
                 f"{c['avg_weight_bits']:.2f} | {c['avg_act_bits']:.2f} |")
    L += ["", "Plots: " + ", ".join(f"[{n}]({r['files']['plot']})" for n, r in s["searches"].items()), "",
          "## Exports", "", "| target | subnet from search | files | ONNX Runtime top-1 agreement with PyTorch |",
          "|---|---|---|---|"]
    for t, e in s["exports"].items():
        files = ", ".join(f"[{k}]({v})" for k, v in e["files"].items())
        agree = f"{e['ort_top1_agreement']:.4f}" if "ort_top1_agreement" in e else "n/a (float ONNX + encodings)"
        L.append(f"| {t} | {e['search']} | {files} | {agree} |")
    from eqnet_plugin.adapters.report import REPORT_HEADERS, report_row
    reports = [report_row(e["report"]) for e in s["exports"].values() if "report" in e]
    if reports:
        L += ["", "Export report (each target's report.json: agreement on the first test batch, latency at batch 1 "
              "against the same network in float on the same runtime):", "",
              P.format_table(reports, REPORT_HEADERS, markdown=True)]
    L += ["", "Each target exports the best subnet of the search under its profile (ONNX Runtime and Brevitas run "
          "anything, so they take the main search's subnet). " + _activation_note(s) + " QNN: float ONNX plus AIMET "
          "encodings (version 1.0.0). The Brevitas QONNX file uses QONNX `Quant` nodes, which ONNX Runtime does "
          "not run.", "", "## Time per stage", "",
          P.format_table([[k, f"{v:.1f}"] for k, v in s["seconds"].items()], ["stage", "seconds"], markdown=True), "",
          f"Next: `eqnet eval --checkpoint {d}/supernet.pt` (more subnets), `eqnet search --checkpoint "
          f"{d}/supernet.pt --profile qnn --max-size-bytes ...` (other constraints), `eqnet export --checkpoint "
          f"{d}/supernet.pt --subnet {d}/search/tensorrt/best.json --target tensorrt --out ...`.", ""]
    return "\n".join(L)
