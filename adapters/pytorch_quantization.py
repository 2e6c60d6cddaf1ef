"""pytorch-quantization adapter: a frozen subnet as NVIDIA pytorch-quantization (2.1.3) `quant_nn` modules.

`to_pytorch_quantization(frozen)` copies the frozen graph and swaps
  * every `QuantConv{1,2,3}d` / `QuantLinear` for `quant_nn.QuantConv{1,2,3}d` / `QuantLinear` whose weight
    quantizer holds the layer's range as `amax` (the layer's own input quantizer is disabled: the graph's
    activation quantizers sit where torch.ao placed them), and
  * every activation `QuantPoint` for a `quant_nn.TensorQuantizer` with the group's `amax`.
Modules are built explicitly; `quant_modules.initialize()` (global monkey-patching of torch.nn) is never used.

Mapping (pytorch-quantization is symmetric only: ``x_hat = round(x * bound / amax) * amax / bound``, zero point 0):
  * ``bound = 2^(b-1) - 1`` (signed) or ``2^b - 1`` (unsigned), ``amax = scale * bound``, per-channel as a
    (C, 1, ..., 1) buffer with ``axis=(0,)``.
  * ``narrow_range=False``: its signed grid is then ``[-bound - 1, bound] = [-2^(b-1), 2^(b-1) - 1]``, our grid
    (tensor_quant.py: ``min_bound = -max_bound - 1``); with ``narrow_range=True`` the code -2^(b-1) would clip to
    -(2^(b-1) - 1). Unsigned grid ``[0, 2^b - 1]``.
  * Its arithmetic differs from the frozen subnet's by float rounding only: it multiplies by ``bound / amax``
    (equal to ``1/scale`` up to an ulp) and divides by it to dequantize, where we multiply by ``1/scale`` and then
    by ``scale``. Values within an ulp of a rounding boundary can move by one LSB; the outputs agree within about
    one LSB of the output scale (measured in the tests).

Unsupported, refused with a ValueError naming the rule: asymmetric quantizers (nonzero zero point) and per-channel
quantization along an axis other than 0. Note that pytorch-quantization raises on negative input to an unsigned
quantizer (our unsigned grid with zero point 0 is only chosen for data that were non-negative at calibration).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from eqnet_plugin.export.ir import QParams, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, as_frozen

__all__ = ["to_pytorch_quantization", "pq_amax", "pq_problems"]

_INSTALL_HINT = 'pip install "eqnet_plugin[tensorrt]"'


def _require_pq():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # its import calls the deprecated torch.jit.script
            from pytorch_quantization import nn as quant_nn  # noqa: F401
    except ImportError as err:   # pragma: no cover - CI installs the extra
        raise ImportError("the pytorch-quantization adapter needs the 'pytorch-quantization' package (2.1.3): "
                          f"{_INSTALL_HINT}") from err


def _check(group: str, qp: QParams) -> None:
    if not qp.symmetric or bool((qp.zero_point != 0).any()):
        raise ValueError(f"pytorch-quantization supports symmetric quantization only (zero point 0), but group "
                         f"{group!r} is asymmetric; export a subnet with symmetric quantizers, e.g. "
                         "supernet.uniform(8, 8, symmetric=True)")
    if qp.axis not in (None, 0):
        raise ValueError(f"group {group!r} is per-channel along axis {qp.axis}; the pytorch-quantization adapter "
                         "supports per-channel quantization along axis 0 (output channels) only")


def pq_problems(frozen) -> list[str]:
    """Every quantizer of `frozen` pytorch-quantization cannot reproduce (empty: the adapter can convert it)."""
    out = []
    for group, qp in frozen.qparams.items():
        try:
            _check(group, qp)
        except ValueError as e:
            out.append(str(e))
    return out


def pq_amax(qp: QParams, ndim: int = 1) -> torch.Tensor:
    """pytorch-quantization's `amax` for `qp`: ``scale * (2^(b-1) - 1)`` (signed) or ``scale * (2^b - 1)``
    (unsigned), float32; per-channel shaped (C, 1, ..., 1) for an `ndim`-d weight, per-tensor 0-dim."""
    bound = float(qp.qmax)          # signed: 2^(b-1) - 1, unsigned: 2^b - 1 (the grids are full range)
    amax = qp.scale.detach().to(torch.float32) * bound
    return amax.reshape([-1] + [1] * (ndim - 1)) if qp.per_channel else amax.reshape(())


def _desc(qp: QParams, ndim: int):
    from pytorch_quantization.tensor_quant import QuantDescriptor
    return QuantDescriptor(num_bits=qp.bits, axis=(0,) if qp.per_channel else None,
                           amax=pq_amax(qp, ndim).cpu().numpy(), unsigned=not qp.signed, narrow_range=False)


_LAYER_MAP = {QuantConv1d: "QuantConv1d", QuantConv2d: "QuantConv2d", QuantConv3d: "QuantConv3d",
              QuantLinear: "QuantLinear"}


def _pq_layer(layer: nn.Module) -> nn.Module:
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.tensor_quant import QuantDescriptor

    qp = layer.weight_quant.qparams
    _check(layer.weight_quant.name, qp)
    cls = getattr(quant_nn, _LAYER_MAP[type(layer)])
    kw = dict(quant_desc_input=QuantDescriptor(num_bits=8), quant_desc_weight=_desc(qp, layer.weight.dim()))
    if isinstance(layer, QuantLinear):
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, **kw)
    else:
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  bias=layer.bias is not None, padding_mode=layer.padding_mode, **kw)
    new.input_quantizer.disable()   # activation quantizers are separate modules of the graph
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def to_pytorch_quantization(frozen, cfg=None) -> nn.Module:
    """The frozen subnet as a GraphModule of pytorch-quantization modules with `amax` loaded.

    Args:
        frozen: a `FrozenSubnet`, or a `Supernet` (then pass `cfg`, default its active subnet).
        cfg: the `SubnetConfig` to freeze when `frozen` is a Supernet.

    Returns:
        A `torch.fx.GraphModule` in eval mode on the frozen subnet's device: `quant_nn.QuantConv*d` /
        `QuantLinear` layers (weight quantizer with amax, input quantizer disabled, float bias) and
        `quant_nn.TensorQuantizer` activation quantizers.

    Raises:
        ImportError: pytorch-quantization is not installed (``pip install "eqnet_plugin[tensorrt]"``).
        ValueError: the subnet has an asymmetric quantizer (pytorch-quantization is symmetric only) or
            per-channel quantization along an axis other than 0.
    """
    _require_pq()
    from pytorch_quantization import nn as quant_nn

    frozen = as_frozen(frozen, cfg)
    for group, qp in frozen.qparams.items():
        _check(group, qp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return frozen.swap(_pq_layer, lambda point: quant_nn.TensorQuantizer(_desc(point.qparams, 1)))
