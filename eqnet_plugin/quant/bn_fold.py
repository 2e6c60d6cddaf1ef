"""Conv-BatchNorm with a fixed fold: the weights a quantizer cell trains on are the weights every subnet uses.

torch.ao's QAT Conv-BN modules fold BatchNorm into the weight *before* the weight fake-quant, with the running
variance: the quantizer sees ``w * gamma / sqrt(running_var + eps)``. In an elastic supernet the running variance
is a mix of many subnets' statistics during training, and it is re-estimated per subnet for evaluation, so every
re-estimate rescales each output channel of the quantized tensor while the learned per-cell scales stay fixed:
the weights a subnet is evaluated and exported with are not the ones its cells were trained on.

Here the fold uses a *fixed* per-channel statistic, ``fold_var`` (a buffer, set once from the running variance
when the `Supernet` is built, i.e. the float model's statistics; never changed by training or BN
re-estimation). The weight fake-quant therefore always sees ``W = w * gamma / sqrt(fold_var + eps)``, the same
tensor in every subnet, in training and in evaluation. BatchNorm keeps its per-subnet running statistics for the
output affine.

Dead channels (`fold_variance`): a channel whose running variance is below ``DEAD_CHANNEL_VAR`` (1e-3) times its
layer's median gets the median as ``fold_var``. Such a channel's pre-BN output is (nearly) constant, e.g. behind a
ReLU that never fires, and folding with its variance multiplies its weights by up to ``1 / sqrt(eps)`` (316x): one
channel then sets the range of a per-tensor weight cell and every other channel of the layer rounds to zero at low
bit-widths. Any fixed ``fold_var`` is exact (the ratio r below restores the BatchNorm output), so the choice only
decides what the quantizer sees.

In eval mode a layer computes

    y = conv(x, Q(W)) * r + b',    r = sqrt(fold_var + eps) / sqrt(running_var + eps),
                                   b' = beta + (bias - running_mean) * gamma / sqrt(running_var + eps),

`fold_to_export` gives (integer codes of Q(W), per-channel scales ``s * r``, zero points, b'): the trained
integer weights, with the BN ratio r folded into the weight scales, exactly. A per-tensor weight cell therefore
exports with per-channel scales (the same per-tensor integer codes, ``s * r_c`` per output channel): one float
scale per tensor cannot hold a per-channel BN ratio exactly, and every export target here accepts per-channel
weight scales. Layers without BatchNorm are unchanged.

In training mode the forward is torch.ao's (batch statistics normalize, running statistics are updated) except
for the fixed fold. torch.ao's own ``convert_fx`` cannot express the ratio r (it folds with the running variance
and re-quantizes), so these modules refuse ``to_float`` outside eqnet_plugin's reference conversion, with an
error naming the exact paths (`Supernet.to_reference`, `freeze` and the adapters).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.ao.nn.intrinsic.qat as nniqat
from torch import nn

__all__ = ["FixedFoldConvBnMixin", "use_fixed_bn_fold", "use_running_bn_fold", "running_fold_modules", "torch_classes",
           "fold_weight", "quantized_weight", "fold_to_export", "export_weight", "ConvertFxError", "fold_variance",
           "DEAD_CHANNEL_VAR"]

DEAD_CHANNEL_VAR = 1e-3     # a channel with running variance below this fraction of its layer's median is dead

_ALLOW = threading.local()


class ConvertFxError(RuntimeError):
    """torch.ao's convert_fx was called on an elastic supernet; it cannot reproduce the subnet exactly."""


CONVERT_FX_ADVICE = ("use sn.to_reference(cfg) for torch.ao's reference (Q/DQ) model of a subnet, or "
                     "eqnet_plugin.freeze(sn, cfg) and the exporters (export_onnx, export_to_tensorrt, to_brevitas, "
                     "export_qnn) for deployment")


@contextlib.contextmanager
def allow_torch_convert():
    """Inside: the fixed-fold modules let torch.ao convert them (eqnet_plugin's own reference conversion)."""
    prev = getattr(_ALLOW, "on", False)
    _ALLOW.on = True
    try:
        yield
    finally:
        _ALLOW.on = prev


def convert_allowed() -> bool:
    return getattr(_ALLOW, "on", False)


