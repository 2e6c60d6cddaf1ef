"""Training-step cost of the supernet on torchvision ResNet-18 and MobileNetV2 vs torch.ao's default QAT step (FX).

Models and batch as benchmarks/_supernet_torchvision.py: ``torchvision.models.resnet18(num_classes=10)`` and
``torchvision.models.mobilenet_v2(num_classes=10)``, 3x28x28 inputs, batch 64, CPU. Every variant is its own copy
of the same float weights and sees the same batch; optimizer Adam (lr 1e-3) unless named otherwise.
  * torch.ao default QAT (the baseline of every ratio): ``prepare_qat_fx(model, get_default_qat_qconfig_mapping(
    "x86"), ex)``; forward + cross-entropy + backward + ``Adam.step()``.
  * elastic: ``prepare_qat_fx(model, elastic_qconfig_mapping(), ex, backend_config=elastic_backend_config())`` (the
    backend config for MobileNetV2 only), ``Supernet``, calibrated once on the step's batch, then
      - qat_step: `qat_step` of one subnet (W4A4 sym/channel) with ``SandwichConfig()``, one Adam;
      - sandwich, 3 passes: `sandwich_step`, ``SandwichConfig(lam=0, wdr=None)`` (plain CE per subnet), one Adam;
      - + GPG: ``SandwichConfig(wdr=None)`` (R learns from H, L from R), one Adam;
      - + WDR: ``SandwichConfig()``, one Adam;
      - + SubnetOptimizer = the full sandwich step: ``SandwichConfig()`` with ``SubnetOptimizer(..., Adam)``, the
        README's recipe (each step samples H/R/L from its own seeded generator).
Rounds interleave all variants of a model (one step each), after warm-up steps; medians per variant.
Calibration cost: ``benchmarks/_calibration_cost.calibration_cost`` (``sn.calibrate`` vs one torch.ao observer pass
over the same 16 batches of 64 at 28x28, interleaved rounds, medians).

Command (budget: per model 1 warm-up step and 3 interleaved rounds of one step per variant, then calibration cost
with 1 timed round after 1 warm-up round; wall time at one thread on 2 heavily loaded CPU cores about 7 min, estimated):
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py                 # writes the `bench_step` section of BENCHMARKS.md
    python benchmarks/bench_step.py [--rounds 3] [--warmup 1] [--calib-rounds 1] [--models resnet18] [--no-write]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import headline, machine, update_section  # noqa: E402

BATCH, SIZE, CLASSES = 64, 28, 10
MODELS = ("resnet18", "mobilenet_v2")
CALIB_BATCHES = 16
BASE = "torch.ao default QAT"
SANDWICH = "sandwich (+ SubnetOptimizer: full step)"


def _float_model(name: str) -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES).train()


def _prepare(model: nn.Module, mapping, ex, backend_config=None) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), mapping, ex, backend_config=backend_config).train()


def variants(name: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """{label: step()} for one model; each step() runs one training step and returns its wall seconds."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    import eqnet_plugin as eq
    from eqnet_plugin.train import SandwichConfig, qat_step, sandwich_step
    from eqnet_plugin.train.optim import SubnetOptimizer
    model, ex = _float_model(name), (x[:1],)
    ao = _prepare(model, get_default_qat_qconfig_mapping("x86"), ex)
    ao_opt = torch.optim.Adam(ao.parameters(), lr=1e-3)

    def ao_step() -> None:
        loss = nn.functional.cross_entropy(ao(x), y)
        ao_opt.zero_grad(set_to_none=True)
        loss.backward()
        ao_opt.step()

    bc = eq.elastic_backend_config() if "mobilenet" in name else None
    calibrated = _prepare(model, eq.elastic_qconfig_mapping(), ex, bc)
    eq.Supernet(calibrated).calibrate([x])

    def elastic(recipe, subnet_opt: bool = False, single: bool = False):
        sn = eq.Supernet(copy.deepcopy(calibrated))
        params = sn.model.parameters()
        opt = SubnetOptimizer(params, torch.optim.Adam, lr=1e-3) if subnet_opt else torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        cfg = sn.uniform(4, 4, per_channel=True)
        if single:
            return lambda: qat_step(sn, cfg, x, y, opt, recipe=recipe)
        return lambda: sandwich_step(sn, x, y, opt, recipe=recipe, generator=g)

    steps = {BASE: ao_step,
             "qat_step (one subnet, W4A4)": elastic(SandwichConfig(), single=True),
             "sandwich, 3 passes (CE only, one Adam)": elastic(SandwichConfig(lam=0.0, wdr=None)),
             "+ GPG (one Adam)": elastic(SandwichConfig(wdr=None)),
             "+ WDR (one Adam)": elastic(SandwichConfig()),
             SANDWICH: elastic(SandwichConfig(), subnet_opt=True)}

    def timed(fn):
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run
    return {k: timed(fn) for k, fn in steps.items()}


