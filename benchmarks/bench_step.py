"""One QAT training step of torchvision ResNet-18 (32x32, batch 32, CPU, 2 threads): float vs torch.ao vs elastic.

Variants (each its own model copy, same weights, same batch, SGD with momentum):
  * float: the plain model.
  * torch.ao default QAT: ``prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), ex)`` (fused moving-average
    observer + fake-quant); the baseline of every ratio.
  * torch.ao learnable: ``torch.ao.quantization._learnable_fake_quantize._LearnableFakeQuantize`` for activations
    (per-tensor affine) and weights (per-channel symmetric), calibrated once, then in parameter-learning mode (LSQ).
  * elastic W8A8: ``prepare_qat_fx(model, elastic_qconfig_mapping(), ex)``, calibrated, ``sn.uniform(8, 8,
    per_channel=True)``.
  * elastic random: the same, one random subnet (``sn.sample(torch.Generator().manual_seed(0))``).

Timings are medians over steps; rounds interleave the variants so machine noise hits all of them alike.

Command (budget: 20 interleaved rounds of one step per variant, per thread count; wall time on 2 cores about 3 min,
estimated):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_step.py --threads 2 1   # writes the `bench_step` section
    python benchmarks/bench_step.py [--rounds 20] [--steps 1] [--no-write] [--no-fq]
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

BATCH, SIZE, CLASSES = 32, 32, 10


def _fx():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    return get_default_qat_qconfig_mapping, prepare_qat_fx


def _prepare(model: nn.Module, mapping, ex) -> torch.fx.GraphModule:
    _, prepare_qat_fx = _fx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), mapping, ex)


def build_default(model, ex):
    get_map, _ = _fx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _prepare(model, get_map("x86"), ex)


def build_learnable(model, ex, calib):
    """torch.ao `_LearnableFakeQuantize` everywhere torch.ao's default mapping puts a moving-average fake-quant."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize as LFQ
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    act = LFQ.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine, use_grad_scaling=True)
    # channel_len must be known at construction: 1 here, resized to each layer's C_out after prepare.
    weight = LFQ.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                           dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, channel_len=1,
                           use_grad_scaling=True)
    gm = _prepare(model, QConfigMapping().set_global(QConfig(activation=act, weight=weight)), ex)
    for m in gm.modules():
        wfq = getattr(m, "weight_fake_quant", None)
        if isinstance(wfq, LFQ):
            c = m.weight.shape[0]
            wfq.scale = nn.Parameter(torch.ones(c))
            wfq.zero_point = nn.Parameter(torch.zeros(c))
    with torch.no_grad():                       # static estimate once, then learn the ranges (LSQ)
        gm(calib)
    for m in gm.modules():
        if isinstance(m, LFQ):
            m.enable_param_learning()
    return gm


def build_elastic(model, ex, calib, config: str):
    import eqnet_plugin as eq
    _, prepare_qat_fx = _fx()
    gm = _prepare(model, eq.elastic_qconfig_mapping(), ex)
    sn = eq.Supernet(gm)
    sn.calibrate([calib])
    cfg = sn.uniform(8, 8, per_channel=True) if config == "w8a8" else sn.sample(torch.Generator().manual_seed(0))
    sn.apply(cfg)
    return gm


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0
    return step


def fake_quant_table(rounds: int, reps: int = 2) -> str:
    """One fake-quant forward + backward (input and qparam gradients) alone, torch.ao's fused kernel vs elastic."""
    from torch.ao.quantization.fake_quantize import (default_fused_act_fake_quant,
                                                     default_fused_per_channel_wt_fake_quant)

    from eqnet_plugin import ElasticFakeQuantize
    g = torch.Generator().manual_seed(0)
    shapes = {"activation 32x64x32x32, per-tensor": (torch.randn(32, 64, 32, 32, generator=g), False),
              "weight 512x512x3x3, per-channel": (torch.randn(512, 512, 3, 3, generator=g) * 0.05, True)}
    rows = ["| tensor | torch.ao fused observer + fake-quant (ms) | torch learnable kernel (ms) | elastic sym (ms) "
            "| elastic asym (ms) | elastic sym / torch.ao |", "|---|---:|---:|---:|---:|---:|"]
    for label, (x, per_channel) in shapes.items():
        c = x.shape[0]
        fused = (default_fused_per_channel_wt_fake_quant if per_channel else default_fused_act_fake_quant)().train()
        s = torch.full((c if per_channel else 1,), float(x.abs().max()) / 100, requires_grad=True)
        z = torch.zeros(c if per_channel else 1, requires_grad=True)
        qmin, qmax = (-128, 127) if per_channel else (0, 255)
        if per_channel:
            def learnable(t):
                return torch._fake_quantize_learnable_per_channel_affine(t, s, z, 0, qmin, qmax, 0.01)
        else:
            def learnable(t):
                return torch._fake_quantize_learnable_per_tensor_affine(t, s, z, qmin, qmax, 0.01)
        el = {}
        for sym in (True, False):
            fq = ElasticFakeQuantize(is_weight=per_channel)
            fq.materialize(c)
            fq.set_cell(8, sym, per_channel)
            with torch.no_grad():
                for name, p in fq.named_parameters():
                    p.fill_(float(s[0]) if name.startswith("scale") else 3.0)
            el[sym] = fq
        fns = {"fused": fused, "learnable": learnable, "sym": el[True], "asym": el[False]}
        times: dict[str, list[float]] = {k: [] for k in fns}
        grad = torch.randn(x.shape, generator=g)
        for _ in range(rounds + 1):                                     # the first round warms up
            for k, fn in fns.items():
                for _ in range(reps):
                    xi = x.clone().requires_grad_(True)
                    t0 = time.perf_counter()
                    fn(xi).backward(grad)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[reps:]) * 1e3 for k, v in times.items()}
        rows.append(f"| {label} | {med['fused']:.2f} | {med['learnable']:.2f} | {med['sym']:.2f} | "
                    f"{med['asym']:.2f} | {med['sym'] / med['fused']:.2f}x |")
    return "\n".join(rows)


