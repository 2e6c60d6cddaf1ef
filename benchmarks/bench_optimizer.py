"""What one Adam state per sandwich subnet costs: `sandwich_step` with `SubnetOptimizer(Adam)` vs one `Adam`.

Models (each an elastic supernet, calibrated once; both optimizers train their own copy from the same weights on the
same batch and the same sampled subnets):
  * TinyMobileNetV2 at 28x28, batch 64, stride-2 stem (bench_supernet_fashion's model and batch);
  * torchvision ResNet-18 (10 classes) at 32x32, batch 32 (bench_step's model; 11M parameters, so the optimizer
    steps weigh more than on the tiny models).
Three optimizers: one `torch.optim.Adam` (the baseline of the ratios), `SubnetOptimizer(Adam)` and
`SubnetOptimizer(Adam, fused=True)` (torch's fused Adam kernel for the three inner steps).
Timings are medians over steps of whole sandwich steps (three forwards and backwards, WDR, clipping, the optimizer
step); rounds interleave the two optimizers so machine noise hits both alike. The memory column counts the
optimizer state tensors.

    python benchmarks/bench_optimizer.py [--rounds 15] [--threads 1] [--no-write]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, update_section  # noqa: E402

import eqnet_plugin as eq  # noqa: E402
from eqnet_plugin.train.losses import WDRLoss  # noqa: E402


LABELS = ("one Adam", "SubnetOptimizer(Adam)", "SubnetOptimizer(Adam, fused=True)")


def _supernet(name: str):
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        import torchvision
        torch.manual_seed(0)
        model, batch, shape, bc = torchvision.models.resnet18(weights=None, num_classes=10), 32, (3, 32, 32), None
    else:
        from eqnet_plugin.app.models import build_model
        torch.manual_seed(0)
        model, batch, shape = build_model("tiny_mobilenet_v2", stem_stride=2), 64, (1, 28, 28)
        bc = eq.elastic_backend_config()
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = prepare_qat_fx(model.train(), eq.elastic_qconfig_mapping(), (x[:1],), backend_config=bc)
    sn = eq.Supernet(gm)
    sn.calibrate([x])
    return sn, x, y


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    inner = opt.inner if isinstance(opt, eq.SubnetOptimizer) else (opt,)
    return sum(t.numel() * t.element_size() for o in inner for s in o.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def measure(name: str, rounds: int, warmup: int) -> dict:
    sn, x, y = _supernet(name)
    runs = {}
    for label in LABELS:
        s = eq.Supernet(copy.deepcopy(sn.model), sn.space)
        kw = {"fused": True} if "fused" in label else {}
        opt = (torch.optim.Adam(s.model.parameters(), lr=1e-3) if label == "one Adam"
               else eq.SubnetOptimizer(s.model.parameters(), torch.optim.Adam, lr=1e-3, **kw))
        runs[label] = (s, opt, torch.Generator().manual_seed(0))

    def step(label: str) -> float:
        s, opt, gen = runs[label]
        t0 = time.perf_counter()
        eq.sandwich_step(s, x, y, opt, generator=gen, wdr=WDRLoss())
        return time.perf_counter() - t0

    for label in runs:
        for _ in range(warmup):
            step(label)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for label in runs:
            times[label].append(step(label))
    params = sum(p.numel() for p in sn.model.parameters())
    return {"model": name, "params": params, "batch": len(x),
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "state_bytes": {k: _state_bytes(runs[k][1]) for k in runs}}


def table(results: list[dict]) -> str:
    rows = ["| model | parameters | batch | one Adam (ms / step) | SubnetOptimizer (ms / step, ratio) | "
            "SubnetOptimizer, fused Adam (ms / step, ratio) | optimizer state, one Adam | SubnetOptimizer |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        a, b, c = (r["median_s"][k] for k in LABELS)
        sa, sb = r["state_bytes"]["one Adam"], r["state_bytes"]["SubnetOptimizer(Adam)"]
        rows.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {a * 1e3:.1f} | {b * 1e3:.1f} "
                    f"({b / a:.2f}x) | {c * 1e3:.1f} ({c / a:.2f}x) | {sa / 2**20:.1f} MiB | {sb / 2**20:.1f} MiB |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (each times one step per optimizer)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["tiny_mobilenet_v2", "resnet18"])
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    results = [measure(m, args.rounds, args.warmup) for m in args.models]
    text = table(results)
    print(text)
    if not args.no_write:
        update_section("bench_optimizer", (
            "## bench_optimizer: what one Adam state per sandwich subnet costs\n\n"
            + __doc__.split("\n\n")[0].strip() + "\n\n"
            + f"Machine: {machine()}, {args.threads} thread(s); load average when the run started: {load}. Median "
            f"of {args.rounds} interleaved sandwich steps per optimizer after {args.warmup} warm-up steps.\n\n"
            + text + f"\n\nRerun: `python benchmarks/bench_optimizer.py --threads {args.threads}`\n"))


if __name__ == "__main__":
    main()
