"""Where the fake-quants of a PT2E-prepared graph sit, the check against torchao's x86 QAT recipe
(`check_placement`), and `prepare_qat`, the PT2E frontend's one call (export + prepare + check)."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ...quant.fake_quant import ElasticFakeQuantize
from ...quant.space import ElasticSpace
from ..base import PlacementError
from ._torchao import AOFakeQuantizeBase, prepare_qat_pt2e
from .graph import ANNOTATION, SOURCE, WEIGHTED_OPS, enable_train_eval, weight_fq_node
from .quantizer import ElasticQuantizer, split_reused_modules, x86_qat_quantizer

__all__ = ["prepare_qat", "check_placement", "fake_quant_placement", "reference_placement"]


def _annotation_edges(gm: torch.fx.GraphModule) -> set[str]:
    """Where an annotated graph asks for fake-quants, as ``"producer->consumer"`` tensor edges (an output spec
    quantizes every edge leaving its node)."""
    edges = set()
    for node in gm.graph.nodes:
        ann = node.meta.get(ANNOTATION)
        if ann is None:
            continue
        for arg, spec in ann.input_qspec_map.items():
            if spec is not None:
                edges.add(f"{arg.name}->{node.name}")
        if ann.output_qspec is not None:
            edges.update(f"{node.name}->{u.name}" for u in node.users if u.op != "output")
            if any(u.op == "output" for u in node.users):
                edges.add(f"{node.name}->output")
    return edges


def reference_placement(exported: torch.fx.GraphModule) -> set[str]:
    """The fake-quant places of torchao's x86 QAT recipe on an exported graph (a deep copy is annotated), as
    ``"producer->consumer"`` edges named by exported node names."""
    gm = split_reused_modules(copy.deepcopy(exported))
    x86_qat_quantizer().annotate(gm)
    return _annotation_edges(gm)


def fake_quant_placement(prepared: torch.fx.GraphModule) -> dict[str, set[str]]:
    """Where fake-quants sit in a PT2E-prepared graph.

    Returns:
        {"edges": ``"producer->consumer"`` tensor edges with a fake-quant between them (exported node names; module
         calls that replaced BatchNorm/dropout nodes answer to the replaced node's name),
         "elastic": the same, for `ElasticFakeQuantize` modules only,
         "weights": names of the parameters read through an elastic weight fake-quant}
    """
    modules = dict(prepared.named_modules(remove_duplicate=False))

    def is_fq(n: Any) -> bool:
        return isinstance(n, torch.fx.Node) and n.op == "call_module" and _is_fq(modules.get(n.target))

    def name(n: torch.fx.Node) -> str:
        return n.meta.get(SOURCE, n.name)

    edges, elastic, weights = set(), set(), set()
    for node in prepared.graph.nodes:
        if not is_fq(node) or not isinstance(node.args[0], torch.fx.Node) or is_fq(node.args[0]):
            continue
        src = node.args[0]
        names = set()
        stack = list(node.users)
        while stack:                        # fake-quants may chain (an output fq feeding a shared input fq)
            u = stack.pop()
            if is_fq(u):
                stack.extend(u.users)
            else:
                names.add(f"{name(src)}->{'output' if u.op == 'output' else name(u)}")
        edges |= names
        if isinstance(modules[node.target], ElasticFakeQuantize):
            elastic |= names
            if modules[node.target].is_weight and src.op == "get_attr":
                weights.add(str(src.target))
    return {"edges": edges, "elastic": elastic, "weights": weights}


def _is_fq(mod: Any) -> bool:
    return isinstance(mod, (AOFakeQuantizeBase, torch.ao.quantization.FakeQuantizeBase))


def check_placement(exported: torch.fx.GraphModule, prepared: torch.fx.GraphModule) -> None:
    """Raise `PlacementError` unless `prepared` (from `ElasticQuantizer`) has elastic fake-quants exactly where
    torchao's x86 QAT recipe puts fake-quants on `exported`, and every Conv/Linear weight is elastic.

    Args:
        exported: the graph given to ``prepare_qat_pt2e`` (``torch.export.export(...).module()``), unchanged.
        prepared: what ``prepare_qat_pt2e(copy, ElasticQuantizer(...))`` returned.

    Raises:
        PlacementError: naming the tensors without a fake-quant, the unexpected ones, the non-elastic ones and the
            Conv/Linear calls without an elastic weight quantizer.
    """
    want = reference_placement(exported)
    got = fake_quant_placement(prepared)
    problems = []
    missing, extra = sorted(want - got["edges"]), sorted(got["edges"] - want)
    if missing:
        problems.append(f"tensors without a fake-quant: {missing[:8]}")
    if extra:
        problems.append(f"unexpected fake-quants: {extra[:8]}")
    not_elastic = sorted(got["edges"] - got["elastic"])
    if not_elastic:
        problems.append(f"fake-quants that are not elastic: {not_elastic[:8]}")
    weighted = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]
    unquantized = [n.name for n in weighted if not weight_fq_node(n, prepared)]
    if unquantized:
        problems.append(f"Conv/Linear calls without an elastic weight fake-quant: {unquantized[:8]}")
    if problems:
        raise PlacementError("elastic fake-quants are not where torchao's x86 QAT recipe puts its own: "
                             + "; ".join(problems) + ". Prepare the exported model with "
                             "prepare_qat_pt2e(model, eqnet_plugin.frontends.pt2e.ElasticQuantizer(space)) and no "
                             "other quantizer.")


def prepare_qat(model: nn.Module, example_inputs: tuple, space: ElasticSpace | None = None, check: bool = True,
                dynamic_shapes: Any = None) -> torch.fx.GraphModule:
    """``torch.export.export`` + ``prepare_qat_pt2e(..., ElasticQuantizer(space))`` + the placement postcondition
    (`check_placement`). The input model is not modified; it is exported in training mode.

    Args:
        model: an eager model (or an already exported ``ExportedProgram.module()``).
        example_inputs: tuple of example inputs (a bare tensor is accepted).
        space: the elastic space.
        check: check the placement against torchao's x86 QAT recipe.
        dynamic_shapes: passed to ``torch.export.export`` (default: the first dimension of every input is
            ``Dim.AUTO``, so any batch size runs; use example inputs with a batch of at least 2).

    Returns:
        the prepared GraphModule (train()/eval() enabled); build the supernet with ``eqnet_plugin.Supernet(gm)``.

    Raises:
        PlacementError: a fake-quant is missing or extra relative to the x86 QAT recipe.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors, e.g. (torch.randn(1, 3, 32, 32),)")
    if isinstance(model, torch.fx.GraphModule) and \
            not any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules()):
        exported = copy.deepcopy(model)              # an exported graph (ExportedProgram.module())
    else:
        model = copy.deepcopy(model).train()
        if dynamic_shapes is None:            # any batch size (calibration, training and evaluation batches differ)
            dynamic_shapes = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() else None
                                   for t in example_inputs)
        exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes).module()
    reference = copy.deepcopy(exported) if check else None
    gm = prepare_qat_pt2e(exported, ElasticQuantizer(space))
    enable_train_eval(gm)
    if check:
        check_placement(reference, gm)
    return gm
