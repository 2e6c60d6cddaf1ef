"""OpenVINO CPU latency at batch 1: our W8A8 export vs OpenVINO float32 vs NNCF's post-training quantization.

`openvino_latency` builds, per torchvision model (random init, BN statistics and calibration from random batches),
one W8A8 subnet (``uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False)``), and times in the same
run, in interleaved rounds (medians compared, the machine may be shared), on OpenVINO's CPU plugin with one
inference thread:

* ``ours``: the ``openvino`` target's IR (our Q/DQ ONNX converted by ``openvino.convert_model``);
* ``fp32``: the same BN-folded float network (``write_float_onnx``) read by OpenVINO;
* ``nncf``: ``nncf.quantize`` (default post-training preset, per-channel symmetric weights) of that float network,
  calibrated on the same batches (absent when nncf does not import).

It also records whether the convolutions run in integer kernels (``integer``: True when every Convolution /
FullyConnected / MatMul layer of the compiled model has runtime precision u8 or i8). bench_export.py prints it.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_ms(run, x: np.ndarray, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _build(name: str, image_size: int, calib: torch.Tensor):
    import torchvision

    from eqnet_plugin import ElasticSpace, Supernet, elastic_backend_config, prepare_qat
    space = ElasticSpace(weight_bits=(8,), act_bits=(8,), weight_symmetric=(True,), act_symmetric=(False,))
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    gm = prepare_qat(model, (calib[:1],), space=space,
                     backend_config=elastic_backend_config() if name == "mobilenet_v2" else None)
    sn = Supernet(gm)
    sn.calibrate([calib])
    gm.eval()
    return sn, sn.uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False)


def openvino_latency(models=("resnet18", "mobilenet_v2"), image_size: int = 224, rounds: int = 10,
                     runs: int = 5) -> dict:
    """Batch-1 OpenVINO CPU latency (one thread) of our W8A8 export, float32 and NNCF's quantization.

    Returns:
        {model: {"ours_ms", "fp32_ms", "nncf_ms" (None without nncf), "ours_vs_fp32", "ours_vs_nncf" (None without
        nncf), "integer": {variant: bool}, "openvino": version, "nncf": version or None}}; latencies are medians
        over `rounds` interleaved rounds of the per-round medians of `runs` runs.
    """
    import openvino as ov

    from eqnet_plugin.adapters import get_target
    from eqnet_plugin.adapters.openvino import integer_precisions, load_openvino
    from eqnet_plugin.adapters.report import write_float_onnx
    from eqnet_plugin.export.freeze import freeze
    try:
        import nncf
    except ImportError:
        nncf = None

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name in models:
        calib = torch.randn(16, 3, image_size, image_size, generator=gen)
        sn, cfg = _build(name, image_size, calib)
        frozen = freeze(sn, cfg)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ours = get_target("openvino").export(frozen, (calib[:1],), tmp / "ours")
            float_files = write_float_onnx(frozen, (calib[:1],), tmp)
            runners = {"ours": load_openvino(ours), "fp32": load_openvino(float_files)}
            if nncf is not None:
                float_model = ov.convert_model(str(float_files["onnx"]))
                dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
                quantized = nncf.quantize(float_model, dataset, subset_size=len(calib))
                ov.save_model(quantized, str(tmp / "nncf.xml"), compress_to_fp16=False)
                runners["nncf"] = load_openvino(tmp / "nncf.xml")
            x = calib[:1].numpy()
            for run in runners.values():         # warm-up
                for _ in range(3):
                    run(x)
            per_round = {k: [] for k in runners}
            for _ in range(rounds):
                for k, run in runners.items():
                    per_round[k].append(_median_ms(run, x, runs))
            ms = {k: statistics.median(v) for k, v in per_round.items()}
            integer = {k: all(p <= {"u8", "i8"} for p in integer_precisions(r.compiled).values())
                       for k, r in runners.items()}
        nncf_ms = ms.get("nncf")
        out[name] = {"ours_ms": ms["ours"], "fp32_ms": ms["fp32"], "nncf_ms": nncf_ms,
                     "ours_vs_fp32": ms["ours"] / ms["fp32"],
                     "ours_vs_nncf": ms["ours"] / nncf_ms if nncf_ms else None, "integer": integer,
                     "openvino": ov.__version__, "nncf": getattr(nncf, "__version__", None)}
    return out


if __name__ == "__main__":
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    a = ap.parse_args()
    print(json.dumps(openvino_latency(tuple(a.models.split(",")), a.size, a.rounds), indent=1))
