"""Freeze one subnet into the neutral export IR that every adapter reads.

`freeze(supernet, cfg)` returns a `FrozenSubnet`: a float `torch.fx.GraphModule` with BatchNorm folded into the
weights in which every quantized tensor passes through a `QuantPoint`
carrying its `QParams` (scale, zero point, integer range, bits, axis, symmetry, signedness). Weighted layers become
`QuantConv{1,2,3}d` / `QuantLinear`: plain torch layers whose weight passes through their own `QuantPoint`.
Its forward pass reproduces the supernet's eval output under `activate(cfg)`; adapters swap the QuantPoints (and
layers) for their framework's modules or for ONNX Q/DQ nodes.

BatchNorm (see `eqnet_plugin.bn_fold`): a Conv-BN layer's integer weights are the ones its cell was trained on
(the fixed fold), and the subnet's BN statistics become per-channel weight scales and the bias. So a Conv-BN layer
whose cell is per-tensor exports per-channel scales over per-tensor integer codes, unless its BN ratio is the same
for every channel (as right after `Supernet(...)`, before BN statistics move).

QParams grids are the natural ones for export: weights on the signed grid; activations on the unsigned grid,
except symmetric activations of signed data, which use the signed grid with zero point 0 (the training module
stores them on the unsigned grid with zero point 2^(b-1): the same numbers).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bn_fold import export_weight, fold_weight
from .fake_quant import ElasticFakeQuantize
from .primitives import int_range
from .space import SubnetConfig

__all__ = ["QParams", "QuantPoint", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "FrozenLayer",
           "FrozenSubnet", "freeze", "as_frozen", "as_example_inputs"]


@dataclass(frozen=True, eq=False)
class QParams:
    """How one tensor is quantized: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``,
    ``x_hat = (q - zero_point) * scale``.

    Attributes:
        scale: float32 tensor, shape (C,) per-channel or (1,) per-tensor.
        zero_point: int32 tensor of the same shape, inside [qmin, qmax].
        qmin, qmax: the integer grid; `signed` is ``qmin < 0``.
        bits: bit-width.
        axis: channel axis for per-channel tensors, None for per-tensor.
        symmetric: the zero point is fixed at 0 (signed grid) / 0 (unsigned grid, non-negative data).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    axis: int | None
    symmetric: bool

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def _broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.scale.to(x.device), self.zero_point.to(x.device, torch.float32)
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return s, z

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32) of `x`."""
        s, z = self._broadcast(x)
        return torch.clamp(torch.round(x * (1.0 / s)) + z, self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        s, z = self._broadcast(q)
        return (q.to(torch.float32) - z) * s

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with exactly the arithmetic of training (`primitives.fake_quantize`)."""
        s, z = self._broadcast(x)
        return (torch.clamp(torch.round(x * (1.0 / s)) + z, self.qmin, self.qmax) - z) * s

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.tolist(), "zero_point": self.zero_point.tolist(), "qmin": self.qmin,
                "qmax": self.qmax, "bits": self.bits, "axis": self.axis, "symmetric": self.symmetric,
                "signed": self.signed}

    @classmethod
    def from_fake_quant(cls, fq: ElasticFakeQuantize) -> "QParams":
        """The active cell of `fq`, on the natural export grid (see module docstring)."""
        scale, zp = fq.calculate_qparams()
        bits, symmetric, per_channel = fq.cell
        scale = scale.detach().float().cpu()
        zp = zp.detach().to(torch.int32).cpu()
        if fq.is_weight:
            qmin, qmax = int_range(bits, signed=True)
        elif symmetric and fq._signed:
            qmin, qmax = int_range(bits, signed=True)
            zp = torch.zeros_like(zp)
        else:
            qmin, qmax = int_range(bits, signed=False)
        return cls(scale, zp, qmin, qmax, bits, fq.ch_axis if per_channel else None, symmetric)


