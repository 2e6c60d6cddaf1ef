"""The export IR: what a frozen subnet is, independent of how it was trained.

A `FrozenSubnet` is a float `torch.fx.GraphModule` (BatchNorm already folded into the weights) in which every
quantized tensor passes through a `QuantPoint` carrying its `QParams` (scale, zero point, integer range, bits,
axis, symmetry, signedness). Weighted layers are `QuantConv{1,2,3}d` / `QuantLinear`: plain torch layers whose
weight passes through their own `QuantPoint`. What an adapter needs is here and public:

* the role of each quantized tensor (`FrozenSubnet.is_weight`, `FrozenSubnet.layers`: weight group, input group,
  fused ReLU);
* signedness and grid (`QParams.qmin` / `qmax` / `signed`), symmetry, per-channel axis;
* the exact global average pools (`FrozenSubnet.pools`, `FrozenSubnet.export_graph(exact_pool=False)` for
  runtimes without float64);
* the module swap the PyTorch-side adapters are built on (`FrozenSubnet.swap`).

`eqnet_plugin.export.freeze.freeze` builds it from a supernet; `eqnet_plugin.adapters` reads nothing else (a test checks
their imports). QParams grids are the natural ones for export: weights on the signed grid; activations on the
unsigned grid, except symmetric activations of signed data, which use the signed grid with zero point 0.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .._version import __version__
from ..quant.exact_pool import ExactGlobalAvgPool, exact_global_avg_pool
from ..quant.grid import Grid
from ..quant.space import SubnetConfig

__all__ = ["Grid", "QParams", "QuantPoint", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "FrozenLayer",
           "FrozenSubnet", "as_frozen", "as_example_inputs", "set_submodule", "PRODUCER"]

PRODUCER = {"package": "eqnet_plugin", "version": __version__}
"""Who wrote an exported file (for the metadata of encodings files)."""


@dataclass(frozen=True, eq=False)
class QParams:
    """How one tensor is quantized: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``,
    ``x_hat = (q - zero_point) * scale``.

    Attributes:
        scale: float32 tensor, shape (C,) per-channel or (1,) per-tensor.
        zero_point: int32 tensor of the same shape, inside [qmin, qmax].
        grid: the bound `Grid` (bits, symmetric, per_channel, signed); its integer range is [qmin, qmax].
            Symmetric: the zero point is fixed at 0 (signed grid) / 0 (unsigned grid, non-negative data).
        axis: channel axis for per-channel tensors, None for per-tensor (``grid.per_channel``).

    `qmin`, `qmax`, `bits`, `symmetric`, `signed` and `per_channel` read the grid.

    Raises:
        ValueError: `grid` is not a bound `Grid`, or its per_channel disagrees with `axis`.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    grid: Grid
    axis: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.grid, Grid) or self.grid.signed is None:
            raise ValueError(f"QParams needs a bound Grid (signed True or False), got {self.grid!r}; e.g. "
                             "Grid(8, symmetric=True, per_channel=False, signed=True)")
        if self.grid.per_channel != (self.axis is not None):
            raise ValueError(f"QParams: grid.per_channel={self.grid.per_channel} but axis={self.axis!r}; a "
                             "per-channel grid needs its channel axis, a per-tensor grid axis=None")

    @property
    def qmin(self) -> int:
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        return self.grid.qmax

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def symmetric(self) -> bool:
        return self.grid.symmetric

    @property
    def signed(self) -> bool:
        return self.grid.signed

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
    def from_fake_quant(cls, fq) -> "QParams":
        """The active cell of an elastic fake-quant module (`ElasticFakeQuantize`: its public ``export_grid``,
        ``ch_axis`` and ``calculate_qparams()``), on the natural export grid (see the module docstring)."""
        scale, zp = fq.calculate_qparams()
        grid = fq.export_grid
        scale = scale.detach().float().cpu()
        zp = zp.detach().to(torch.int32).cpu()
        if grid.symmetric and grid.signed:
            zp = torch.zeros_like(zp)            # signed activations: zero point 2^(b-1) on the unsigned container
        return cls(scale, zp, grid, fq.ch_axis if grid.per_channel else None)


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
            if isinstance(m, QuantPoint) and not self.is_weight(m.name):
                out.setdefault(m.name, m)
        return out

    def is_weight(self, group: str) -> bool:
        """The role of quantized tensor `group`: True for a layer's weight, False for an activation. The one
        answer every adapter uses."""
        if group not in self.qparams:
            raise KeyError(f"{group!r} is not a quantized tensor of this subnet; known: {sorted(self.qparams)}")
        return any(lay.weight_group == group for lay in self.layers)

    def weight_groups(self) -> dict[str, "FrozenLayer"]:
        """Weight group -> its `FrozenLayer`."""
        return {lay.weight_group: lay for lay in self.layers}

    def pools(self) -> list[str]:
        """Names of the graph's exact global average pools (`ExactGlobalAvgPool` modules and
        `exact_global_avg_pool` calls): they sum in float64 (bit-exact everywhere that has float64)."""
        return [n.name for n in self.graph.graph.nodes if _is_exact_pool(n, self.graph)]

    def export_graph(self, exact_pool: bool = True) -> torch.fx.GraphModule:
        """A deep copy of the graph for export. ``exact_pool=False`` turns every exact global average pool into
        a plain ``adaptive_avg_pool2d(x, 1)`` (one GlobalAveragePool in ONNX: float32 arithmetic, for runtimes
        without float64 such as TensorRT and QNN)."""
        gm = copy.deepcopy(self.graph)
        if not exact_pool:
            _plain_pools(gm)
        return gm

    def swap(self, make_layer: Callable[[nn.Module], nn.Module],
             make_point: Callable[[QuantPoint], nn.Module]) -> torch.fx.GraphModule:
        """A copy of the graph in eval mode, on the frozen subnet's device, with every Quant layer replaced by
        ``make_layer(layer)`` and every activation `QuantPoint` by ``make_point(point)`` (called once per group:
        FX may call one quantizer at several places, and they keep sharing one module). The module-swap every
        PyTorch-side adapter (Brevitas, pytorch-quantization) is built on.

        Raises:
            RuntimeError: a QuantPoint was left in the graph (a layer type the swap does not know).
        """
        gm = copy.deepcopy(self.graph)
        for lay in self.layers:
            mod = gm.get_submodule(lay.name)
            inner = mod[0] if isinstance(mod, nn.Sequential) else mod
            new = make_layer(inner)
            set_submodule(gm, lay.name, nn.Sequential(new, *list(mod)[1:]) if isinstance(mod, nn.Sequential) else new)
        made: dict[str, nn.Module] = {}
        for name, mod in list(gm.named_modules(remove_duplicate=False)):
            if isinstance(mod, QuantPoint):
                if mod.name not in made:
                    made[mod.name] = make_point(mod)
                set_submodule(gm, name, made[mod.name])
        left = [n for n, m in gm.named_modules() if isinstance(m, QuantPoint)]
        if left:
            raise RuntimeError(f"QuantPoints left in the graph after the module swap: {left[:5]}; please report "
                               "the model")
        gm.recompile()
        device = next(iter(self.graph.parameters()), torch.empty(0)).device
        return gm.to(device).eval()


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


