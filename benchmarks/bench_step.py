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

    python benchmarks/bench_step.py [--rounds 8] [--steps 3] [--no-write]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, update_section  # noqa: E402

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


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (each runs every variant)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

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
    steps = {k: make_step(m, x, y) for k, m in variants.items()}
    for st in steps.values():
        for _ in range(args.warmup):
            st()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, st in steps.items():
            times[k] += [st() for _ in range(args.steps)]
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["torch.ao default QAT"]
    rows = ["| variant | median step (ms) | vs torch.ao default QAT | vs float |", "|---|---:|---:|---:|"]
    for k, v in med.items():
        rows.append(f"| {k} | {v * 1e3:.1f} | {v / base:.2f}x | {v / med['float']:.2f}x |")
    table = "\n".join(rows)
    print(table)
    ratio = max(med["elastic W8A8 (sym, per-channel)"], med["elastic random subnet"]) / base
    print(f"elastic (worst of W8A8/random) = {ratio:.2f}x torch.ao default QAT (target <= 1.10x)")
    if not args.no_write:
        n = args.rounds * args.steps
        md = (f"## bench_step: one QAT training step, ResNet-18\n\n"
              f"torchvision ResNet-18 (num_classes={CLASSES}), {SIZE}x{SIZE} inputs, batch {BATCH}, forward + "
              f"cross-entropy + backward + SGD step, CPU, {args.threads} threads. Median of {n} steps per variant "
              f"({args.rounds} interleaved rounds of {args.steps}, after {args.warmup} warm-up steps).\n\n"
              f"Machine: {machine()}\n\n{table}\n\n"
              f"Target: elastic <= 1.10x torch.ao default QAT; measured (worst elastic variant): {ratio:.2f}x.\n\n"
              f"Rerun: `python benchmarks/bench_step.py`\n")
        update_section("bench_step", md + _NOTES)
    return med


_NOTES = ""

if __name__ == "__main__":
    main()