def step_table(variants: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int, steps_per: int,
               warmup: int) -> tuple[str, float]:
    """Median step time per variant (interleaved rounds); returns the markdown table and the worst elastic ratio."""
    steps = {k: make_step(m, x, y) for k, m in variants.items()}
    for st in steps.values():
        for _ in range(warmup):
            st()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, st in steps.items():
            times[k] += [st() for _ in range(steps_per)]
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["torch.ao default QAT"]
    rows = ["| variant | median step (ms) | vs torch.ao default QAT | vs float |", "|---|---:|---:|---:|"]
    for k, v in med.items():
        rows.append(f"| {k} | {v * 1e3:.1f} | {v / base:.2f}x | {v / med['float']:.2f}x |")
    ratio = max(med["elastic W8A8 (sym, per-channel)"], med["elastic random subnet"]) / base
    return "\n".join(rows), ratio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (each runs every variant)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts to measure, e.g. 2 1")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--no-fq", action="store_true", help="skip the fake-quant-alone table")
    args = ap.parse_args(argv)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    torch.set_num_threads(args.threads[0])
    md_machine = machine()

    import torchvision
    g = torch.Generator().manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(CLASSES, (BATCH,), generator=g)
    ex = (x[:1],)
    variants = {
        "float": copy.deepcopy(model),
        "torch.ao default QAT": build_default(model, ex),
        "torch.ao _LearnableFakeQuantize": build_learnable(model, ex, x),
        "elastic W8A8 (sym, per-channel)": build_elastic(model, ex, x, "w8a8"),
        "elastic random subnet": build_elastic(model, ex, x, "random"),
    }
    n = args.rounds * args.steps
    parts, heads = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        table, ratio = step_table(variants, x, y, args.rounds, args.steps, args.warmup)
        heads.append(headline(f"FX QAT training step, ResNet-18, CPU, {threads} thread{'s' if threads > 1 else ''}: "
                              "worst elastic variant vs torch.ao default QAT (target <= 1.10x)", f"{ratio:.2f}x"))
        print(f"{threads} threads\n{table}\nelastic (worst of W8A8/random) = {ratio:.2f}x torch.ao default QAT "
              "(target <= 1.10x)")
        parts.append(f"**{threads} thread{'s' if threads > 1 else ''}** (worst elastic variant: {ratio:.2f}x "
                     f"torch.ao default QAT; target <= 1.10x)\n\n{table}\n")
        if not args.no_fq:
            fq = fake_quant_table(args.rounds)
            print(fq)
            parts.append(f"One fake-quant alone at {threads} thread{'s' if threads > 1 else ''}, forward + backward "
                         f"with scale/zero-point gradients (median of {args.rounds * 2}, interleaved):\n\n{fq}\n")
    if not args.no_write:
        md = (f"## bench_step\n\nOne FX QAT training step of ResNet-18: float vs torch.ao vs elastic.\n\n"
              + "\n".join(heads) + "\n\n"
              f"torchvision ResNet-18 (num_classes={CLASSES}), {SIZE}x{SIZE} inputs, batch {BATCH}, forward + "
              f"cross-entropy + backward + SGD step, CPU. Median of {n} steps per variant ({args.rounds} interleaved "
              f"rounds of {args.steps}, after {args.warmup} warm-up steps); ratios are within one run.\n\n"
              f"Machine: {md_machine}; load average when the run started: {load}; OMP_WAIT_POLICY={policy}.\n\n"
              + "\n".join(parts) + f"\nRerun: `{'OMP_WAIT_POLICY=' + policy + ' ' if policy != 'unset' else ''}"
              f"python benchmarks/bench_step.py --threads {' '.join(map(str, args.threads))}`\n")
        update_section("bench_step", md)


if __name__ == "__main__":
    main()
