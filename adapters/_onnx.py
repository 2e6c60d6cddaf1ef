"""Shared ONNX plumbing for the adapters: export a FrozenSubnet with *markers* at every quantized tensor, then let
each adapter replace the markers by what its target needs.

Why markers instead of torch's quantized ONNX export: torch's exporters reject or silently drop sub-8-bit ranges
(see docs/targets.md), and ONNX Runtime's `quantize_static` places Q/DQ by its own rules, which differ from where
torch.ao placed the fake-quants we trained with. A marker (custom op ``eqnet.QuantPoint`` carrying the group name)
survives the TorchScript exporter exactly where the QuantPoint was, so every adapter writes its nodes at the training
placement: Q -> DQ (optionally with Clip for sub-8-bit) for ONNX Runtime and TensorRT, nothing (a stable tensor
name) for QNN's encodings file.
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from typing import Callable

import torch
from torch import nn

from eqnet_plugin.exact_pool import ExactGlobalAvgPool, exact_global_avg_pool
from eqnet_plugin.freeze import FrozenSubnet, QuantPoint, as_example_inputs

__all__ = ["MARKER_DOMAIN", "MARKER_OP", "export_marked", "replace_markers", "save_model_atomic"]

MARKER_DOMAIN = "eqnet"
MARKER_OP = "QuantPoint"


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name: str):
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str):
        return g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, group_s=name).setType(x.type())


class _MarkerPoint(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x):
        return _Marker.apply(x, self.name)


# ops whose output is a pool's (Cast: the last op of ExactGlobalAvgPool's float64 sum)
POOL_OUTPUT_OPS = ("Cast", "GlobalAveragePool", "AveragePool", "ReduceMean")
_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def _swap_points(module: nn.Module) -> nn.Module:
    """Replace every QuantPoint (also inside Quant layers) by a marker, in place."""
    # _modules, not named_children(): FX shares one quantizer under several attribute names, and
    # named_children() yields a shared module only once, which would leave the second use un-marked.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if isinstance(child, QuantPoint):
            setattr(module, name, _MarkerPoint(child.name))
        else:
            _swap_points(child)
    return module


def _plain_pools(module: nn.Module) -> nn.Module:
    """Replace every ExactGlobalAvgPool module by ``nn.AdaptiveAvgPool2d(1)`` (exported as GlobalAveragePool), in
    place; for targets without float64 (TensorRT, QNN)."""
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


def export_marked(frozen: FrozenSubnet, example_inputs: tuple, opset: int = 17, input_names=("input",),
                  output_names=("output",), dynamic_batch: bool = True, exact_pool: bool = False):
    """Export `frozen` as float ONNX with an ``eqnet.QuantPoint`` marker node at every quantized tensor.

    ``exact_pool=False`` exports `ExactGlobalAvgPool` modules as a plain GlobalAveragePool (float32 arithmetic,
    for runtimes without float64); True keeps their float64 sum (Cast -> ReduceSum -> Div -> Cast), which ONNX
    Runtime computes bit-exactly like training.

    Returns the `onnx.ModelProto` (markers included; not yet valid for runtimes).
    """
    import onnx

    example_inputs = as_example_inputs(example_inputs)
    graph = _swap_points(copy.deepcopy(frozen.graph)).eval()
    if not exact_pool:
        _plain_pools(graph)
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example_inputs, buf, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, dynamo=False,
                          do_constant_folding=True, custom_opsets={MARKER_DOMAIN: 1})
    return onnx.load_from_string(buf.getvalue())


def replace_markers(model, make_nodes: Callable[[str, str, str], list]) -> dict[str, str]:
    """Replace each marker node by ``make_nodes(group, input_name, output_name)`` (a list of onnx NodeProtos
    reading `input_name` and writing `output_name`; an empty list means "wire input straight through").

    Returns group -> the tensor name that carries the quantized value (the marker's output name, or its input
    name where the marker was removed). Removes the marker opset import. Raises if a marker has no group.
    """
    graph = model.graph
    new_nodes, carried, renames = [], {}, {}
    for node in graph.node:
        if node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP:
            group = next((a.s.decode() for a in node.attribute if a.name == "group"), None)
            if group is None:
                raise ValueError("marker node without a group attribute")
            src = renames.get(node.input[0], node.input[0])
            nodes = make_nodes(group, src, node.output[0])
            if nodes:
                new_nodes.extend(nodes)
                carried.setdefault(group, node.output[0])
            else:
                renames[node.output[0]] = src
                carried.setdefault(group, src)
        else:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
            new_nodes.append(node)
    for out in graph.output:
        if out.name in renames:
            # a graph output must keep its name: add an Identity
            from onnx import helper
            new_nodes.append(helper.make_node("Identity", [renames[out.name]], [out.name]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return carried


def reciprocal_quantize(model) -> int:
    """Rewrite, in place, every per-tensor ``QuantizeLinear(x, s, zp)`` that feeds a Clip (a sub-8-bit grid in an
    8-bit container) or reads a pool's output into ``Mul(x, 1 / s) -> QuantizeLinear(x', 1, zp)``; the
    DequantizeLinear keeps scale ``s``.

    Training rounds ``x * (1 / s)``; QuantizeLinear rounds ``x / s``. The two differ on exact rounding ties, which
    coarse sub-8-bit grids and pooled values re-quantized on their input's grid make frequent (measured on Brevitas'
    QCDQ export of TinyResNet subnets: W8A4 77% of outputs within 1 LSB of the Brevitas module as exported, 100%
    after this rewrite; a mixed subnet 76% with the sub-8-bit rewrite alone). ONNX Runtime never fuses a
    Q -> Clip -> DQ chain into integer kernels; the pool's output loses one fusion at most.

    Returns:
        the number of QuantizeLinear nodes rewritten.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    clipped = {n.input[0] for n in graph.node if n.op_type == "Clip"}
    pooled: set[str] = set()                 # pool outputs, followed through shape-only ops (Flatten, Reshape, ...)
    for n in graph.node:                     # topological order
        if n.op_type in POOL_OUTPUT_OPS or (n.op_type in _SHAPE_OPS and n.input and n.input[0] in pooled):
            pooled.update(n.output)
    new_nodes, count = [], 0
    for node in graph.node:
        scale = consts.get(node.input[1]) if node.op_type == "QuantizeLinear" and len(node.input) > 1 else None
        if scale is not None and scale.size == 1 and (node.output[0] in clipped or node.input[0] in pooled):
            inv, one = f"{node.output[0]}.inv_scale", f"{node.output[0]}.unit_scale"
            graph.initializer.extend([numpy_helper.from_array((np.float32(1) / scale.astype(np.float32)), inv),
                                      numpy_helper.from_array(np.ones_like(scale, dtype=np.float32), one)])
            new_nodes.append(helper.make_node("Mul", [node.input[0], inv], [f"{node.output[0]}.scaled"],
                                              name=f"{node.output[0]}.reciprocal"))
            node.input[0], node.input[1] = f"{node.output[0]}.scaled", one
            count += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def save_model_atomic(model, path: str | os.PathLike) -> str:
    """Check and write an ONNX model via a temporary file and a rename; returns the path."""
    import onnx

    path = os.fspath(path)
    onnx.checker.check_model(model)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
