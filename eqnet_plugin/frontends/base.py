"""The frontend protocol: what `Supernet` needs from a graph prepared for elastic QAT.

A *frontend* is one way of putting `ElasticFakeQuantize` modules into a model. There are two:

* FX (`eqnet_plugin.frontends.fx`, `FXFrontend` in `eqnet_plugin.frontends.fx_graph`): torch.ao's
  ``prepare_qat_fx`` with `elastic_qconfig_mapping`; layers are QAT modules (``Conv2d``, ``ConvBn2d``, ``Linear``)
  holding a ``weight_fake_quant``.
* PT2E (`eqnet_plugin.frontends.pt2e`, `PT2EFrontend`): ``torch.export`` + torchao's ``prepare_qat_pt2e`` with
  `ElasticQuantizer`; layers are ``aten.conv*d`` / ``aten.linear`` calls whose weight passes through an elastic
  fake-quant node.

Each frontend offers its users the same two entry points:

* ``prepare_qat(model, example_inputs, space, ...)``: prepare the model and check the placement;
* ``check_placement(...)``: raise `PlacementError` (this module; one class for both frontends) unless the elastic
  fake-quants sit exactly where the frontend's reference recipe (torch.ao's default x86 QAT mapping, torchao's x86
  QAT recipe) puts its own.

and gives `Supernet` one object implementing `Frontend`:

* ``claims(model)`` (class method): is `model` a graph of this frontend?
* ``Frontend(model)``: check the model (a clear TypeError / ValueError naming the prepare call) and adapt
  it in place for the supernet: the fixed Conv-BN fold (`eqnet_plugin.quant.bn_fold`), exact global average
  pools, ``train()`` / ``eval()``; it records what it changed in ``fixed_fold`` and ``exact_pools``;
* ``layout()``: the quantizers by group name, the weighted layers (`Layer`) with their weight and input groups, the
  activation groups in graph order and the groups that quantize model outputs (`QuantizerLayout`); the supernet
  derives groups, fixed groups and subnet configurations from it, the same way for every frontend;
* ``layer_io(layers, run, inputs)``: each layer's input, output and weight on one forward (the search cost model);
* ``freeze(supernet, cfg, bn_batches)``: the export IR (`eqnet_plugin.export.ir.FrozenSubnet`) of one subnet;
* ``to_reference()``: the framework's own reference (quantize / dequantize) model of the active subnet.

`Supernet(gm)` picks the frontend: each frontend registered with `register_frontend` is asked whether it claims
the model, and the FX frontend takes every model none claims (its checks name the FX prepare call). The PT2E
frontend registers itself when `eqnet_plugin.frontends.pt2e` is imported, which a PT2E-prepared graph implies (its
fake-quant class lives there); so the core never imports torchao.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from ..quant.fake_quant import ElasticFakeQuantize
from ..quant.space import SubnetConfig

if TYPE_CHECKING:
    from ..export.ir import FrozenSubnet

__all__ = ["Frontend", "Layer", "QuantizerLayout", "PlacementError", "register_frontend", "frontend_for",
           "elastic_quantizers", "activation_order", "input_group"]

SHAPE_WALK_LIMIT = 16   # how many non-quantizer nodes to walk back from a layer to find its input quantizer


class PlacementError(RuntimeError):
    """Elastic fake-quants are not where the frontend's reference recipe puts its own (torch.ao's default x86 QAT
    mapping for FX, torchao's x86 QAT recipe for PT2E)."""


@dataclass(frozen=True)
class Layer:
    """A weighted layer: its name and type, and the names of its weight and input-activation groups (`input` is
    None when no activation quantizer feeds it)."""

    name: str
    kind: str
    weight: str
    input: str | None


@dataclass(frozen=True)
class QuantizerLayout:
    """What a frontend finds in a prepared graph (`Frontend.layout`).

    Attributes:
        quantizers: group name -> quantizer, one entry per distinct quantizer object, in module order.
        layers: the weighted layers, in graph order.
        act_order: the activation groups, in the order the graph first calls them.
        output_groups: the groups whose quantizer feeds a model output.
    """

    quantizers: dict[str, ElasticFakeQuantize]
    layers: list[Layer]
    act_order: list[str]
    output_groups: frozenset[str]


