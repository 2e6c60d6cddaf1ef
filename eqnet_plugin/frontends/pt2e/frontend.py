"""`PT2EFrontend`: the `Frontend` (`eqnet_plugin.frontends.base`) of graphs prepared with torchao's
``prepare_qat_pt2e`` and `ElasticQuantizer`. It registers itself, so `eqnet_plugin.Supernet(gm)` picks it for every
graph holding `ElasticPT2EFakeQuantize` modules."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ...export.ir import FrozenSubnet
from ...quant.fake_quant import ElasticFakeQuantize
from ...quant.space import SubnetConfig
from ..base import Layer, QuantizerLayout, activation_order, elastic_quantizers, input_group, register_frontend
from ._torchao import convert_pt2e
from .freeze import freeze_pt2e
from .graph import WEIGHTED_OPS, attr_value, enable_train_eval, use_exact_pools, weight_fq_node
from .quantizer import ElasticPT2EFakeQuantize

__all__ = ["PT2EFrontend", "is_pt2e_prepared"]


def is_pt2e_prepared(model: nn.Module) -> bool:
    """Does `model` hold `ElasticPT2EFakeQuantize` modules (a graph prepared with `ElasticQuantizer`)?"""
    return any(isinstance(m, ElasticPT2EFakeQuantize) for m in model.modules())


@register_frontend
class PT2EFrontend:
    """The `Frontend` of a graph prepared with ``prepare_qat_pt2e(exported, ElasticQuantizer(space))``.

    * layers are the ``aten.conv*d`` / ``aten.linear`` calls whose weight passes through an elastic fake-quant;
      a layer's name is the path of the submodule holding its weight (``layer1.0.conv1``, as in the FX flow), with
      ``@<node name>`` appended when several calls share one weight (`layer_nodes` maps it to its graph node);
    * building it re-enables ``model.train()`` / ``model.eval()`` (`enable_train_eval`) and makes global average
      pools exact, as in the FX flow;
    * conv weights are quantized unfolded (BatchNorm stays a module after the conv): every subnet quantizes the
      same weight tensor, and BatchNorm's running statistics are updated by the widest (H) subnet only during
      `sandwich_step`;
    * `freeze` builds a `FrozenSubnet` (`freeze_pt2e`) and `to_reference` is torchao's ``convert_pt2e``.

    Raises:
        TypeError: `model` was not prepared with `ElasticQuantizer`.
    """

    def __init__(self, model: torch.fx.GraphModule) -> None:
        if not isinstance(model, torch.fx.GraphModule) or not is_pt2e_prepared(model):
            raise TypeError("the PT2E frontend needs the GraphModule returned by prepare_qat_pt2e(torch.export.export("
                            "model, example_inputs).module(), eqnet_plugin.frontends.pt2e.ElasticQuantizer(space))")
        self.model = model
        enable_train_eval(model)
        self.exact_pools = use_exact_pools(model)
        self.fixed_fold: list[str] = []
        self.layer_nodes: dict[str, str] = {}          # layer name -> name of its aten.conv*d / aten.linear node

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """`is_pt2e_prepared(model)`."""
        return is_pt2e_prepared(model)

    def layout(self) -> QuantizerLayout:
        model = self.model
        quantizers, name_of = elastic_quantizers(model)
        modules = dict(model.named_modules(remove_duplicate=False))
        layers: list[Layer] = []
        self.layer_nodes = {}
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in WEIGHTED_OPS:
                continue
            wfq = weight_fq_node(node, model)
            if wfq is None:
                raise ValueError(f"{node.name} ({node.target}) has no elastic weight fake-quant: prepare the model "
                                 "with eqnet_plugin.frontends.pt2e.ElasticQuantizer "
                                 "(eqnet_plugin.frontends.pt2e.prepare_qat checks it)")
            fq = modules[wfq.target]
            param = str(wfq.args[0].target)
            name = param.rpartition(".")[0] or param
            if name in self.layer_nodes:
                name = f"{name}@{node.name}"             # one weight used by several calls
            fq.materialize(attr_value(model, param).shape[0])
            layers.append(Layer(name, WEIGHTED_OPS[node.target], name_of[id(fq)], input_group(node, modules, name_of)))
            self.layer_nodes[name] = node.name
        act_order, outputs = activation_order(model, modules, name_of)
        return QuantizerLayout(quantizers, layers, act_order, outputs)

    def layer_io(self, layers: Sequence[Layer], run: Callable, inputs: tuple) -> dict[str, dict]:
        """The layers are ``aten.conv*d`` / ``aten.linear`` calls, not modules, so the forward runs through a
        `torch.fx.Interpreter` that records each layer call's input and output. ``weight`` is the parameter the
        layer's weight fake-quant reads; ``has_bias``: the call has a bias or its output feeds a BatchNorm module
        (folded into a bias at deployment, as the FX flow's Conv-BN modules)."""
        gm = self.model
        nodes = {n.name: n for n in gm.graph.nodes}
        recorder = _LayerIORecorder(gm, {node_name: name for name, node_name in self.layer_nodes.items()})
        run(recorder.run, inputs)
        modules = dict(gm.named_modules(remove_duplicate=False))
        out: dict[str, dict] = {}
        for lay in layers:
            if lay.name not in recorder.seen:
                continue
            node = nodes[self.layer_nodes[lay.name]]
            x, y = recorder.seen[lay.name]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bn = any(u.op == "call_module" and isinstance(modules.get(u.target), nn.modules.batchnorm._BatchNorm)
                     for u in node.users)
            weight = attr_value(gm, str(weight_fq_node(node, gm).args[0].target))
            out[lay.name] = {"input": x, "output": y, "weight": weight,
                             "op": "linear" if lay.kind == "Linear" else "conv", "has_bias": bias is not None or bn}
        return out

    def freeze(self, supernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None) -> FrozenSubnet:
        """`freeze_pt2e(supernet, cfg, bn_batches)`."""
        return freeze_pt2e(supernet, cfg, bn_batches)

    def to_reference(self) -> torch.fx.GraphModule:
        """``convert_pt2e`` of a deep copy of the model in eval mode (observers off), with the active subnet:
        torchao's standard quantized graph (quantize / dequantize ops around the quantized tensors, with each
        cell's integer range, so sub-8-bit grids are kept). Its outputs equal the supernet's eval output."""
        was_training = self.model.training
        self.model.eval()
        try:
            gm = copy.deepcopy(self.model)
        finally:
            self.model.train(was_training)
        for m in gm.modules():
            if isinstance(m, ElasticFakeQuantize):
                m.enable_observer(False)
        return convert_pt2e(gm)


class _LayerIORecorder(torch.fx.Interpreter):
    """Runs a graph node by node and keeps the first input and the output of the nodes in `layers`
    ({node name: layer name}) in `seen` ({layer name: (input, output)})."""

    def __init__(self, gm: torch.fx.GraphModule, layers: dict[str, str]) -> None:
        super().__init__(gm)
        self.layers = layers
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        name = self.layers.get(n.name)
        if name is not None and name not in self.seen:
            self.seen[name] = (self.env[n.args[0]], out)     # arguments stay in env until their last user ran
        return out
