"""One PT2E QAT training step of torchvision ResNet-18 (32x32, batch 32, CPU): torchao's x86 QAT vs elastic.

Variants (each its own copy of one exported graph, same weights, same batch, SGD with momentum):
  * torchao x86 QAT: ``prepare_qat_pt2e(exported, X86InductorQuantizer().set_global(
    get_default_x86_inductor_quantization_config(is_qat=True)))`` (torchao's fused moving-average observer +
    fake-quant, Conv-BN folded by torchao's QAT fusion); the baseline of every ratio. torchao 0.18 cannot annotate
    ResNet's reused ReLU, so the exported graph first goes through `eqnet_plugin.frontends.pt2e.split_reused_modules`
    (annotation metadata only; the computation is unchanged).
  * elastic W8A8: ``prepare_qat_pt2e(exported, ElasticQuantizer())``, ``Supernet``, calibrated,
    ``sn.uniform(8, 8, per_channel=True)``.
  * elastic random: the same, one random subnet (``sn.sample(torch.Generator().manual_seed(0))``).

The step is the same for all: forward, cross-entropy, backward, optimizer step (no sandwich: this measures the cost
of the elastic quantizers and of the unfolded Conv-BN against torchao's own QAT graph). Timings are medians over
steps; rounds interleave the variants so machine noise hits all of them alike.

Command (budget: 20 interleaved rounds of one step per variant; wall time on 2 cores about 2 min, estimated):
    python benchmarks/bench_pt2e.py --threads 1             # writes the `bench_pt2e` section
    python benchmarks/bench_pt2e.py [--rounds 20] [--steps 1] [--no-write]
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


def build_torchao(exported: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    from eqnet_plugin.frontends.pt2e import split_reused_modules
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    return prepare_qat_pt2e(split_reused_modules(copy.deepcopy(exported)), quantizer)


def build_elastic(exported: torch.fx.GraphModule, calib: torch.Tensor, config: str) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from eqnet_plugin import Supernet
    from eqnet_plugin.frontends.pt2e import ElasticQuantizer
    gm = prepare_qat_pt2e(copy.deepcopy(exported), ElasticQuantizer())
    sn = Supernet(gm)
    sn.calibrate([calib])
    cfg = sn.uniform(8, 8, per_channel=True) if config == "w8a8" else sn.sample(torch.Generator().manual_seed(0))
    sn.apply(cfg)
    return gm


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0
    return step


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
    base = med["torchao x86 QAT"]
    rows = ["| variant | median step (ms) | vs torchao x86 QAT |", "|---|---:|---:|"]
    for k, v in med.items():
        rows.append(f"| {k} | {v * 1e3:.1f} | {v / base:.2f}x |")
    ratio = max(v for k, v in med.items() if k.startswith("elastic")) / base
    return "\n".join(rows), ratio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (each runs every variant)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to measure, e.g. 2 1")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    torch.set_num_threads(args.threads[0])
    md_machine = machine()

    import torchvision
    g = torch.Generator().manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES).train()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(CLASSES, (BATCH,), generator=g)
    exported = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    variants = {
        "torchao x86 QAT": build_torchao(exported),
        "elastic W8A8 (sym, per-channel)": build_elastic(exported, x[:8], "w8a8"),
        "elastic random subnet": build_elastic(exported, x[:8], "random"),
    }
    parts, heads = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        table, ratio = step_table(variants, x, y, args.rounds, args.steps, args.warmup)
        heads.append(headline(f"PT2E QAT training step, ResNet-18, CPU, {threads} thread{'s' if threads > 1 else ''}: "
                              "worst elastic variant vs torchao x86 QAT (target <= 1.10x)", f"{ratio:.2f}x"))
        print(f"{threads} thread(s)\n{table}\nelastic (worst of W8A8/random) = {ratio:.2f}x torchao x86 QAT "
              "(target <= 1.10x)")
        parts.append(f"**{threads} thread{'s' if threads > 1 else ''}** (worst elastic variant: {ratio:.2f}x "
                     f"torchao x86 QAT; target <= 1.10x)\n\n{table}\n")
    if not args.no_write:
        md = (f"## bench_pt2e\n\nOne PT2E QAT training step of ResNet-18: torchao's x86 QAT vs elastic.\n\n"
              + "\n".join(heads) + "\n\n"
              f"torchvision ResNet-18 (num_classes={CLASSES}) exported with torch.export, {SIZE}x{SIZE} inputs, batch "
              f"{BATCH}, forward + cross-entropy + backward + SGD step, CPU. Median of {args.rounds * args.steps} "
              f"steps per variant ({args.rounds} interleaved rounds of {args.steps}, after {args.warmup} warm-up "
              "steps); ratios are within one run.\n\n"
              f"Machine: {md_machine}; load average when the run started: {load}.\n\n" + "\n".join(parts)
              + f"\nRerun: `python benchmarks/bench_pt2e.py --threads {' '.join(map(str, args.threads))}`\n")
        update_section("bench_pt2e", md)


if __name__ == "__main__":
    main()