class Frontend(Protocol):
    """What `Supernet` needs from a prepared graph (see the module docstring)."""

    model: torch.fx.GraphModule
    fixed_fold: list[str]      # Conv-BN modules switched to the fixed fold
    exact_pools: list[str]     # global average pools made exact

    def __init__(self, model: torch.fx.GraphModule) -> None:
        """Check `model` (TypeError / ValueError naming the prepare call) and adapt it in place for a supernet."""

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Is `model` a graph prepared by this frontend?"""

    def layout(self) -> QuantizerLayout:
        """The quantizers and layers of the graph (weight quantizers are sized to their layer's channels)."""

    def layer_io(self, layers: Sequence[Layer], run: Callable, inputs: tuple) -> dict[str, dict]:
        """What every layer sees on ``run(fn, inputs)`` (one eval-mode forward with fake quantization off):
        {layer name: {"input", "output", "weight", "op", "has_bias"}} (see `Supernet.layer_io`)."""

    def freeze(self, supernet: Any, cfg: SubnetConfig | None, bn_batches: Iterable | None) -> "FrozenSubnet":
        """The export IR of subnet `cfg` of `supernet` (default: the active one)."""

    def to_reference(self) -> torch.fx.GraphModule:
        """The reference (quantize / dequantize) model of the active subnet, converted from a copy of the model."""


_REGISTERED: list[type] = []


def register_frontend(frontend: type) -> type:
    """Let `Supernet` pick `frontend` (a class implementing `Frontend`) for the models it claims; returns it, so it
    can decorate the class. Registering twice is a no-op."""
    if not callable(getattr(frontend, "claims", None)):
        raise TypeError(f"{frontend!r} has no claims(model) class method: it does not implement Frontend")
    if frontend not in _REGISTERED:
        _REGISTERED.append(frontend)
    return frontend


def frontend_for(model: nn.Module, default: type) -> type:
    """The registered frontend class that claims `model`, else `default`."""
    return next((f for f in _REGISTERED if f.claims(model)), default)


def elastic_quantizers(model: nn.Module) -> tuple[dict[str, ElasticFakeQuantize], dict[int, str]]:
    """({group name: quantizer} in module order, {id(quantizer): group name}): a quantizer reachable under several
    names (FX may reuse one for several nodes) is one group, named by its first path."""
    name_of: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, ElasticFakeQuantize):
            name_of.setdefault(id(m), n)
    quantizers = {name_of[id(m)]: m for _, m in model.named_modules(remove_duplicate=False)
                  if isinstance(m, ElasticFakeQuantize)}
    return quantizers, name_of


def activation_order(model: torch.fx.GraphModule, modules: dict[str, nn.Module], name_of: dict[int, str]
                     ) -> tuple[list[str], frozenset[str]]:
    """(activation groups in the order the graph first calls their quantizer, groups feeding a model output)."""
    order: list[str] = []
    outputs: set[str] = set()
    for node in model.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, ElasticFakeQuantize):
            g = name_of[id(mod)]
            if not mod.is_weight and g not in order:
                order.append(g)
            if any(u.op == "output" for u in node.users):
                outputs.add(g)
    return order, frozenset(outputs)


def input_group(node: torch.fx.Node, modules: dict[str, nn.Module], name_of: dict[int, str]) -> str | None:
    """The group of the activation quantizer feeding a layer's node: the first quantizer found walking back along
    first arguments (at most `SHAPE_WALK_LIMIT` nodes), else None."""
    cur = node.args[0] if node.args else None
    for _ in range(SHAPE_WALK_LIMIT):
        if not isinstance(cur, torch.fx.Node):
            return None
        mod = modules.get(cur.target) if cur.op == "call_module" else None
        if isinstance(mod, ElasticFakeQuantize):
            return name_of[id(mod)]
        cur = cur.args[0] if cur.args else None
    return None

