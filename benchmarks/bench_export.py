"""ONNX Runtime latency of exported subnets, W2A2 to W8A8, vs float and vs ONNX Runtime's own quantizer.

Per model (torchvision ResNet-18 and MobileNetV2, random init, BN statistics from random batches), one run times, in
interleaved rounds (medians compared, because other processes may share the CPU):

* fp32: the same BN-folded graph without Q/DQ;
* ort_static: ONNX Runtime's `quantize_static` of that float graph (QDQ, per-channel int8 weights, uint8
  activations, calibrated on the same batches);
* w8a8: `export_onnx` with its default `Rounding.TRAINING` (rounds as training; sub-8-bit layers stay in float);
* w4a4 (training): the same form at 4 bits, which ONNX Runtime cannot fuse (the "before" of item 6);
* wNaN (integer kernels), N in 8, 6, 5, 4, 3, 2: `export_onnx(..., rounding=Rounding.INTEGER_KERNELS)` of
  ``uniform(N, N, symmetric=True, per_channel=True, act_symmetric=False)``.

Batch 1, one intra-op thread, ONNX Runtime's default optimizations. The op counts of ONNX Runtime's optimized graph
show which layers became integer kernels; top-1 agreement and output LSBs compare ONNX Runtime's default session
with the supernet (torch) on random inputs.

Command (budget: 10 interleaved rounds of 5 runs per variant, 10 variants, 2 models, 112x112, plus the OpenVINO
rows of `_export_openvino.openvino_latency` where OpenVINO is installed; wall time: see the section):
    python benchmarks/bench_export.py [--rounds 10] [--runs 5] [--size 112] [--models resnet18,mobilenet_v2]
        [--no-write]

Writes the `bench_export` section of BENCHMARKS.md (not with --no-write).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import headline, machine, update_section  # noqa: E402

from eqnet_plugin import ElasticSpace, Supernet, elastic_backend_config, prepare_qat  # noqa: E402
from eqnet_plugin.adapters._onnx import export_marked, replace_markers, save_model_atomic  # noqa: E402
from eqnet_plugin.adapters.onnx_qdq import Rounding, export_onnx  # noqa: E402
from eqnet_plugin.export.freeze import freeze  # noqa: E402

THREADS = 1
BITS = (8, 6, 5, 4, 3, 2)
SPACE = ElasticSpace(weight_bits=BITS, act_bits=BITS, weight_symmetric=(True,), act_symmetric=(False,),
                     weight_per_channel=(True,))
FUSED = ("QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearMatMul")


def build(name: str, size: int, gen: torch.Generator):
    """Prepared + calibrated supernet of a torchvision model (random init, BN statistics from random batches)."""
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=1000)
    batches = [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)]
    with torch.no_grad():                       # BN statistics from data, so activations are normalized
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        for b in batches:
            model(b)
    bc = elastic_backend_config() if name == "mobilenet_v2" else None
    gm = prepare_qat(model, (batches[0][:1],), space=SPACE, backend_config=bc)
    sn = Supernet(gm)
    sn.calibrate(batches)
    gm.eval()
    return sn, batches


def session(path: str, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads must not spin: the variants are timed interleaved (a spinning pool steals the cores from
    # the next session's runs).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def fused_ops(path: str) -> dict[str, int]:
    """Op counts of ONNX Runtime's optimized graph (which Q/DQ patterns became integer kernels)."""
    import onnx

    out = f"{path}.optimized.onnx"
    session(path, out)
    return dict(collections.Counter(n.op_type for n in onnx.load(out).graph.node))


def ort_static(fpath: str, batches: list, out: str) -> str:
    """ONNX Runtime's own post-training quantization of the float graph (QDQ, per-channel, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": b[i:i + 1].numpy()} for b in batches for i in range(len(b))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(fpath, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def export_variants(sn, batches, folder: str, name: str) -> dict[str, tuple[str, object]]:
    """variant -> (ONNX path, subnet config or None for the float / ORT-quantized graphs)."""
    example = (batches[0][:1],)
    f = Path(folder)
    cfg8 = sn.uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False)
    frozen8 = freeze(sn, cfg8)
    fmodel = export_marked(frozen8, example)
    replace_markers(fmodel, lambda group, src, dst: [])
    fpath = save_model_atomic(fmodel, f / f"{name}_fp32.onnx")
    out = {"fp32": (fpath, None), "ort_static": (ort_static(fpath, batches, str(f / f"{name}_ort.onnx")), None),
           "w8a8": (export_onnx(frozen8, example, f / f"{name}_w8a8.onnx"), cfg8)}
    cfg4 = sn.uniform(4, 4, symmetric=True, per_channel=True, act_symmetric=False)
    out["w4a4 (training)"] = (export_onnx(freeze(sn, cfg4), example, f / f"{name}_w4a4.onnx"), cfg4)
    for b in BITS:
        cfg = sn.uniform(b, b, symmetric=True, per_channel=True, act_symmetric=False)
        out[f"w{b}a{b} (integer kernels)"] = (export_onnx(freeze(sn, cfg), example, f / f"{name}_w{b}a{b}_ik.onnx",
                                                          rounding=Rounding.INTEGER_KERNELS), cfg)
    return out


def agreement(sn, cfg, sess, gen: torch.Generator, size: int, n: int = 8) -> tuple[float, float]:
    """(top-1 agreement, max output LSBs) of ORT's default session vs the supernet on `n` random inputs."""
    xs = torch.randn(n, 3, size, size, generator=gen)
    with sn.activate(cfg), torch.no_grad():
        want = sn.model(xs).numpy()
    got = np.concatenate([sess.run(None, {"input": xs[i:i + 1].numpy()})[0] for i in range(n)])
    out_scale = float(freeze(sn, cfg).qparams[sn.act_groups[-1]].scale)
    return float((got.argmax(1) == want.argmax(1)).mean()), float(np.abs(got - want).max() / out_scale)


