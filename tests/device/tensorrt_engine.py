"""TensorRT check for a GPU machine: export subnets with `export_to_tensorrt`, build strongly typed engines, and
compare TensorRT's outputs with ONNX Runtime (the graph as written) and with the supernet in torch.

Run through ``tests/device/tensorrt_engine.sh`` (the device lane; pytest does not collect it). Exits 0 with a "SKIP:" line when `tensorrt` or CUDA is missing
(this is a device script, not a test); exits 1 when TensorRT rejects an export or the outputs disagree by more
than the bar, printing why. Results go to ``<out>/device_tensorrt.json``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_adapters():
    """eqnet_plugin.adapters from an install, or straight from the source tree (setup.cfg maps adapters/)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("eqnet_plugin.adapters.tensorrt")
    except ImportError:
        spec = importlib.util.spec_from_file_location("eqnet_plugin.adapters", ROOT / "adapters" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "adapters")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["eqnet_plugin.adapters"] = pkg
        spec.loader.exec_module(pkg)
        return importlib.import_module("eqnet_plugin.adapters.tensorrt")


def _skip(why: str) -> int:
    print(f"SKIP: {why}")
    return 0


def build_supernet(torch):
    """TinyResNet on digits with BN statistics from data and signed activation quantizers (TensorRT's INT8)."""
    from eqnet_plugin import ElasticSpace, Supernet, prepare_qat
    from eqnet_plugin.app.data import digits_splits
    from eqnet_plugin.app.models import TinyResNet

    sp = digits_splits(image_size=16)
    xt, xs = sp.train.tensors[0][:256], sp.test.tensors[0]
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model(xt)
    space = ElasticSpace(weight_bits=(4, 8), act_bits=(8,), fixed_bits=None)
    gm = prepare_qat(model, (xt[:2],), space=space)
    sn = Supernet(gm)
    sn.calibrate([xt], signed_activations=True)  # TensorRT's INT8 grid: ReLU outputs use codes 0..127
    gm.eval()
    return sn, xs


def build_engine(trt, path: str, shape: tuple, log):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        log("TensorRT has no STRONGLY_TYPED flag (TensorRT < 9); building a weakly typed network")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    else:
        flags = 1 << int(flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser rejected the export: " + "; ".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1,) + shape[1:], shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build an engine from the export (see the log above)")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def run_engine(torch, engine, x):
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n).name == "INPUT")
    out = next(n for n in names if engine.get_tensor_mode(n).name == "OUTPUT")
    xin = x.cuda().contiguous()
    ctx.set_input_shape(inp, tuple(xin.shape))
    y = torch.empty(tuple(ctx.get_tensor_shape(out)), device="cuda", dtype=torch.float32)
    ctx.set_tensor_address(inp, xin.data_ptr())
    ctx.set_tensor_address(out, y.data_ptr())
    stream = torch.cuda.current_stream()

    def once():
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
    once()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        once()
    torch.cuda.synchronize()
    return y.cpu(), (time.perf_counter() - t) / 20 * 1e3


def compare(a, b, scale: float) -> dict:
    lsb = (a - b).abs() / scale
    return {"within_1lsb": float((lsb <= 1.001).float().mean()), "max_lsb": float(lsb.max()),
            "top1": float((a.argmax(1) == b.argmax(1)).float().mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "device_tensorrt"))
    args = ap.parse_args(argv)
    try:
        import tensorrt as trt
    except ImportError:
        return _skip("the tensorrt Python package is not installed (pip install tensorrt on a CUDA machine)")
    try:
        import torch
    except ImportError:
        return _skip("torch is not installed in this Python")
    if not torch.cuda.is_available():
        return _skip("no CUDA device visible to torch")
    import onnxruntime as ort

    tensorrt_adapter = _import_adapters()
    from eqnet_plugin.export.freeze import freeze

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"TensorRT {trt.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    sn, xs = build_supernet(torch)
    variants = {"w8a8_per_channel_opset17": (sn.uniform(8, 8, symmetric=True, per_channel=True), 17),
                "w8a8_per_tensor_opset17": (sn.uniform(8, 8, symmetric=True, per_channel=False), 17),
                "w4a8_int4_linear_opset21": (sn.uniform(4, 8, symmetric=True, per_channel=True), 21)}
    results, failed = {}, []
    for name, (cfg, opset) in variants.items():
        frozen = freeze(sn, cfg)
        path = str(out_dir / f"{name}.onnx")
        try:
            tensorrt_adapter.export_to_tensorrt(frozen, (xs[:2],), path, opset=opset)
            engine = build_engine(trt, path, tuple(xs.shape), print)
            got, ms = run_engine(torch, engine, xs)
        except Exception as e:               # report every variant, then fail
            print(f"{name}: FAILED: {e}")
            failed.append(name)
            results[name] = {"error": str(e)}
            continue
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ref_ort = torch.from_numpy(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                                   .run(None, {"input": xs.numpy()})[0])
        with sn.activate(cfg), torch.no_grad():
            ref_torch = sn.model(xs)
        scale = float(frozen.qparams[sn.act_groups[-1]].scale)
        res = {"trt_vs_ort": compare(got, ref_ort, scale), "trt_vs_supernet": compare(got, ref_torch, scale),
               "latency_ms_batch": ms, "batch": int(xs.shape[0])}
        results[name] = res
        print(f"{name}: TensorRT vs ORT {res['trt_vs_ort']}, vs supernet {res['trt_vs_supernet']}, {ms:.3f} ms")
        if res["trt_vs_supernet"]["top1"] < 0.99:
            failed.append(name)
    (out_dir / "device_tensorrt.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out_dir / 'device_tensorrt.json'}")
    if failed:
        print(f"FAILED variants: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