def _fold_std(bn: nn.modules.batchnorm._BatchNorm, var: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(var + bn.eps)


class FixedFoldConvBnMixin:
    """Overrides torch.ao's `_ConvBnNd._forward_approximate` to fold with the fixed ``fold_var`` buffer."""

    def _forward_approximate(self, input):
        scale_factor = self.bn.weight / _fold_std(self.bn, self.fold_var)
        weight_shape = [1] * len(self.weight.shape)
        weight_shape[0] = -1
        bias_shape = [1] * len(self.weight.shape)
        bias_shape[1] = -1
        scaled_weight = self.weight_fake_quant(self.weight * scale_factor.reshape(weight_shape))
        if self.bias is not None:
            zero_bias = torch.zeros_like(self.bias, dtype=input.dtype)
        else:
            zero_bias = torch.zeros(self.out_channels, device=scaled_weight.device, dtype=input.dtype)
        conv = self._conv_forward(input, scaled_weight, zero_bias)
        conv_orig = conv / scale_factor.reshape(bias_shape)
        if self.bias is not None:
            conv_orig = conv_orig + self.bias.reshape(bias_shape)
        return self.bn(conv_orig)

    def to_float(self):
        if not convert_allowed():
            raise ConvertFxError(
                f"torch.ao convert_fx cannot convert {type(self).__name__} of an eqnet_plugin supernet exactly: "
                "it folds BatchNorm with the subnet's running variance and re-quantizes the weight, while the "
                "supernet quantizes a fixed-fold weight (and keeps sub-8-bit ranges); " + CONVERT_FX_ADVICE)
        return super().to_float()


def _subclass(base: type) -> type:
    cls = type(base.__name__, (FixedFoldConvBnMixin, base), {"__module__": __name__,
                                                             "__qualname__": base.__name__})
    return cls


# One fixed-fold class per torch.ao QAT Conv-BN class (module-level, so models pickle).
ConvBn1d = _subclass(nniqat.ConvBn1d)
ConvBn2d = _subclass(nniqat.ConvBn2d)
ConvBn3d = _subclass(nniqat.ConvBn3d)
ConvBnReLU1d = _subclass(nniqat.ConvBnReLU1d)
ConvBnReLU2d = _subclass(nniqat.ConvBnReLU2d)
ConvBnReLU3d = _subclass(nniqat.ConvBnReLU3d)
_FIXED = {base: cls for base, cls in ((nniqat.ConvBn1d, ConvBn1d), (nniqat.ConvBn2d, ConvBn2d),
                                      (nniqat.ConvBn3d, ConvBn3d), (nniqat.ConvBnReLU1d, ConvBnReLU1d),
                                      (nniqat.ConvBnReLU2d, ConvBnReLU2d), (nniqat.ConvBnReLU3d, ConvBnReLU3d))}
_TORCH = {cls: base for base, cls in _FIXED.items()}


@torch.no_grad()
def fold_variance(running_var: torch.Tensor) -> torch.Tensor:
    """The fixed fold's variance for one layer: `running_var`, except that dead channels (below
    ``DEAD_CHANNEL_VAR`` times the layer's median) take the median, so they do not blow up a per-tensor weight
    range (see the module docstring)."""
    med = running_var.median()
    return torch.where(running_var < DEAD_CHANNEL_VAR * med, med, running_var).clone()


@torch.no_grad()
def use_fixed_bn_fold(model: nn.Module) -> list[str]:
    """Switch every torch.ao QAT Conv-BN module of `model` (in place) to its fixed-fold class, with ``fold_var``
    set from the current running variance (`fold_variance`). Idempotent. Returns the names of the switched
    modules."""
    out = []
    for name, m in model.named_modules():
        cls = _FIXED.get(type(m))
        if cls is None:
            continue
        m.__class__ = cls
        if "fold_var" not in m._buffers:
            m.register_buffer("fold_var", fold_variance(m.bn.running_var.detach()))
        out.append(name)
    return out


@torch.no_grad()
def use_running_bn_fold(model: nn.Module) -> list[str]:
    """Undo `use_fixed_bn_fold` (in place): torch.ao's own Conv-BN classes, folding with the running variance.

    The ablation hook for torch.ao's BatchNorm handling (benchmarks and tests only): call it on a supernet's model
    after building the `Supernet`. `sandwich_step` then updates BatchNorm statistics with every subnet, as a fold
    with the running variance needs (`running_fold_modules` tells it)."""
    out = []
    for name, m in model.named_modules():
        base = _TORCH.get(type(m))
        if base is not None:
            m.__class__ = base
            m._buffers.pop("fold_var", None)
            out.append(name)
    return out


def running_fold_modules(model: nn.Module) -> list[str]:
    """The QAT Conv-BN modules of `model` that fold with the running variance (torch.ao's own classes)."""
    torch_fold = tuple(set(_TORCH.values()))
    return [name for name, m in model.named_modules() if type(m) in torch_fold]


@contextlib.contextmanager
def torch_classes(model: nn.Module):
    """Inside: every fixed-fold module of `model` is torch.ao's own class again (for torch.ao's convert, which
    looks modules up by exact type), and to_float is allowed. Use on a copy that is converted."""
    switched = []
    for m in model.modules():
        base = _TORCH.get(type(m))
        if base is not None:
            m.__class__ = base
            switched.append((m, type(m)))
    try:
        with allow_torch_convert():
            yield
    finally:
        for m, base in switched:
            m.__class__ = _FIXED[base]


def quantized_weight(mod: nn.Module) -> torch.Tensor:
    """The tensor the weight fake-quant of `mod` sees, differentiable: ``w * gamma / sqrt(fold + eps)`` for Conv-BN
    (fold: the fixed ``fold_var`` when present, else the running variance, as torch.ao folds), the weight
    otherwise."""
    w = mod.weight
    bn = getattr(mod, "bn", None)
    if bn is None:
        return w
    var = getattr(mod, "fold_var", None)
    var = bn.running_var if var is None else var
    factor = bn.weight / _fold_std(bn, var)
    return w * factor.reshape([-1] + [1] * (w.dim() - 1))


def fold_weight(mod: nn.Module) -> torch.Tensor:
    """`quantized_weight`, detached (a copy)."""
    with torch.no_grad():
        return quantized_weight(mod).detach().clone()


@torch.no_grad()
def fold_to_export(mod: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor, per_channel: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """BatchNorm folded into a layer whose weight quantizer has `scale` / `zero_point` ((C,) per-channel or (1,)
    per-tensor) and turns `fold_weight(mod)` into integer codes n.

    Returns (scale', zero_point', bias', per_channel'): the eval output is conv(x, (n - zero_point') * scale') +
    bias'. Conv-BN layers get scales ``scale * r`` (see the module docstring), per-channel unless r is the same
    for every channel; layers without BN keep their scale and bias.
    """
    bn = getattr(mod, "bn", None)
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    if bn is None:
        return scale, zero_point, None if b is None else b.clone(), per_channel
    var = getattr(mod, "fold_var", None)
    var = bn.running_var if var is None else var
    std = _fold_std(bn, bn.running_var)
    ratio = _fold_std(bn, var) / std
    b0 = b if b is not None else torch.zeros_like(bn.running_mean)
    bias = (b0 - bn.running_mean) * (bn.weight.detach() / std) + bn.bias.detach()
    scale = scale.to(ratio.device)
    if not per_channel and bool((ratio == ratio[0]).all()):
        return (scale * ratio[:1]).float(), zero_point, bias, False
    c = ratio.numel()
    scale = (scale.expand(c) * ratio).float()
    zero_point = zero_point.expand(c).clone() if zero_point.numel() == 1 else zero_point
    return scale, zero_point, bias, True


@torch.no_grad()
def export_weight(mod: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """The trained integer codes of `fold_weight(mod)` under its cell's (scale, zero_point, [qmin, qmax]),
    dequantized on the export grid of `fold_to_export`: (weight, scale', zero_point', bias', per_channel').
    The one place `freeze` and `fx.convert_reference` get a Conv-BN layer's exported weight from."""
    w = fold_weight(mod)
    shape = [-1] + [1] * (w.dim() - 1)
    scale, zero_point = scale.to(w.device), zero_point.to(w.device)
    s0, z0 = (scale.reshape(shape), zero_point.reshape(shape)) if per_channel else (scale, zero_point)
    codes = torch.clamp(torch.round(w * (1.0 / s0)) + z0, qmin, qmax)
    scale, zero_point, bias, per_channel = fold_to_export(mod, scale, zero_point, per_channel)
    s1, z1 = (scale.reshape(shape), zero_point.reshape(shape)) if per_channel else (scale, zero_point)
    return ((codes - z1) * s1).to(w.dtype), scale, zero_point, bias, per_channel
