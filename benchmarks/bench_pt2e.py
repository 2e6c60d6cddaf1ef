"""QAT training step on the PT2E path vs the FX path: torchvision ResNet-18 and MobileNetV2, CPU.

Models: ``torchvision.models.resnet18(num_classes=10)`` and ``mobilenet_v2(num_classes=10)``, 3x28x28 inputs, batch
64 (as benchmarks/_supernet_torchvision.py trains them). Four step variants per model, same weights and batch:
  * torch.ao FX default QAT: ``prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), ex)``, Adam step.
  * elastic FX: ``prepare_qat_fx(model, elastic_qconfig_mapping(), ex)`` (`elastic_backend_config()` for
    MobileNetV2), `Supernet`, calibrated, ``qat_step(sn, cfg, x, y, adam, recipe=SandwichConfig(wdr=None))`` at
    the fixed subnet ``cfg = sn.uniform(4, 4, per_channel=True)``.
  * torchao PT2E x86 QAT: ``prepare_qat_pt2e(exported, X86InductorQuantizer(...is_qat=True))`` (torchao 0.18 needs
    `split_reused_modules` first for ResNet's reused ReLU; annotation metadata only), Adam step.
  * elastic PT2E: ``eqnet_plugin.frontends.pt2e.prepare_qat(model, ex)``, `Supernet`, the same `qat_step`/subnet.
Ratios: elastic PT2E / elastic FX and torchao PT2E / torch.ao FX, medians over interleaved rounds in one run. A
profile (torch.profiler, self CPU time per op, a few steps of each elastic variant) says where the time goes.

A third row times ResNet-18 at 3x32x32, batch 32 (the setting of the earlier bench_pt2e / bench_step sections,
whose PT2E and FX numbers came from different runs) in the same run.

Budget: 10 interleaved rounds of one step per variant per model, 2 warm-up steps, 3 profiled steps per variant
(the two 28x28 models); wall time about 13 min at one thread on 2 cores shared with other jobs (load
average 5-10); a few minutes on an idle machine.
    python benchmarks/bench_pt2e.py                 # writes the `bench_pt2e` section
    python benchmarks/bench_pt2e.py --no-write [--rounds 10] [--models resnet18]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import headline, machine, update_section  # noqa: E402

BATCH, SIZE, CLASSES = 64, 28, 10
MODELS = {"resnet18": ("resnet18", SIZE, BATCH), "mobilenet_v2": ("mobilenet_v2", SIZE, BATCH),
          # the setting of the earlier bench_pt2e / bench_step runs (3x32x32, batch 32), timed here in the same run
          "resnet18 32x32 b32": ("resnet18", 32, 32)}
PROFILED = ("resnet18", "mobilenet_v2")
TARGET = 1.3


def _model(name: str) -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES).train()


def _adam_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _elastic_step(sn, x: torch.Tensor, y: torch.Tensor):
    import eqnet_plugin as eq
    from eqnet_plugin.train import qat_step
    sn.calibrate([x[:16]])
    cfg = sn.uniform(4, 4, per_channel=True)
    opt = torch.optim.Adam(sn.model.parameters(), lr=1e-3)
    recipe = eq.SandwichConfig(wdr=None)
    return lambda: qat_step(sn, cfg, x, y, opt, recipe=recipe)


def variants(name: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """{variant: step function}; each variant holds its own copy of one model."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    import eqnet_plugin as eq
    from eqnet_plugin.frontends.pt2e import prepare_qat, split_reused_modules
    from eqnet_plugin.frontends.pt2e.quantizer import x86_qat_quantizer
    model, ex = _model(name), (x[:2],)
    bc = eq.elastic_backend_config() if "mobilenet" in name else None
    ao_fx = prepare_qat_fx(copy.deepcopy(model), get_default_qat_qconfig_mapping("x86"), ex)
    el_fx = eq.Supernet(prepare_qat_fx(copy.deepcopy(model), eq.elastic_qconfig_mapping(), ex, backend_config=bc))
    exported = torch.export.export(copy.deepcopy(model), ex, dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    ao_pt2e = prepare_qat_pt2e(split_reused_modules(exported), x86_qat_quantizer())
    el_pt2e = eq.Supernet(prepare_qat(model, ex))
    return {"torch.ao FX": _adam_step(ao_fx, x, y), "elastic FX": _elastic_step(el_fx, x, y),
            "torchao PT2E": _adam_step(ao_pt2e, x, y), "elastic PT2E": _elastic_step(el_pt2e, x, y)}


def time_rounds(steps: dict, rounds: int, warmup: int) -> dict[str, float]:
    for st in steps.values():
        for _ in range(warmup):
            st()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, st in steps.items():
            t0 = time.perf_counter()
            st()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _bucket(op: str) -> str:
    if "fake_quant" in op or "elastic" in op.lower() or op in ("aten::round", "aten::clamp", "aten::clamp_"):
        return "round, clamp, fused fake-quant kernels"
    if "convolution" in op or "conv" in op or "mkldnn" in op or op in ("aten::addmm", "aten::mm", "aten::linear"):
        return "conv / linear (+ backward)"
    if "batch_norm" in op:
        return "batch norm (+ backward)"
    if op.startswith("Optimizer") or "_foreach" in op or op in ("aten::lerp_", "aten::sqrt", "aten::addcdiv_",
                                                               "aten::addcmul_"):
        return "optimizer"
    if op in ("aten::copy_", "aten::clone", "aten::empty", "aten::empty_like", "aten::zeros_like",
              "aten::contiguous", "aten::to", "aten::_to_copy", "aten::detach", "aten::view", "aten::reshape",
              "aten::as_strided", "aten::t", "aten::expand", "aten::resize_", "aten::zero_", "aten::fill_"):
        return "copies / views / allocation"
    return "other element-wise + autograd"


def profile(step, n: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Self CPU ms per step: by bucket, and the top ops (name, ms, calls per step)."""
    from torch.profiler import ProfilerActivity, profile as tprof
    with tprof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            step()
    buckets: dict[str, float] = defaultdict(float)
    ops = []
    for e in p.key_averages():
        ms = e.self_cpu_time_total / 1e3 / n
        buckets[_bucket(e.key)] += ms
        ops.append((e.key, ms, e.count // n))
    ops.sort(key=lambda t: -t[1])
    return dict(buckets), ops


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps per elastic variant (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    t_start = time.time()
    rows = ["| model | torch.ao FX | elastic FX | torchao PT2E | elastic PT2E | elastic PT2E / FX | "
            "torchao PT2E / torch.ao FX |", "|---|---:|---:|---:|---:|---:|---:|"]
    cols = ["conv / linear (+ backward)", "batch norm (+ backward)", "round, clamp, fused fake-quant kernels",
            "copies / views / allocation", "other element-wise + autograd", "optimizer"]
    prof_rows = ["| model | variant | " + " | ".join(cols) + " | total | top 3 ops (ms, calls) |",
                 "|---|---|" + "---:|" * 7 + "---|"]
    ratios: dict[str, float] = {}
    for name in args.models:
        arch, size, batch = MODELS[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(CLASSES, (batch,), generator=g)
        steps = variants(arch, x, y)
        med = time_rounds(steps, args.rounds, args.warmup)
        r_el = med["elastic PT2E"] / med["elastic FX"]
        r_ao = med["torchao PT2E"] / med["torch.ao FX"]
        ratios[name] = r_el
        rows.append(f"| {name} | " + " | ".join(f"{med[k] * 1e3:.0f} ms" for k in steps)
                    + f" | {r_el:.2f}x | {r_ao:.2f}x |")
        print(rows[-1], flush=True)
        profiled = args.profile_steps and name in PROFILED
        for k in (("elastic FX", "elastic PT2E", "torch.ao FX", "torchao PT2E") if profiled else ()):
            buckets, ops = profile(steps[k], args.profile_steps)
            top = ", ".join(f"`{o.removeprefix('aten::')}` {ms:.0f} ({c})" for o, ms, c in ops[:3])
            row = (f"| {name} | {k} | " + " | ".join(f"{buckets.get(c, 0.0):.0f}" for c in cols)
                   + f" | {sum(buckets.values()):.0f} | {top} |")
            print(row + "\n  top 8: " + ", ".join(f"{o} {ms:.0f} ({c})" for o, ms, c in ops[:8]), flush=True)
            if k.startswith("elastic"):
                prof_rows.append(row)
        del steps
    wall = time.time() - t_start
    print(f"wall {wall:.0f} s")
    if not args.no_write:
        main_models = [m for m in args.models if m in PROFILED]
        head = headline(f"PT2E step: elastic PT2E / elastic FX, {' / '.join(main_models)} (target <= {TARGET}x)",
                        " / ".join(f"{ratios[m]:.2f}x" for m in main_models))
        md = (f"## bench_pt2e\n\n{head}\n\n"
              f"QAT training step on the PT2E path vs the FX path: torchvision models (`num_classes={CLASSES}`), "
              f"3x{SIZE}x{SIZE}, batch {BATCH} (last row: 3x32x32, batch 32, the earlier sections' setting), CPU, "
              f"{args.threads} thread(s); forward + cross-entropy + backward + Adam; elastic steps are `qat_step` "
              f"at W4A4 sym/per-channel. Medians of {args.rounds} interleaved rounds after {args.warmup} warm-up "
              f"steps, one run (machine: {machine()}; load average at start: {load}; wall {wall:.0f} s); below, "
              f"self CPU ms per elastic step by op group (torch.profiler, {args.profile_steps} steps). "
              "Rerun: `python benchmarks/bench_pt2e.py`.\n\n" + "\n".join(rows) + "\n\n"
              + "\n".join(prof_rows) + "\n")
        update_section("bench_pt2e", md)


if __name__ == "__main__":
    main()
