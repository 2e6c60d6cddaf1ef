"""`freeze_pt2e`: the export IR (`FrozenSubnet`) of one subnet of a supernet over a PT2E-prepared graph."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ...export.freeze import snapshot
from ...export.ir import FrozenLayer, FrozenSubnet, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantPoint, \
    set_submodule
from ...quant.fake_quant import ElasticFakeQuantize
from ...quant.space import SubnetConfig
from .graph import aten, attr_value, enable_train_eval, free_name

__all__ = ["freeze_pt2e"]

_QUANT_CONV = {"Conv1d": QuantConv1d, "Conv2d": QuantConv2d, "Conv3d": QuantConv3d}


@torch.no_grad()
def freeze_pt2e(supernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None
                ) -> FrozenSubnet:
    """Freeze subnet `cfg` (default: the active one) of a PT2E supernet into the usual `FrozenSubnet`.

    Every Conv/Linear call becomes a `QuantConv{1,2,3}d` / `QuantLinear` module (weight through its own
    `QuantPoint`) at the layer's name, every activation fake-quant a `QuantPoint`; the other ops stay the exported
    aten ops. BatchNorm stays a module after its conv (eval mode, the subnet's statistics): the weights quantized
    in training are the unfolded conv weights, and a runtime folds BatchNorm as a per-channel scale.

    Args:
        bn_batches: training batches to re-estimate the subnet's BatchNorm statistics on first.

    Returns:
        the FrozenSubnet (eval mode); its output equals the supernet's eval output under ``activate(cfg)``.

    Raises:
        ValueError: `cfg` does not fit the supernet.
        BatchNormStatsError: the subnet's BatchNorm statistics are not known (pass `bn_batches`).
    """
    cfg, qparams, gm = snapshot(supernet, cfg, bn_batches)
    enable_train_eval(gm)
    gm.eval()
    points = {g: QuantPoint(g, qp) for g, qp in qparams.items()}
    nodes = {n.name: n for n in gm.graph.nodes}
    layers: list[FrozenLayer] = []
    for lay in supernet.layers:
        node = nodes[supernet.frontend.layer_nodes[lay.name]]
        wfq = node.args[1]
        w = attr_value(gm, str(wfq.args[0].target)).detach()
        args = list(node.args)
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        b = attr_value(gm, str(bias.target)).detach() if isinstance(bias, torch.fx.Node) else None
        if isinstance(bias, torch.fx.Node) and bias.op != "get_attr":
            raise RuntimeError(f"layer {lay.name}: its bias is computed in the graph; please report the model")
        if lay.kind == "Linear":
            new = QuantLinear(w.shape[1], w.shape[0], bias=b is not None)
        else:
            stride, padding, dilation, groups = _conv_args(node, w.dim() - 2)
            new = _QUANT_CONV[lay.kind](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding,
                                        dilation, groups, bias=b is not None)
        new = new.to(device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        new.weight_quant = points[lay.weight]
        target = free_name(gm, "frozen_" + lay.name) if "@" in lay.name else lay.name
        if "@" in lay.name:
            gm.add_module(target, new)
        else:
            set_submodule(gm, target, new)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(target, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        layers.append(FrozenLayer(target, type(new).__name__, lay.weight, lay.input, False))
    ids = {id(fq): g for g, fq in supernet.groups.items()}
    for name, m in list(supernet.model.named_modules(remove_duplicate=False)):
        if isinstance(m, ElasticFakeQuantize) and not m.is_weight and id(m) in ids:
            set_submodule(gm, name, points[ids[id(m)]])
    _dynamic_sizes_for_tracing(gm)
    for node in list(gm.graph.nodes):
        # torch.export's input-shape guard: not part of the IR, and its wrapped forward cannot be pickled
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    for name, m in list(gm.named_modules()):
        if isinstance(m, ElasticFakeQuantize):                # weight fake-quants no longer called
            set_submodule(gm, name, nn.Identity())
    gm.recompile()
    gm.delete_all_unused_submodules()
    # a plain GraphModule (no torch.export tracer class to re-trace with on load): picklable like the FX flow's
    gm.graph._tracer_cls, gm.graph._tracer_extras = None, {}
    gm = torch.fx.GraphModule(gm, gm.graph)
    return FrozenSubnet(gm, cfg, qparams, layers).eval()


def _dynamic_sizes_for_tracing(gm: torch.fx.GraphModule) -> None:
    """Keep batch-size dependent shapes dynamic in the ONNX (TorchScript) exporters' trace, in place.

    An exported graph reads sizes with ``aten.sym_size.int`` and passes them to ``aten`` overloads (``view``,
    ``expand``, ...); the TorchScript tracer records both as constants. As ``x.size(d)`` and Tensor methods it
    records them as graph values, so the exported ONNX model takes any batch size, like the FX flow's.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.sym_size.int:
            continue
        node.op, node.target = "call_method", "size"
        for user in node.users:
            name = getattr(getattr(user.target, "_schema", None), "name", "")
            method = name.partition("::")[2]
            if user.op == "call_function" and method and hasattr(torch.Tensor, method) and not user.kwargs:
                user.op, user.target = "call_method", method


def _conv_args(node: torch.fx.Node, dims: int) -> tuple:
    """(stride, padding, dilation, groups) of an ``aten.conv*d`` call with the schema's defaults."""
    names = ("stride", "padding", "dilation", "groups")
    defaults = ([1] * dims, [0] * dims, [1] * dims, 1)
    out = []
    for i, (name, default) in enumerate(zip(names, defaults)):
        v = node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name, default)
        if isinstance(v, str):
            raise RuntimeError(f"{node.name}: padding={v!r} is not supported by the freeze; use explicit padding")
        out.append(tuple(v) if isinstance(v, (list, tuple)) else v)
    return tuple(out)
