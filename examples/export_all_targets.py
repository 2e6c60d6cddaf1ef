"""Export subnets of one supernet to every deployment target, without training.

    python examples/export_all_targets.py --checkpoint runs/demo/supernet.pt --out runs/export_all
    python examples/export_all_targets.py --out runs/export_all        # no checkpoint: build + calibrate a TinyResNet

Each target gets a subnet it can run (a supernet holds them all):

* ONNX Runtime (`export_onnx`): W4A4 asymmetric, sub-8-bit Q -> Clip -> DQ in 8-bit containers;
* TensorRT (`export_to_tensorrt`): W8A8 symmetric, per-channel weights, INT8 Q/DQ with zero point 0, checked with
  `check_tensorrt_onnx`; also as pytorch-quantization modules (`to_pytorch_quantization`);
* Brevitas (`to_brevitas`): W4A4 symmetric, as brevitas.nn modules and through Brevitas' QCDQ and QONNX exporters;
* QNN (`export_qnn`): W8A8, symmetric per-channel weights, asymmetric activations; float ONNX plus AIMET encodings
  in versions 0.6.1, 1.0.0 and 2.0.0.

Every ONNX file with Q/DQ nodes is run in ONNX Runtime and compared with the PyTorch subnet (top-1 agreement and
the largest output difference in LSBs of the output quantizer).
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch

import eqnet_plugin as eq
from eqnet_plugin.adapters import (check_tensorrt_onnx, export_brevitas_qcdq, export_brevitas_qonnx, export_onnx,
                                   export_qnn, export_to_tensorrt, to_brevitas, to_pytorch_quantization)
from eqnet_plugin.adapters.qnn import ENCODING_VERSIONS
from eqnet_plugin.app.data import digits_splits
from eqnet_plugin.app.models import TinyResNet


def supernet_and_data(checkpoint: str | None):
    """(supernet, training batches, a batch of test images): from a checkpoint of `eqnet train` / `eqnet demo`, or
    freshly built and calibrated."""
    if checkpoint:
        from eqnet_plugin.app.pipeline import load_experiment
        exp = load_experiment(checkpoint)
        return exp.supernet, exp.bn_batches, exp.splits.test.tensors[0][:128]
    splits = digits_splits(image_size=16)
    x = splits.train.tensors[0]                                               # (N, 1, 16, 16)
    torch.manual_seed(0)
    gm = eq.prepare_qat(TinyResNet(), (x[:1],))         # = prepare_qat_fx(model, elastic_qconfig_mapping(), ex)
    sn = eq.Supernet(gm)
    batches = [x[:128], x[128:256]]
    sn.calibrate(batches, signed_activations=True)      # every cell; signed activations: TensorRT runs them exactly
    return sn, batches, splits.test.tensors[0][:128]


def freeze_with_bn(sn, cfg, batches):
    """Freeze `cfg` with its own BatchNorm statistics, re-estimated on training batches (as evaluation does)."""
    with sn.activate(cfg):
        sn.recalibrate_bn(batches)
    return eq.freeze(sn, cfg)


def ort_parity(path: str, reference: torch.Tensor, x: torch.Tensor, out_scale: float) -> tuple[float, float]:
    """(top-1 agreement, max |difference| in output LSBs) of ONNX Runtime vs the PyTorch subnet."""
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    agree = float((got.argmax(1) == reference.argmax(1)).float().mean())
    return agree, float((got - reference).abs().max()) / out_scale


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="supernet checkpoint (default: build + calibrate TinyResNet)")
    p.add_argument("--out", default="runs/export_all")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sn, batches, x = supernet_and_data(args.checkpoint)
    ex = (x[:1],)
    os.makedirs(args.out, exist_ok=True)
    out = lambda *parts: os.path.join(args.out, *parts)
    rows: list[dict] = []

    def record(target, subnet, path, frozen=None):
        row = {"target": target, "subnet": subnet, "file": path}
        if frozen is not None:
            with torch.no_grad():
                ref = frozen(x)
            out_group = [g for g in frozen.qparams if not frozen.is_weight(g)][-1]
            row["top1"], row["max_lsb"] = ort_parity(path, ref, x, float(frozen.qparams[out_group].scale.max()))
        rows.append(row)

    # ONNX Runtime: sub-8-bit asymmetric subnet
    frozen = freeze_with_bn(sn, sn.uniform(4, 4, symmetric=False), batches)
    record("onnxruntime", "W4A4 asym", export_onnx(frozen, ex, out("onnxruntime", "w4a4_asym.onnx")), frozen)

    # TensorRT: symmetric INT8, per-channel weights, activations on the signed grid (a supernet trained with
    # --signed-activations; otherwise export_to_tensorrt refuses, naming the flag)
    frozen = freeze_with_bn(sn, sn.uniform(8, 8, symmetric=True, per_channel=True), batches)
    path = export_to_tensorrt(frozen, ex, out("tensorrt", "w8a8_sym_pc.onnx"))
    assert not check_tensorrt_onnx(path)
    record("tensorrt", "W8A8 sym per-channel", path, frozen)
    pq = to_pytorch_quantization(frozen)                                      # quant_nn modules with amax
    with torch.no_grad():
        diff = float((pq(x) - frozen(x)).abs().max())
    rows.append({"target": "pytorch-quantization", "subnet": "W8A8 sym per-channel", "file": "(in memory)",
                 "max_abs_diff": diff})

    # Brevitas: brevitas.nn modules, then Brevitas' own QCDQ and QONNX exporters
    frozen = freeze_with_bn(sn, sn.uniform(4, 4, symmetric=True), batches)
    bmodel = to_brevitas(frozen)
    with torch.no_grad():
        diff = float((bmodel(x) - frozen(x)).abs().max())
    rows.append({"target": "brevitas (modules)", "subnet": "W4A4 sym", "file": "(in memory)", "max_abs_diff": diff})
    record("brevitas QCDQ", "W4A4 sym", export_brevitas_qcdq(bmodel, ex, out("brevitas", "w4a4_qcdq.onnx")), frozen)
    record("brevitas QONNX", "W4A4 sym", export_brevitas_qonnx(bmodel, ex, out("brevitas", "w4a4_qonnx.onnx")))

    # QNN: float ONNX with stable tensor names + AIMET encodings, every version
    frozen = freeze_with_bn(sn, sn.uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False), batches)
    for version in ENCODING_VERSIONS:
        res = export_qnn(frozen, ex, out("qnn", f"w8a8_v{version}"), encoding_version=version)
        record(f"qnn encodings {version}", "W8A8 W sym pc / A asym", res.encodings_path)

    for r in rows:
        extra = "".join(f"  {k}={r[k]:.4g}" for k in ("top1", "max_lsb", "max_abs_diff") if k in r)
        print(f"{r['target']:24s} {r['subnet']:24s} {r['file']}{extra}")
    return rows


if __name__ == "__main__":
    main()
