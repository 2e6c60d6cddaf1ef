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

import io
import os
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from eqnet_plugin.files import atomic_write
from eqnet_plugin.export.ir import FrozenSubnet, QuantPoint, as_example_inputs

__all__ = ["MARKER_DOMAIN", "MARKER_OP", "export_marked", "replace_markers", "save_model_atomic", "constants",
           "constant_tensors"]

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
    graph = _swap_points(frozen.export_graph(exact_pool=exact_pool)).eval()
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
    coarse sub-8-bit grids and pooled values re-quantized on their input's grid make frequent (the Brevitas QCDQ
    tests measure the agreement before and after this rewrite). ONNX Runtime never fuses a
    Q -> Clip -> DQ chain into integer kernels; the pool's output loses one fusion at most.

    Returns:
        the number of QuantizeLinear nodes rewritten.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = constants(graph)
    clipped = {n.input[0] for n in graph.node if n.op_type == "Clip"}
    pooled: set[str] = set()                 # pool outputs, followed through shape-only ops (Flatten, Reshape, ...)
    for n in graph.node:                     # topological order
        if n.op_type in POOL_OUTPUT_OPS or (n.op_type in _SHAPE_OPS and n.input and n.input[0] in pooled):
            pooled.update(n.output)
    new_nodes, count = [], 0
    for node in graph.node:
        scale = consts(node.input[1]) if node.op_type == "QuantizeLinear" and len(node.input) > 1 else None
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
    """Check and write an ONNX model atomically (`eqnet_plugin.files.atomic_write`); returns the path."""
    import onnx

    onnx.checker.check_model(model)
    return atomic_write(path, lambda tmp: onnx.save(model, tmp))


def constant_tensors(graph) -> Callable[[str], object]:
    """A lookup of the constant tensors of an ONNX graph by name, as `onnx.TensorProto`: initializers, Constant
    nodes and Identity chains over them (torch's exporter de-duplicates equal initializers through Identity
    nodes); None for a computed tensor. The one constant lookup the adapters share."""
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def tensor(name: str, depth: int = 0):
        if name in inits:
            return inits[name]
        node = producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Identity":
            return tensor(node.input[0], depth + 1)
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return None if attr is None else attr.t
        return None
    return tensor


def constants(graph) -> Callable[[str], np.ndarray | None]:
    """`constant_tensors` as numpy arrays."""
    from onnx import numpy_helper

    tensor = constant_tensors(graph)

    def value(name: str) -> np.ndarray | None:
        t = tensor(name)
        return None if t is None else numpy_helper.to_array(t)
    return value