def bench_model(name: str, size: int, rounds: int, runs: int, folder: str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    sn, batches = build(name, size, gen)
    variants = export_variants(sn, batches, folder, name)
    sessions = {k: session(p) for k, (p, _) in variants.items()}
    x = batches[0][:1].numpy()
    for s in sessions.values():                 # warm-up
        for _ in range(2):
            s.run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):                     # interleaved: every variant sees the same machine load
        for key, s in sessions.items():
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, {"input": x})
                times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = []
    for key, (path, cfg) in variants.items():
        ops = fused_ops(path)
        top1, lsb = agreement(sn, cfg, sessions[key], gen, size) if cfg is not None else (None, None)
        rows.append({"model": name, "variant": key, "ms": med[key], "vs_w8a8_ik": med[key] / med["w8a8 (integer kernels)"],
                     "vs_ort_static": med[key] / med["ort_static"], "vs_fp32": med[key] / med["fp32"],
                     "fused": sum(ops.get(o, 0) for o in FUSED), "float_ops": ops.get("Conv", 0)
                     + ops.get("FusedConv", 0) + ops.get("Gemm", 0) + ops.get("FusedGemm", 0),
                     "ops": ops, "top1": top1, "max_lsb": lsb, "samples": rounds * runs})
    return rows


def openvino_rows(args) -> list[str]:
    """One markdown line from `_export_openvino.openvino_latency` (same models, size and rounds), where OpenVINO is
    installed; empty otherwise."""
    try:
        import openvino  # noqa: F401
        from _export_openvino import openvino_latency
    except ImportError:
        return []
    res = openvino_latency(models=tuple(m.strip() for m in args.models.split(",")), image_size=args.size,
                           rounds=args.rounds, runs=args.runs)
    parts = [f"{m} {r['ours_ms']:.2f} ms, {r['ours_vs_fp32']:.2f}x of fp32 ({r['fp32_ms']:.2f} ms)"
             + ("" if r["ours_vs_nncf"] is None else f", {r['ours_vs_nncf']:.2f}x of NNCF ({r['nncf_ms']:.2f} ms)")
             for m, r in res.items()]
    return ["", f"OpenVINO {next(iter(res.values()))['openvino'].split('-')[0]} CPU, one thread, same size "
            "(`benchmarks/_export_openvino.py`), our W8A8 export: " + "; ".join(parts) + "."]


def markdown(rows: list[dict], ov: list[str], args, load: tuple[float, float], wall_s: float) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["variant"]): r for r in rows}
    md = ["## bench_export", "", "ONNX Runtime latency of exported subnets from W2A2 to W8A8, against float and ONNX "
          "Runtime's own `quantize_static` of the same network.", ""]
    for model in models:
        ik = [r for r in rows if r["model"] == model and "integer kernels" in r["variant"]]
        worst = max(ik, key=lambda r: r["vs_w8a8_ik"])
        md.append(headline(f"ORT {model}: slowest W2A2..W6A6 vs W8A8; W8A8 vs ORT quantize_static (integer kernels)",
                           f"{worst['vs_w8a8_ik']:.2f}x ({worst['variant'].split()[0]}); "
                           f"{by[(model, 'w8a8 (integer kernels)')]['vs_ort_static']:.2f}x"))
    md += ["", f"Batch 1, {args.size}x{args.size}, {THREADS} intra-op thread (pools not spinning), default graph "
           f"optimizations; median of {rows[0]['samples']} runs per variant in {args.rounds} interleaved rounds. "
           "`integer kernels` = `export_onnx(..., rounding=Rounding.INTEGER_KERNELS)` (module docstring of "
           "`adapters/onnx_qdq.py`); `w8a8` / `w4a4 (training)` = the default `Rounding.TRAINING`. Per model: ms, "
           "ratio to W8A8 (integer kernels), ratio to ORT `quantize_static`, integer-kernel / float Conv+Gemm nodes "
           "in ORT's optimized graph, top-1 agreement and max output LSBs of ORT's default session vs the supernet "
           "on 8 random inputs (random-init weights: says little about a trained model).", "",
           "| variant | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for m in models:
            r = by[(m, variant)]
            agree = "" if r["top1"] is None else f", {r['top1']:.2f} / {r['max_lsb']:.0f} LSB"
            cells.append(f"{r['ms']:.2f} ms, {r['vs_w8a8_ik']:.2f}x, {r['vs_ort_static']:.2f}x, "
                         f"{r['fused']}/{r['float_ops']}{agree}")
        md.append(f"| {variant} | " + " | ".join(cells) + " |")
    md += ov
    md += ["", f"Machine: {machine()}; 1-minute load average {load[0]:.1f} before / {load[1]:.1f} after (above the "
           f"core count other jobs shared the CPU: absolute times inflate, interleaved ratios less so). Wall time "
           f"{wall_s / 60:.1f} min. Command: `python benchmarks/bench_export.py`."]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            for r in bench_model(name.strip(), args.size, args.rounds, args.runs, folder):
                print(f"{r['model']} {r['variant']}: {r['ms']:.2f} ms, x{r['vs_w8a8_ik']:.2f} of W8A8 (integer "
                      f"kernels), x{r['vs_ort_static']:.2f} of ORT static, fused {r['fused']} float {r['float_ops']}, "
                      f"top-1 {r['top1']}, max LSB {r['max_lsb']}", flush=True)
                rows.append(r)
    ov = openvino_rows(args)
    text = markdown(rows, ov, args, (load_before, os.getloadavg()[0]), time.perf_counter() - t0)
    if args.no_write:
        print(text)
    else:
        update_section("bench_export", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
