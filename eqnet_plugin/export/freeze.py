"""Freeze one subnet of a supernet into the export IR (`eqnet_plugin.export.ir`) that every adapter reads.

`freeze(supernet, cfg)` returns a `FrozenSubnet` whose forward pass reproduces the supernet's eval output under
`activate(cfg)`; adapters swap its QuantPoints (and layers) for their framework's modules or for ONNX Q/DQ nodes.

BatchNorm (see `eqnet_plugin.quant.bn_fold`): a Conv-BN layer's integer weights are the ones its cell was trained on
(the fixed fold), and the subnet's BN statistics become per-channel weight scales and the bias. So a Conv-BN layer
whose cell is per-tensor exports per-channel scales over per-tensor integer codes, unless its BN ratio is the same
for every channel (as right after `Supernet(...)`, before BN statistics move). `bn_fold.export_weight` is the one
place that fold is computed (the torch.ao reference conversion uses it too).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.bn_fold import export_weight, fold_weight
from ..quant.fake_quant import ElasticFakeQuantize
from .ir import (FrozenLayer, FrozenSubnet, QParams, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantPoint,
                 as_example_inputs, as_frozen, set_submodule)
from ..quant.space import SubnetConfig

__all__ = ["QParams", "QuantPoint", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "FrozenLayer",
           "FrozenSubnet", "freeze", "as_frozen", "as_example_inputs"]

_CONV_BY_DIM = {1: QuantConv1d, 2: QuantConv2d, 3: QuantConv3d}


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
    from ..supernet import Supernet
    if type(supernet).freeze is not Supernet.freeze:      # a Supernet with its own IR builder (the PT2E one)
        return supernet.freeze(cfg, bn_batches)
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


def snapshot(supernet, cfg: SubnetConfig | None, bn_batches=None) -> tuple[SubnetConfig, dict[str, QParams],
                                                                         torch.fx.GraphModule]:
    """What every freeze starts from: (the subnet, the QParams of every group, a deep copy of the model) taken
    under ``activate(cfg)`` (default: the active subnet) after the checks, with the subnet's BatchNorm statistics
    (re-estimated on `bn_batches` first when given). The supernet is left unchanged."""
    cfg = cfg if cfg is not None else supernet.current_config()
    supernet.require_calibrated("freeze")
    with supernet.activate(cfg):
        if bn_batches is not None:
            supernet.recalibrate_bn(bn_batches)
        supernet.require_bn_stats(cfg, "freeze")
        qparams = {g: QParams.from_fake_quant(fq) for g, fq in supernet.groups.items()}
        gm = copy.deepcopy(supernet.model)
    return cfg, qparams, gm