def step_table(name: str, rounds: int, warmup: int) -> tuple[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(CLASSES, (BATCH,), generator=g)
    steps = variants(name, x, y)
    for st in steps.values():
        for _ in range(warmup):
            st()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, st in steps.items():
            times[k].append(st())
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[BASE]
    rows = ["| variant | median step (ms) | vs torch.ao default QAT | added by this row (ms) |", "|---|---:|---:|---:|"]
    prev = None
    for k, v in med.items():
        if k.startswith("sandwich, 3"):
            added = f"{(v - 3 * base) * 1e3:+.0f} vs 3 x torch.ao"
        else:
            added = "" if prev is None else f"{(v - prev) * 1e3:+.0f}"
        rows.append(f"| {k} | {v * 1e3:.0f} | {v / base:.2f}x | {added} |")
        prev = v if k.startswith(("sandwich", "+")) else None
    return "\n".join(rows), med


def calibration_rows(models, rounds: int) -> str:
    from _calibration_cost import calibration_cost
    rows = ["| model | batches (28x28) | sn.calibrate (s) | torch.ao observer pass (s) | ratio |",
            "|---|---|---:|---:|---:|"]
    for m in models:
        c = calibration_cost(m, SIZE, CALIB_BATCHES, BATCH, rounds)
        rows.append(f"| {m} | {CALIB_BATCHES} x {BATCH} | {c['calibrate_s']:.2f} | {c['torch_ao_s']:.2f} "
                    f"| {c['ratio']:.1f}x |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the first round")
    ap.add_argument("--calib-rounds", type=int, default=1, help="timed calibration rounds (0: skip that table)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.calib_rounds < 0:
        raise SystemExit("--rounds must be >= 1, --warmup and --calib-rounds >= 0")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    t_start = time.perf_counter()
    heads, parts = [], []
    for name in args.models:
        table, med = step_table(name, args.rounds, args.warmup)
        ratio = med[SANDWICH] / med[BASE]
        print(f"{name}\n{table}\nsandwich / torch.ao = {ratio:.2f}x", flush=True)
        heads.append(headline(f"FX sandwich step / torch.ao default QAT step, {name}, 28x28 batch 64, CPU "
                              "(three passes: about 3.0)", f"{ratio:.2f}x"))
        parts.append(f"**{name}** (full sandwich step: {ratio:.2f}x torch.ao's default QAT step)\n\n{table}\n")
    calib = calibration_rows(args.models, args.calib_rounds) if args.calib_rounds else None
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f} s")
    if args.no_write:
        return
    cmd = f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_step.py"
    cmd += "" if list(args.models) == list(MODELS) else " --models " + " ".join(args.models)
    for flag, v, d in (("--rounds", args.rounds, 3), ("--warmup", args.warmup, 1),
                       ("--calib-rounds", args.calib_rounds, 1)):
        cmd += f" {flag} {v}" if v != d else ""
    md = ("## bench_step\n\nFX training-step cost on torchvision ResNet-18 and MobileNetV2: the supernet's sandwich "
          "step and its parts vs torch.ao's default QAT step; calibration cost.\n\n" + "\n".join(heads) + "\n\n"
          f"`torchvision.models.<name>(num_classes={CLASSES})`, {SIZE}x{SIZE} 3-channel inputs, batch {BATCH} (the "
          "settings of the torchvision supernet benchmark), CPU. Baseline: `prepare_qat_fx` with "
          "`get_default_qat_qconfig_mapping(\"x86\")`, forward + cross-entropy + backward + Adam. Elastic: "
          "`prepare_qat_fx(model, elastic_qconfig_mapping(), ex, backend_config=elastic_backend_config())` (backend "
          "config for MobileNetV2), calibrated. Rows below the baseline: `qat_step` of one W4A4 subnet with "
          "`SandwichConfig()`; then the sandwich step built up: three passes with plain CE and one Adam "
          "(`SandwichConfig(lam=0, wdr=None)`), + GPG, + WDR (`SandwichConfig()`), + `SubnetOptimizer` (the "
          "README's recipe; the headline). \"added\" is the change from the row above (first sandwich row: its "
          "time minus three baseline steps).\n\n"
          f"Budget: {args.warmup} warm-up steps per variant, then median of {args.rounds} interleaved rounds of one "
          f"step per variant; ratios are within one run. Wall time of the whole run: {wall / 60:.1f} min. "
          f"Machine: {machine()}; load average when the run started: {load}.\n\n" + "\n".join(parts))
    if calib:
        md += (f"\nCalibration cost (`benchmarks/_calibration_cost.py`): `sn.calibrate` over {CALIB_BATCHES} "
               f"batches of {BATCH} vs one pass of torch.ao's default QAT observers over the same batches "
               f"(median of {args.calib_rounds} round(s) after one warm-up round):\n\n{calib}\n")
    md += f"\nRerun: `{cmd}`\n"
    update_section("bench_step", md)


if __name__ == "__main__":
    main()