class QuantPoint(nn.Module):
    """Marks a quantized tensor in a frozen graph; forward = fake quantization with its `QParams`."""

    def __init__(self, name: str, qparams: QParams) -> None:
        super().__init__()
        self.name = name
        self.qparams = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qparams.fake_quant(x)

    def extra_repr(self) -> str:
        q = self.qparams
        return (f"{self.name!r}, bits={q.bits}, {'signed' if q.signed else 'unsigned'}, "
                f"{'symmetric' if q.symmetric else 'asymmetric'}, {'per-channel' if q.per_channel else 'per-tensor'}")


class _QuantWeightMixin:
    weight_quant: QuantPoint

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized (dequantized) weight the layer computes with."""
        return self.weight_quant(self.weight)


class QuantConv1d(_QuantWeightMixin, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantConv3d(_QuantWeightMixin, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight_quant(self.weight), self.bias)


_CONV_BY_DIM = {1: QuantConv1d, 2: QuantConv2d, 3: QuantConv3d}


@dataclass(frozen=True)
class FrozenLayer:
    """A weighted layer of the frozen graph: `module` is the QuantConv/QuantLinear at graph target `name`
    (wrapped as ``nn.Sequential(layer, nn.ReLU())`` when the training module had a fused ReLU)."""

    name: str
    kind: str
    weight_group: str
    input_group: str | None
    relu: bool


class FrozenSubnet(nn.Module):
    """The neutral export IR of one subnet (see module docstring).

    Attributes:
        graph: float GraphModule with QuantPoints and Quant layers.
        config: the SubnetConfig it was frozen from.
        qparams: group name -> QParams, for every quantized tensor (weights and activations).
        layers: the weighted layers (`FrozenLayer`), in graph order.
    """

    def __init__(self, graph: torch.fx.GraphModule, config: SubnetConfig, qparams: dict[str, QParams],
                 layers: list[FrozenLayer]) -> None:
        super().__init__()
        self.graph = graph
        self.config = config
        self.qparams = qparams
        self.layers = layers

    def forward(self, *args):
        return self.graph(*args)

    def layer_module(self, name: str) -> nn.Module:
        """The QuantConv/QuantLinear of layer `name` (unwrapping the ReLU Sequential)."""
        mod = self.graph.get_submodule(name)
        return mod[0] if isinstance(mod, nn.Sequential) else mod

    def quant_points(self) -> dict[str, QuantPoint]:
        """Activation QuantPoints by group name (weights' QuantPoints live inside their layers)."""
        out: dict[str, QuantPoint] = {}
        for _, m in self.graph.named_modules():
            if isinstance(m, QuantPoint) and not self.qparams_is_weight(m.name):
                out.setdefault(m.name, m)
        return out

    def qparams_is_weight(self, group: str) -> bool:
        return any(lay.weight_group == group for lay in self.layers)


def _float_layer(mod: nn.Module, qp: QParams) -> tuple[nn.Module, QParams]:
    """The QuantConv/QuantLinear of a QAT layer, BatchNorm folded in (`bn_fold.fold_to_export`), and the QParams
    of its weight. Conv-BN layers store the trained integer weights dequantized on the export grid."""
    if getattr(mod, "bn", None) is not None:
        w, scale, zp, b, pc = export_weight(mod, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.per_channel)
        qp = QParams(scale.detach().float().cpu(), zp.detach().to(torch.int32).cpu(), qp.qmin, qp.qmax, qp.bits,
                     0 if pc else None, qp.symmetric)
    else:
        w = fold_weight(mod)
        b = mod.bias.detach().clone() if getattr(mod, "bias", None) is not None else None
    if isinstance(mod, nn.Linear):
        new = QuantLinear(mod.in_features, mod.out_features, bias=b is not None)
    else:
        dim = w.dim() - 2
        cls = _CONV_BY_DIM[dim]
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                  mod.groups, bias=b is not None, padding_mode=mod.padding_mode)
    new = new.to(device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new, qp


@torch.no_grad()
def freeze(supernet, cfg: SubnetConfig | None = None, bn_batches=None) -> FrozenSubnet:
    """Freeze subnet `cfg` (default: the active one) of `supernet` into a `FrozenSubnet`.

    Args:
        bn_batches: training batches to re-estimate the subnet's BatchNorm statistics on first. Needed once the
            supernet has been trained, unless the statistics were estimated already (`evaluate`,
            `Supernet.recalibrate_bn` under ``activate(cfg)``): a trained supernet holds the widest subnet's.

    The supernet is left unchanged. The frozen model is in eval mode; its output equals the supernet's eval output
    under ``activate(cfg)`` up to float rounding of the BN fold (measured in the adapter tests).

    Raises:
        ValueError: `cfg` does not fit the supernet (from `Supernet.validate`).
        BatchNormStatsError: the subnet's BatchNorm statistics are not known (pass `bn_batches`).
    """
    cfg = cfg if cfg is not None else supernet.current_config()
    supernet.require_calibrated("freeze")
    with supernet.activate(cfg):
        if bn_batches is not None:
            supernet.recalibrate_bn(bn_batches)
        supernet.require_bn_stats(cfg, "freeze")
        qparams = {g: QParams.from_fake_quant(fq) for g, fq in supernet.groups.items()}
        gm = copy.deepcopy(supernet.model)
    gm.eval()
    points = {g: QuantPoint(g, qp) for g, qp in qparams.items()}
    ids = {id(fq): g for g, fq in supernet.groups.items()}
    src_modules = dict(supernet.model.named_modules(remove_duplicate=False))

    layers: list[FrozenLayer] = []
    for lay in supernet.layers:
        mod = gm.get_submodule(lay.name)
        relu = "ReLU" in type(mod).__name__
        new, qparams[lay.weight] = _float_layer(mod, qparams[lay.weight])
        points[lay.weight] = new.weight_quant = QuantPoint(lay.weight, qparams[lay.weight])
        set_submodule(gm, lay.name, nn.Sequential(new, nn.ReLU()) if relu else new)
        layers.append(FrozenLayer(lay.name, type(new).__name__, lay.weight, lay.input, relu))
    for name, m in src_modules.items():
        if isinstance(m, ElasticFakeQuantize) and not m.is_weight and id(m) in ids:
            set_submodule(gm, name, points[ids[id(m)]])
    leftover = [n for n, m in gm.named_modules() if isinstance(m, ElasticFakeQuantize)]
    if leftover:
        raise RuntimeError(f"freeze left elastic quantizers in the graph: {leftover[:5]} (unsupported module "
                           "holding a weight quantizer); please report the model")
    gm.recompile()
    frozen = FrozenSubnet(gm, cfg, qparams, layers)
    return frozen.eval()


def as_example_inputs(example_inputs) -> tuple:
    """Example inputs as the tuple torch.onnx / torch.fx expect: a bare tensor becomes ``(tensor,)`` (what
    ``prepare_qat_fx`` accepts too); a tuple or list of tensors is kept. Raises TypeError naming the fix otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs or \
            not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors, e.g. "
                        "torch.randn(1, 3, 224, 224) or (torch.randn(1, 3, 224, 224),)")
    return example_inputs


def as_frozen(model, cfg: SubnetConfig | None = None) -> FrozenSubnet:
    """What every adapter accepts: a FrozenSubnet, a `Supernet` (+ optional `cfg`, default its active subnet), or
    a ``(supernet, cfg)`` tuple.

    Raises:
        TypeError: anything else, or a cfg given twice / with a FrozenSubnet.
        ValueError: `cfg` does not fit the supernet.
    """
    from .supernet import Supernet

    if isinstance(model, FrozenSubnet):
        if cfg is not None:
            raise TypeError("pass either a FrozenSubnet or a Supernet with cfg, not both: a FrozenSubnet already "
                            "holds its subnet")
        return model
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], Supernet):
        if cfg is not None:
            raise TypeError("pass either (supernet, cfg) or supernet with cfg=..., not both")
        return freeze(*model)
    if isinstance(model, Supernet):
        return freeze(model, cfg)
    raise TypeError(f"expected a FrozenSubnet, a Supernet or a (Supernet, SubnetConfig) tuple, got "
                    f"{type(model).__name__}; freeze a subnet with eqnet_plugin.freeze.freeze(supernet, cfg)")


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `target` of `root` by `module`."""
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)
