"""`FXFrontend`: the `Frontend` (`eqnet_plugin.frontends.base`) of graphs prepared with torch.ao's ``prepare_qat_fx``
and `eqnet_plugin.frontends.fx.elastic_qconfig_mapping`.

Layers are the QAT modules holding an elastic ``weight_fake_quant`` (``Conv*d``, ``ConvBn*d``, ``ConvBnReLU*d``,
``Linear``, ...); activation quantizers are ``call_module`` nodes of the graph.

Freeze (`freeze_fx`), BatchNorm (see `eqnet_plugin.quant.bn_fold`): a Conv-BN layer's integer weights are the ones
its cell was trained on (the fixed fold), and the subnet's BN statistics become per-channel weight scales and the
bias. So a Conv-BN layer whose cell is per-tensor exports per-channel scales over per-tensor integer codes, unless
its BN ratio is the same for every channel (as right after `Supernet(...)`, before BN statistics move).
`bn_fold.export_weight` is the one place that fold is computed (the torch.ao reference conversion uses it too).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..export.freeze import snapshot
from ..export.ir import (FrozenLayer, FrozenSubnet, QParams, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear,
                         QuantPoint, set_submodule)
from ..quant.bn_fold import export_weight, fold_weight, use_fixed_bn_fold
from ..quant.exact_pool import use_exact_global_pools
from ..quant.fake_quant import ElasticFakeQuantize
from ..quant.space import SubnetConfig
from .base import Layer, QuantizerLayout, activation_order, elastic_quantizers, input_group
from .fx import convert_reference, unprepared_layers

__all__ = ["FXFrontend", "freeze_fx"]

_CONV_BY_DIM = {1: QuantConv1d, 2: QuantConv2d, 3: QuantConv3d}


class FXFrontend:
    """The `Frontend` of an FX graph prepared with `elastic_qconfig_mapping` (the default of `Supernet`).

    Building it adapts the model in place: Conv-BN modules switch to the fixed fold
    (`eqnet_plugin.quant.bn_fold`) and global average pool modules become `ExactGlobalAvgPool`
    (`eqnet_plugin.quant.exact_pool`). Placement and parameters are unchanged.

    Raises:
        TypeError: `model` is not a GraphModule.
        ValueError: it holds no `ElasticFakeQuantize`, or some Conv/Linear layer was left unprepared.
    """

    def __init__(self, model: torch.fx.GraphModule) -> None:
        if not isinstance(model, torch.fx.GraphModule):
            raise TypeError(f"Supernet needs the GraphModule returned by prepare_qat_fx, got {type(model).__name__}; "
                            "call prepare_qat_fx(model, eqnet_plugin.elastic_qconfig_mapping(), example_inputs) first")
        if not any(isinstance(m, ElasticFakeQuantize) for m in model.modules()):
            raise ValueError("the model holds no ElasticFakeQuantize: prepare it with "
                             "prepare_qat_fx(model, eqnet_plugin.elastic_qconfig_mapping(), example_inputs)")
        left = unprepared_layers(model)
        if left:
            raise ValueError(f"layers {left[:6]} were not prepared for QAT (their qconfig was dropped, e.g. by a "
                             "backend_config that rejects the elastic dtypes): prepare without backend_config or "
                             "with elastic_backend_config()")
        self.model = model
        self.fixed_fold = use_fixed_bn_fold(model)
        self.exact_pools = use_exact_global_pools(model)

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """A GraphModule holding elastic fake-quants (the fallback: `Supernet` asks the other frontends first)."""
        return isinstance(model, torch.fx.GraphModule) and \
            any(isinstance(m, ElasticFakeQuantize) for m in model.modules())

    def layout(self) -> QuantizerLayout:
        """Layers are the modules called in the graph whose ``weight_fake_quant`` is elastic."""
        model = self.model
        quantizers, name_of = elastic_quantizers(model)
        modules = dict(model.named_modules(remove_duplicate=False))
        layers: list[Layer] = []
        for node in model.graph.nodes:
            mod = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(getattr(mod, "weight_fake_quant", None), ElasticFakeQuantize):
                layers.append(Layer(node.target, type(mod).__name__, name_of[id(mod.weight_fake_quant)],
                                    input_group(node, modules, name_of)))
                mod.weight_fake_quant.materialize(mod.weight.shape[0])
        act_order, outputs = activation_order(model, modules, name_of)
        return QuantizerLayout(quantizers, layers, act_order, outputs)

    def layer_io(self, layers: Sequence[Layer], run: Callable, inputs: tuple) -> dict[str, dict]:
        """Forward hooks on the layers' modules record each one's first call."""
        gm = self.model
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = []
        for lay in layers:
            def hook(m, args, out, name=lay.name):
                if name not in seen:     # a module called twice (shared) counts its first call's shapes
                    seen[name] = (args[0], out)
            hooks.append(gm.get_submodule(lay.name).register_forward_hook(hook))
        try:
            run(gm, inputs)
        finally:
            for h in hooks:
                h.remove()
        out: dict[str, dict] = {}
        for lay in layers:
            if lay.name not in seen:
                continue
            mod = gm.get_submodule(lay.name)
            x, y = seen[lay.name]
            out[lay.name] = {"input": x, "output": y, "weight": mod.weight, "op": _mac_op(mod),
                             "has_bias": getattr(mod, "bias", None) is not None or getattr(mod, "bn", None) is not None}
        return out

    def freeze(self, supernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None) -> FrozenSubnet:
        """`freeze_fx(supernet, cfg, bn_batches)`."""
        return freeze_fx(supernet, cfg, bn_batches)

    def to_reference(self) -> torch.fx.GraphModule:
        """torch.ao's decomposed reference model of the active subnet (`fx.convert_reference`)."""
        return convert_reference(self.model)


def _mac_op(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None


def _float_layer(mod: nn.Module, qp: QParams) -> tuple[nn.Module, QParams]:
    """The QuantConv/QuantLinear of a QAT layer, BatchNorm folded in (`bn_fold.fold_to_export`), and the QParams
    of its weight. Conv-BN layers store the trained integer weights dequantized on the export grid."""
    if getattr(mod, "bn", None) is not None:
        w, scale, zp, b, pc = export_weight(mod, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.per_channel)
        qp = QParams(scale.detach().float().cpu(), zp.detach().to(torch.int32).cpu(),
                     qp.grid.replace(per_channel=pc), 0 if pc else None)
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
def freeze_fx(supernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None) -> FrozenSubnet:
    """Freeze subnet `cfg` (default: the active one) of a supernet over an FX graph into a `FrozenSubnet`: every
    QAT layer becomes a `QuantConv{1,2,3}d` / `QuantLinear` (BatchNorm folded in, see the module docstring), every
    activation fake-quant a `QuantPoint`. `eqnet_plugin.freeze` documents the arguments and errors."""
    cfg, qparams, gm = snapshot(supernet, cfg, bn_batches)
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
    # torch.ao's bookkeeping (qconfigs holding local functions) is not part of the IR, and it would make the
    # frozen model (and every model an adapter builds from it) unpicklable
    gm.meta.pop("_observed_graph_module_attrs", None)
    for m in gm.modules():
        if "qconfig" in m.__dict__:
            del m.qconfig
    gm.recompile()
    frozen = FrozenSubnet(gm, cfg, qparams, layers)
    return frozen.eval()
