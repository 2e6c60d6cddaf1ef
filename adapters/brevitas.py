"""Brevitas adapter: a frozen subnet as `brevitas.nn` modules, and export through Brevitas' own ONNX exporters.

`to_brevitas(frozen)` copies the frozen graph and swaps
  * every `QuantConv{1,2,3}d` / `QuantLinear` for `brevitas.nn.QuantConv{1,2,3}d` / `QuantLinear` whose weight
    quantizer holds the layer's QParams (bias stays float), and
  * every activation `QuantPoint` for a `brevitas.nn.QuantIdentity` whose activation quantizer holds the group's
    QParams.

How the quantizers reproduce a QParams record (Brevitas computes ``scale = scaling_impl(x, int_scaling_impl(b))``):
  * scale: ``scaling_impl_type='parameter'`` initialized with the scale itself, divided by an integer scaling that
    returns exactly 1, so the learned parameter *is* the scale (initializing with ``scale * threshold`` and letting
    Brevitas divide by the threshold gave 1-ulp errors). Per-channel: shape (C, 1, ..., 1).
  * zero point: Brevitas' `ParameterZeroPoint` (what its `Shifted*` quantizers learn), initialized so that its
    quantized value ``round(|v| / s) + qmin`` is the integer zero point.
  * grid: ``signed = qmin < 0``, ``narrow_range = False``, ``bit_width = bits`` (2..8 all work).
  * rounding arithmetic: Brevitas' stock `IntQuant` computes ``round(x / s + z)`` while the frozen subnet (and
    torch's fake-quant kernels it mirrors) computes ``round(x * (1/s)) + z``. The two differ in the last ulp near
    rounding ties, which moves a few values by one LSB. With ``exact=True`` (default) the quantizers use
    `ReciprocalIntQuant`, an `IntQuant` with torch's arithmetic, and the Brevitas model equals the frozen subnet
    bitwise; ``exact=False`` keeps Brevitas' stock arithmetic. Exporters only read scale/zero point/bit-width, so
    both export the same ONNX.

Every combination of the elastic space is expressible: signed/unsigned grids, symmetric or asymmetric (zero point
on the signed weight grid, or on the unsigned activation grid), per-tensor or per-channel, 2..8 bits.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings

import torch
from torch import nn

from eqnet_plugin.export.ir import (FrozenSubnet, QParams, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear,
                             as_example_inputs, as_frozen)

__all__ = ["to_brevitas", "export_brevitas_qcdq", "export_brevitas_qonnx"]

_INSTALL_HINT = 'pip install "eqnet_plugin[brevitas]"'


def _require_brevitas() -> None:
    """Import brevitas (and its exporters) once, quietly; a missing package names the extra to install."""
    try:
        with warnings.catch_warnings():
            # brevitas' own imports warn about its deprecated brevitas.fx and an optional Hadamard kernel
            warnings.simplefilter("ignore")
            import brevitas.export  # noqa: F401
            import brevitas.nn  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the Brevitas adapter needs the 'brevitas' package: {_INSTALL_HINT}") from err


def _require_export() -> None:
    """Brevitas' ONNX exporters also need onnx and onnxoptimizer (brevitas itself does not depend on them)."""
    _require_brevitas()
    try:
        import onnx  # noqa: F401
        import onnxoptimizer  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Brevitas' ONNX exporters need 'onnx' and 'onnxoptimizer': {_INSTALL_HINT}") from err


# --- Brevitas building blocks (created lazily: they subclass Brevitas types) -------------------------------------
_BLOCKS: dict[str, type] = {}


