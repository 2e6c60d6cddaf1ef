"""Exporters from a frozen subnet (`eqnet_plugin.export.freeze`) to deployment toolchains; installed as
`eqnet_plugin.adapters`. Each adapter imports its third-party package lazily, inside the function that needs it,
and reads nothing of eqnet_plugin but the export IR (`eqnet_plugin.export.ir`), the space and the atomic file writer.

Every exporter takes the same first arguments: a `FrozenSubnet`, or a `Supernet` plus ``cfg=``. The target
registry (`Target`, `register_target`, `get_target`; see `eqnet_plugin.adapters.targets`) is what the CLI and the
pipeline use.

| target | function |
|---|---|
| ONNX Runtime (Q/DQ, sub-8-bit via Clip or INT4) | `export_onnx` |
| TensorRT explicit quantization | `export_to_tensorrt`, `check_tensorrt_onnx` |
| pytorch-quantization (TensorRT's PyTorch toolkit) | `to_pytorch_quantization` |
| Brevitas (and its QCDQ / QONNX exporters) | `to_brevitas`, `export_brevitas_qcdq`, `export_brevitas_qonnx` |
| Qualcomm QNN / AIMET encodings + fp32 ONNX | `export_qnn` |
"""
from .brevitas import export_brevitas_qcdq, export_brevitas_qonnx, to_brevitas
from ._policy import LowBit, UnsignedActivations
from .onnx_qdq import export_onnx
from .pytorch_quantization import to_pytorch_quantization
from .qnn import aimet_quantsim, export_qnn
from .targets import Target, TargetError, all_targets, get_target, register_target, target_names, unregister_target
from .tensorrt import TensorRTCompatibilityError, assert_tensorrt_onnx, check_tensorrt_onnx, export_to_tensorrt

__all__ = ["export_onnx", "export_to_tensorrt", "check_tensorrt_onnx", "assert_tensorrt_onnx",
           "TensorRTCompatibilityError", "to_pytorch_quantization", "to_brevitas", "export_brevitas_qcdq",
           "export_brevitas_qonnx", "export_qnn", "aimet_quantsim", "Target", "TargetError", "register_target",
           "unregister_target", "get_target", "target_names", "all_targets", "UnsignedActivations", "LowBit"]
