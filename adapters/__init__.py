"""Exporters from a frozen subnet (`eqnet_plugin.freeze`) to deployment toolchains; installed as
`eqnet_plugin.adapters`. Each adapter imports its third-party package lazily, inside the function that needs it.

| target | function |
|---|---|
| ONNX Runtime (Q/DQ, sub-8-bit via Clip or INT4) | `export_onnx` |
| TensorRT explicit quantization | `export_to_tensorrt`, `check_tensorrt_onnx` |
| pytorch-quantization (TensorRT's PyTorch toolkit) | `to_pytorch_quantization` |
| Brevitas (and its QCDQ / QONNX exporters) | `to_brevitas`, `export_brevitas_qcdq`, `export_brevitas_qonnx` |
| Qualcomm QNN / AIMET encodings + fp32 ONNX | `export_qnn` |
"""
from .brevitas import export_brevitas_qcdq, export_brevitas_qonnx, to_brevitas
from .onnx_qdq import export_onnx
from .pytorch_quantization import to_pytorch_quantization
from .qnn import export_qnn
from .tensorrt import TensorRTCompatibilityError, assert_tensorrt_onnx, check_tensorrt_onnx, export_to_tensorrt

__all__ = ["export_onnx", "export_to_tensorrt", "check_tensorrt_onnx", "assert_tensorrt_onnx",
           "TensorRTCompatibilityError", "to_pytorch_quantization", "to_brevitas", "export_brevitas_qcdq",
           "export_brevitas_qonnx", "export_qnn"]
