"""OpenVINO export: our Q/DQ ONNX converted to OpenVINO IR (``model.xml`` + ``model.bin``), run by the CPU plugin.

`export_openvino` writes the subnet with `export_onnx` (the parity-tested Q/DQ graph), converts it with
``openvino.convert_model`` and saves it with ``openvino.save_model(..., compress_to_fp16=False)``: every Q/DQ pair
becomes a FakeQuantize, which OpenVINO's low precision transformations (LPT) split into a quantize to u8/i8 and a
dequantize they move past the next convolution / matmul, so the CPU plugin runs those in INT8 kernels.

What the CPU plugin runs in integer kernels (OpenVINO docs: "Low Precision Transformations", "Low Precision IR
(INT8 Inference)"; checked here on the compiled model's ``runtimePrecision``, see `integer_precisions`):

* a Convolution / MatMul runs INT8 only when both its data and its weight input come from a FakeQuantize;
* activations: 8-bit, per-tensor, unsigned (u8, any zero point) or signed (i8); LPT quantizes to 256 levels;
* weights: 8-bit, symmetric (zero point 0), per-tensor or per output channel (axis 0). Asymmetric weights (a
  weight zero point) made the convolutions run in f32 here (measured on OpenVINO 2026.4), so they are refused;
* sub-8-bit grids are valid 8-bit codes, but LPT sees a FakeQuantize with fewer than 256 levels: OpenVINO would run
  them in f32 (or as i8 with a different rounding), so `openvino_problems` refuses them (use the ``onnx`` target).

`openvino_problems` lists every rule a subnet breaks; the ``openvino`` search profile
(`eqnet_plugin.search.profiles`) proposes only subnets that satisfy them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from eqnet_plugin.export.ir import FrozenSubnet

__all__ = ["openvino_problems", "export_openvino", "load_openvino", "integer_precisions", "INTEGER_LAYERS"]

INTEGER_LAYERS = ("Convolution", "FullyConnected", "MatMul")
_HINT = 'pip install -e ".[openvino]"'


def openvino_problems(frozen: FrozenSubnet) -> list[str]:
    """Every rule of OpenVINO's CPU INT8 path that `frozen` breaks (empty: it runs in integer kernels)."""
    problems = []
    for g, qp in frozen.qparams.items():
        weight = frozen.is_weight(g)
        kind = "weight" if weight else "activation"
        if qp.bits != 8:
            problems.append(f"{kind} {g!r} is {qp.bits}-bit: OpenVINO's CPU plugin runs 8-bit grids in integer "
                            "kernels only; choose 8 bits (profile 'openvino') or export with the 'onnx' target")
        if weight and not qp.symmetric:
            problems.append(f"weight {g!r} is asymmetric: OpenVINO runs convolutions with a weight zero point in "
                            "f32; use symmetric weights (e.g. Scheme.SYM_PC)")
        if weight and qp.per_channel and qp.axis not in (0,):
            problems.append(f"weight {g!r} is per-channel along axis {qp.axis}: OpenVINO's INT8 kernels scale "
                            "weights per output channel (axis 0) or per tensor")
        if not weight and qp.per_channel:
            problems.append(f"activation {g!r} is per-channel: OpenVINO quantizes activations per tensor; use a "
                            "per-tensor activation grid")
    return problems


def export_openvino(frozen: FrozenSubnet, example_inputs: tuple, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``model.xml`` + ``model.bin`` (OpenVINO IR) of `frozen` into `folder`; returns {"xml", "bin"}.

    The intermediate ``model.onnx`` is removed. Raises ValueError (naming every broken rule) when the subnet
    breaks `openvino_problems`.
    """
    import openvino as ov

    from .onnx_qdq import export_onnx

    problems = openvino_problems(frozen)
    if problems:
        raise ValueError("OpenVINO cannot run this subnet in integer kernels: " + "; ".join(problems))
    folder = Path(folder)
    onnx_path = folder / "model.onnx"
    xml = folder / "model.xml"
    try:
        export_onnx(frozen, example_inputs, onnx_path)
        ov.save_model(ov.convert_model(os.fspath(onnx_path)), os.fspath(xml), compress_to_fp16=False)
    except BaseException:
        for p in (xml, xml.with_suffix(".bin")):
            p.unlink(missing_ok=True)
        raise
    finally:
        onnx_path.unlink(missing_ok=True)
    return {"xml": xml, "bin": xml.with_suffix(".bin")}


def _compile(path: str | os.PathLike, threads: int):
    import openvino as ov
    core = ov.Core()
    # f32 inference precision: CPUs with bf16 would otherwise run the float parts (dequantize, adds) in bf16.
    return core.compile_model(os.fspath(path), "CPU", {"INFERENCE_NUM_THREADS": int(threads),
                                                       "INFERENCE_PRECISION_HINT": "f32",
                                                       "PERFORMANCE_HINT": "LATENCY"})


def load_openvino(files: Mapping[str, os.PathLike] | str | os.PathLike, threads: int = 1
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Compile written files (``{"xml": ...}`` or ``{"onnx": ...}``, or one path) for the CPU; returns
    ``run(x: np.ndarray) -> np.ndarray`` (the first output). ``run.compiled`` is the compiled model."""
    path = files if isinstance(files, (str, os.PathLike)) else files.get("xml", files.get("onnx"))
    if path is None:
        raise ValueError(f"load_openvino needs an 'xml' or 'onnx' file, got {sorted(files)}")
    compiled = _compile(path, threads)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer([np.ascontiguousarray(x, dtype=np.float32)])[0])

    run.compiled = compiled
    return run


def integer_precisions(compiled) -> dict[str, set[str]]:
    """{layer type: runtime precisions} of the compiled model's Convolution / FullyConnected / MatMul layers
    (``u8`` / ``i8``: integer kernels; ``f32``: float)."""
    out: dict[str, set[str]] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in INTEGER_LAYERS:
            out.setdefault(kind, set()).add(info["runtimePrecision"].astype(str))
    return out