def _blocks() -> dict[str, type]:
    """`UnitIntScaling` and `ReciprocalIntQuant`, defined once brevitas is importable."""
    if _BLOCKS:
        return _BLOCKS
    import brevitas
    from brevitas.core.quant import IntQuant

    class UnitIntScaling(brevitas.jit.ScriptModule):
        """Integer threshold 1: makes Brevitas' scale equal its learned scaling parameter bit for bit."""

        def __init__(self) -> None:
            super().__init__()

        @brevitas.jit.script_method
        def forward(self, bit_width: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(bit_width)

    class ReciprocalIntQuant(IntQuant):
        """Brevitas `IntQuant` with torch's fake-quant arithmetic: ``clamp(round(x * (1/s)) + z)``."""

        @brevitas.jit.script_method
        def to_int(self, scale: torch.Tensor, zero_point: torch.Tensor, bit_width: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
            x = self.input_view_impl(x)
            y = self.float_to_int_impl(x * (1.0 / scale)) + zero_point
            min_int_val = self.min_int(bit_width)
            max_int_val = self.max_int(bit_width)
            return self.tensor_clamp_impl(y, min_val=min_int_val, max_val=max_int_val)

    _BLOCKS.update(UnitIntScaling=UnitIntScaling, ReciprocalIntQuant=ReciprocalIntQuant)
    return _BLOCKS


def _scaling_tensor(qp: QParams, values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-tensor -> 0-dim tensor; per-channel along axis 0 -> shape (C, 1, ..., 1) for an `ndim`-d weight."""
    values = values.detach().to(torch.float32)
    if qp.axis is None:
        return values.reshape(())
    if qp.axis != 0:
        raise ValueError(f"per-channel quantization along axis {qp.axis} is not supported by the Brevitas adapter "
                         "(only output channels, axis 0)")
    return values.reshape([-1] + [1] * (ndim - 1))


def _quantizer(qp: QParams, base, ndim: int, exact: bool, **extra):
    """A Brevitas quantizer injector (subclass of `base`) that reproduces `qp`."""
    from brevitas.core.zero_point import ParameterZeroPoint, ZeroZeroPoint
    from brevitas.inject.enum import ScalingImplType, ScalingPerOutputType
    from brevitas.quant.solver.common import this

    blocks = _blocks()
    scale = _scaling_tensor(qp, qp.scale, ndim)
    kw = dict(bit_width=qp.bits, signed=qp.signed, narrow_range=False,
              scaling_impl_type=ScalingImplType.PARAMETER, scaling_init=scale,
              int_scaling_impl=blocks["UnitIntScaling"], scaling_min_val=None,
              scaling_per_output_type=ScalingPerOutputType.CHANNEL if qp.per_channel else ScalingPerOutputType.TENSOR)
    if exact:
        kw["int_quant"] = blocks["ReciprocalIntQuant"]
    zp = qp.zero_point.to(torch.float32)
    if bool((zp != 0).any()):
        # ParameterZeroPoint returns round(|v| / s) + qmin; v = (z - qmin) * s makes that exactly z.
        init = _scaling_tensor(qp, (zp - qp.qmin) * qp.scale, ndim)
        kw.update(zero_point_impl=ParameterZeroPoint, zero_point_init=init, quantize_zero_point=True,
                  zero_point_shape=this.scaling_shape)
    else:
        kw.update(zero_point_impl=ZeroZeroPoint)
    kw.update(extra)
    return base.let(**kw)


def _weight_quant(qp: QParams, ndim: int, exact: bool):
    from brevitas.quant import Int8WeightPerTensorFloat
    return _quantizer(qp, Int8WeightPerTensorFloat, ndim, exact)


def _act_quant(qp: QParams, exact: bool):
    from brevitas.quant import Int8ActPerTensorFloat
    if qp.per_channel:
        raise ValueError("per-channel activation quantization is not supported by the Brevitas adapter "
                         "(activations are per-tensor in eqnet_plugin)")
    return _quantizer(qp, Int8ActPerTensorFloat, 1, exact)


_LAYER_MAP = {QuantConv1d: "QuantConv1d", QuantConv2d: "QuantConv2d", QuantConv3d: "QuantConv3d",
              QuantLinear: "QuantLinear"}


def _brevitas_layer(layer: nn.Module, exact: bool) -> nn.Module:
    import brevitas.nn as qnn

    qp = layer.weight_quant.qparams
    cls = getattr(qnn, _LAYER_MAP[type(layer)])
    wq = _weight_quant(qp, layer.weight.dim(), exact)
    common = dict(bias=layer.bias is not None, weight_quant=wq, bias_quant=None, input_quant=None,
                  output_quant=None, return_quant_tensor=False, device=layer.weight.device)
    if isinstance(layer, QuantLinear):
        new = cls(layer.in_features, layer.out_features, **common)
    else:
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  padding_mode=layer.padding_mode, **common)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def to_brevitas(frozen, cfg=None, exact: bool = True) -> nn.Module:
    """The frozen subnet as a GraphModule of `brevitas.nn` modules with quantizers holding its QParams.

    Args:
        frozen: a `FrozenSubnet`, or a `Supernet` (then pass `cfg`, default its active subnet).
        cfg: the `SubnetConfig` to freeze when `frozen` is a Supernet.
        exact: use `ReciprocalIntQuant` (torch's rounding arithmetic) so that the output equals the frozen subnet's
            bitwise; False keeps Brevitas' stock `IntQuant` (``round(x / s + z)``), which may move values at
            rounding ties by one LSB.

    Returns:
        A `torch.fx.GraphModule` in eval mode: Brevitas QuantConv/QuantLinear layers (float bias) and
        `QuantIdentity` activation quantizers, on the frozen subnet's device.

    Raises:
        ImportError: brevitas is not installed (``pip install "eqnet_plugin[brevitas]"``).
        TypeError: `frozen` is neither a FrozenSubnet nor a Supernet.
        ValueError: a quantizer Brevitas cannot reproduce (per-channel along an axis other than 0).
    """
    _require_brevitas()
    import brevitas.nn as qnn

    frozen = as_frozen(frozen, cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="brevitas")
        return frozen.swap(lambda layer: _brevitas_layer(layer, exact),
                           lambda point: qnn.QuantIdentity(act_quant=_act_quant(point.qparams, exact),
                                                           return_quant_tensor=False))


def _export_model(model, cfg=None) -> nn.Module:
    """A private copy of the Brevitas model to export (exporters attach handlers and caches to the module)."""
    if isinstance(model, (FrozenSubnet, tuple)) or callable(getattr(model, "freeze", None)):
        return to_brevitas(as_frozen(model, cfg))
    if cfg is not None:
        raise TypeError("cfg= is for a Supernet; a Brevitas model already holds its subnet")
    if not isinstance(model, nn.Module) or \
            not any(type(m).__module__.startswith("brevitas.nn") for m in model.modules()):
        raise TypeError(f"expected the module returned by to_brevitas (or a FrozenSubnet / Supernet), got a "
                        f"{type(model).__name__} without brevitas.nn layers")
    return copy.deepcopy(model).eval()


def _check_inputs(example_inputs) -> tuple:
    return as_example_inputs(example_inputs)


def _export_to(path, export_fn, rewrite=None) -> str:
    """Run `export_fn(tmp_path)` into a temporary folder next to `path`, apply `rewrite(model)` if given, then check
    the file with onnx and move it into place (nothing half-written at `path` on error)."""
    import onnx

    from ._onnx import save_model_atomic

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-brevitas-") as tmp:
        tmp_file = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_fn(tmp_file)
        model = onnx.load(tmp_file)
    if rewrite is not None:
        rewrite(model)
    return save_model_atomic(model, path)


def export_brevitas_qcdq(model, example_inputs: tuple, path, opset: int = 18, dynamic_batch: bool = True, *,
                         cfg=None) -> str:
    """Export through Brevitas' QCDQ exporter (``brevitas.export.export_onnx_qcdq``): QuantizeLinear ->
    (Clip for sub-8-bit) -> DequantizeLinear at every quantizer, float bias, runnable in ONNX Runtime.

    Uses the torch.export ("dynamo") path with ``export_weight_q_node=True`` (float weights followed by Q/DQ): the
    TorchScript path asserts non-negative zero points and so rejects asymmetric weights (signed grid, negative zero
    point), and the dynamo path needs the Q node on weights. Dynamo refuses quantized bias; ours is float.
    Sub-8-bit per-tensor quantizers and the pool's re-quantization are then rewritten to round ``x * (1 / scale)``
    as training does (`adapters._onnx.reciprocal_quantize`: ``Mul -> QuantizeLinear(scale 1) -> [Clip] ->
    DequantizeLinear(scale)``).

    Args:
        model: the module returned by `to_brevitas`, or a FrozenSubnet / a Supernet with `cfg` (converted
            first). The model is copied; the caller's module is left untouched.
        example_inputs: tuple of example input tensors.
        path: destination `.onnx` file (written atomically).
        opset: ONNX opset (>= 18: the dynamo exporter's lowest implemented opset).
        dynamic_batch: make dimension 0 of every input dynamic.

    Returns:
        `path` as a string.

    Raises:
        ImportError: brevitas / onnx / onnxoptimizer missing (``pip install "eqnet_plugin[brevitas]"``).
        TypeError: bad `example_inputs` or `model`.
    """
    _require_export()
    from brevitas.export import export_onnx_qcdq

    example_inputs = _check_inputs(example_inputs)
    if opset < 18:
        raise ValueError(f"opset={opset}: Brevitas' dynamo QCDQ export needs opset >= 18")
    module = _export_model(model, cfg)
    kw = dict(dynamo=True, opset_version=opset, keep_initializers_as_inputs=False, export_weight_q_node=True,
              optimize=True, verbose=False)
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        kw["dynamic_shapes"] = tuple({0: batch} for _ in example_inputs)
    from ._onnx import reciprocal_quantize

    return _export_to(path, lambda tmp: export_onnx_qcdq(module, example_inputs, tmp, **kw),
                      rewrite=reciprocal_quantize)


def export_brevitas_qonnx(model, example_inputs: tuple, path, opset: int = 17, dynamic_batch: bool = True, *,
                          cfg=None) -> str:
    """Export through Brevitas' QONNX exporter (``brevitas.export.export_qonnx``): one ``Quant`` node (domain
    ``qonnx.custom_op.general``; inputs x, scale, zero point, bit width; attributes signed, narrow, rounding_mode)
    per quantizer, any bit-width. Running the file needs the `qonnx` package (not a dependency of eqnet_plugin).

    Uses the TorchScript path (``dynamo=False``): it handles every zero point and keeps standard ops
    (GlobalAveragePool, Flatten) and dynamic axes.

    Args:
        model: the module returned by `to_brevitas`, or a FrozenSubnet / a Supernet with `cfg` (converted first); it
            is copied.
        example_inputs: tuple of example input tensors.
        path: destination `.onnx` file (written atomically).
        opset: ONNX opset of the standard ops.
        dynamic_batch: make dimension 0 of inputs and outputs dynamic.

    Returns:
        `path` as a string.

    Raises:
        ImportError: brevitas / onnx / onnxoptimizer missing (``pip install "eqnet_plugin[brevitas]"``).
        TypeError: bad `example_inputs` or `model`.
    """
    _require_export()
    from brevitas.export import export_qonnx

    example_inputs = _check_inputs(example_inputs)
    module = _export_model(model, cfg)
    inputs = [f"input{i}" if len(example_inputs) > 1 else "input" for i in range(len(example_inputs))]
    kw = dict(dynamo=False, opset_version=opset, keep_initializers_as_inputs=False, input_names=inputs,
              output_names=["output"])
    if dynamic_batch:
        kw["dynamic_axes"] = {n: {0: "batch"} for n in inputs + ["output"]}
    return _export_to(path, lambda tmp: export_qonnx(module, example_inputs, tmp, **kw))