def as_frozen(model, cfg=None) -> FrozenSubnet:
    """What every exporter accepts as its first arguments: a `FrozenSubnet`, or a `Supernet` plus `cfg` (default
    its active subnet), which is frozen here through its ``freeze(cfg)`` method.

    Raises:
        TypeError: anything else, or a cfg given twice / with a FrozenSubnet.
        ValueError: `cfg` does not fit the supernet.
    """
    if isinstance(model, FrozenSubnet):
        if cfg is not None:
            raise TypeError("pass either a FrozenSubnet or a Supernet with cfg, not both: a FrozenSubnet already "
                            "holds its subnet")
        return model
    if callable(getattr(model, "freeze", None)) and hasattr(model, "space"):
        return model.freeze(cfg)
    raise TypeError(f"expected a FrozenSubnet, or a Supernet with cfg=, got {type(model).__name__}; freeze a "
                    "subnet with eqnet_plugin.freeze(supernet, cfg)")


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `target` of `root` by `module`."""
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _is_exact_pool(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target is exact_global_avg_pool
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ExactGlobalAvgPool)
    return False


def _plain_pools(module: nn.Module) -> nn.Module:
    """Replace every exact global average pool by ``adaptive_avg_pool2d(x, 1)`` in place (see
    `FrozenSubnet.export_graph`)."""
    for name, child in list(module._modules.items()):
        if isinstance(child, ExactGlobalAvgPool):
            setattr(module, name, nn.AdaptiveAvgPool2d(1))
        elif child is not None:
            _plain_pools(child)
    if isinstance(module, torch.fx.GraphModule):
        calls = [n for n in module.graph.nodes if n.op == "call_function" and n.target is exact_global_avg_pool]
        for node in calls:
            node.target, node.args = nn.functional.adaptive_avg_pool2d, (node.args[0], 1)
        if calls:
            module.recompile()
    return module
