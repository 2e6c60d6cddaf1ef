"""The seam to torchao's PT2E quantization: the only module that imports torchao.

The PT2E flow, beside the torch.ao FX one (`eqnet_plugin.frontends.fx`)::

    ep = torch.export.export(model.train(), example_inputs)
    gm = prepare_qat_pt2e(ep.module(), ElasticQuantizer(space))     # torchao's own prepare, elastic fake-quants
    sn = PT2ESupernet(gm)                                            # (eqnet_plugin.Supernet once patched, see docs)
    sn.calibrate(batches); sandwich_step(sn, x, y, optimizer, generator=g); evaluate(sn, cfg, loader, bn_batches)
    with sn.activate(cfg):
        q = convert_pt2e(copy.deepcopy(gm.eval()))                   # torchao's standard Q/DQ graph of the subnet

* `ElasticQuantizer(space)`: a torchao `Quantizer`. Placement is torchao's x86 QAT recipe (`X86InductorQuantizer`
  with its QAT config): the quantizer runs that recipe's own annotation and swaps every learnable-range spec for an
  elastic one (`ElasticPT2EFakeQuantize`), so fake-quants land exactly where the x86 recipe puts its own
  (`check_placement` verifies it on the prepared graph). Differences, all deliberate (docs/pt2e.md):
  BatchNorm and dropout become real `nn.BatchNorm*d` / `nn.Dropout` modules before torchao's QAT Conv-BN fusion, so
  conv weights are quantized *unfolded* (the official EQ-Net layout: every subnet quantizes the same weight tensor,
  whatever BatchNorm statistics a subnet re-estimates) and ``model.train()`` / ``model.eval()`` switch them.
* `PT2ESupernet(gm)`: `Supernet` over a PT2E-prepared graph: layers are found on ``aten.conv*d`` /
  ``aten.linear`` calls, ``train()`` / ``eval()`` work again, global average pools are exact (as in the FX flow),
  `freeze` builds the usual `FrozenSubnet` (so every adapter works) and `to_reference` is torchao's `convert_pt2e`.
* `prepare_qat(model, example_inputs, space)`: export + prepare + the placement postcondition.

torchao 0.18's x86 recipe fails on a ReLU module called twice (torchvision's BasicBlock): it groups both calls
into one source partition ("Input partition has more than one output node"). `split_reused_modules` (run by
`ElasticQuantizer.transform_for_annotation` and by the reference annotation of `check_placement`) gives each call
of a reused single-op module its own partition.
"""
from __future__ import annotations

import copy
import pydoc
from dataclasses import replace as dc_replace
from typing import Any, Iterable

import torch
from torch import nn

from ..quant.exact_pool import exact_global_avg_pool
from ..quant.fake_quant import ElasticFakeQuantize
from ..export.freeze import snapshot
from ..export.ir import FrozenLayer, FrozenSubnet, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantPoint, \
    set_submodule
from ..quant.space import ElasticSpace, SubnetConfig
from ..supernet import Layer, Supernet

try:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase as _AOFakeQuantizeBase
    from torchao.quantization.pt2e.observer import _with_args as _ao_with_args
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import (DerivedQuantizationSpec, FixedQParamsQuantizationSpec,
                                                     QuantizationSpec, Quantizer, SharedQuantizationSpec)
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
except ImportError as e:                                                   # pragma: no cover - import guard
    raise ImportError(f"eqnet_plugin.frontends.pt2e needs torchao ({e}); install it with pip install 'eqnet_plugin[pt2e]' "
                      "(torchao==0.18.0)") from e

__all__ = ["ElasticPT2EFakeQuantize", "ElasticQuantizer", "PT2ESupernet", "prepare_qat", "check_placement",
           "fake_quant_placement", "reference_placement", "split_reused_modules", "enable_train_eval",
           "freeze_pt2e", "convert_subnet", "is_pt2e_prepared", "PlacementError"]

_ANNOTATION = "quantization_annotation"
_SOURCE = "eqnet_pt2e_source"          # node.meta key: the exported node a swapped module call replaced
_aten = torch.ops.aten
_WEIGHTED_OPS = {_aten.conv1d.default: "Conv1d", _aten.conv2d.default: "Conv2d", _aten.conv3d.default: "Conv3d",
                 _aten.linear.default: "Linear"}
_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_QUANT_CONV = {"Conv1d": QuantConv1d, "Conv2d": QuantConv2d, "Conv3d": QuantConv3d}


class PlacementError(RuntimeError):
    """Elastic fake-quants are not where torchao's x86 QAT recipe puts its own."""


# --- the fake-quant module -------------------------------------------------------------------------------------
class ElasticPT2EFakeQuantize(ElasticFakeQuantize, _AOFakeQuantizeBase):
    """`ElasticFakeQuantize` that torchao's PT2E prepare and convert recognize as a fake-quant.

    torchao checks fake-quants against its own `FakeQuantizeBase` (not torch.ao's) and builds them from a
    `QuantizationSpec` constructor through torchao's ``with_args`` (it reads the class name of the constructor, which
    torch.ao's ``with_args`` partials do not have). The spec's dtype / range / qscheme arguments are accepted and
    ignored: the active elastic cell defines them. ``dtype`` is reported as torchao's plain ``torch.int8`` (weights)
    / ``torch.uint8`` (activations).

    Args:
        is_weight, space, ch_axis: as for `ElasticFakeQuantize`.
        **spec_kwargs: the QuantizationSpec fields torchao passes (dtype, quant_min, quant_max, qscheme, ch_axis,
            is_dynamic); a dynamic spec is refused.

    Raises:
        ValueError: a dynamic quantization spec (elastic cells are static).
    """

    with_args = classmethod(_ao_with_args)

    def __init__(self, is_weight: bool = False, space: ElasticSpace | None = None, ch_axis: int = 0,
                 factory_kwargs: dict | None = None, **spec_kwargs: Any) -> None:
        if spec_kwargs.get("is_dynamic", False):
            raise ValueError("ElasticPT2EFakeQuantize is static: use a QuantizationSpec with is_dynamic=False")
        super().__init__(is_weight=is_weight, space=space, ch_axis=ch_axis, factory_kwargs=factory_kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.is_weight else torch.uint8


# --- placement helpers -----------------------------------------------------------------------------------------
def split_reused_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give every call of a reused single-op leaf module (e.g. the ReLU that torchvision's BasicBlock calls twice)
    its own source partition, in place; returns `gm`.

    torchao 0.18 groups nodes without ``source_fn_stack`` by their innermost ``nn_module_stack`` entry, so both calls
    of one ReLU module form one partition with two outputs, and the x86 recipe raises "Input partition has more than
    one output node". Here each node whose (module, op) pair occurs more than once gets a ``source_fn_stack`` entry
    of its own, naming the module's class, which is how a module called once is partitioned.
    """
    groups: dict[tuple[str, Any], list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack") is not None:
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        fqn, cls = list(stack.values())[-1]
        groups.setdefault((fqn, node.target), []).append(node)
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        for node in nodes:
            cls = list(node.meta["nn_module_stack"].values())[-1][1]
            cls = pydoc.locate(cls) if isinstance(cls, str) else cls
            if isinstance(cls, type):
                node.meta["source_fn_stack"] = [(node.name, cls)]
    return gm


def _x86_qat_quantizer() -> X86InductorQuantizer:
    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))


def _annotation_edges(gm: torch.fx.GraphModule) -> set[str]:
    """Where an annotated graph asks for fake-quants, as ``"producer->consumer"`` tensor edges (an output spec
    quantizes every edge leaving its node)."""
    edges = set()
    for node in gm.graph.nodes:
        ann = node.meta.get(_ANNOTATION)
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
    _x86_qat_quantizer().annotate(gm)
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
        return n.meta.get(_SOURCE, n.name)

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
    return isinstance(mod, (_AOFakeQuantizeBase, torch.ao.quantization.FakeQuantizeBase))


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
    weighted = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target in _WEIGHTED_OPS]
    unquantized = [n.name for n in weighted if not _weight_fq_node(n, prepared)]
    if unquantized:
        problems.append(f"Conv/Linear calls without an elastic weight fake-quant: {unquantized[:8]}")
    if problems:
        raise PlacementError("elastic fake-quants are not where torchao's x86 QAT recipe puts its own: "
                             + "; ".join(problems) + ". Prepare the exported model with "
                             "prepare_qat_pt2e(model, eqnet_plugin.frontends.pt2e.ElasticQuantizer(space)) and no other "
                             "quantizer.")


# --- the quantizer ---------------------------------------------------------------------------------------------
class ElasticQuantizer(Quantizer):
    """torchao `Quantizer` inserting `ElasticPT2EFakeQuantize` modules where torchao's x86 QAT recipe puts its
    fake-quants: Conv/Linear inputs and weights, Conv(-BN)(-ReLU)(-add) outputs, and the int8-in-int8-out ops
    (pools, cat, flatten) it propagates to. Attention's matmuls (``scaled_dot_product_attention``), embeddings and
    LayerNorm stay float, as in that recipe.

    Args:
        space: the elastic space (default: bits 2..8, both symmetries, both weight granularities).

    Example:
        >>> gm = prepare_qat_pt2e(torch.export.export(model, ex).module(), ElasticQuantizer())  # doctest: +SKIP

    `annotate` also turns BatchNorm and dropout calls into `nn.BatchNorm*d` / `nn.Dropout` module calls (after the
    x86 annotation, keeping it), so torchao does not fold BatchNorm into the quantized conv weight; see the module
    docstring.
    """

    def __init__(self, space: ElasticSpace | None = None) -> None:
        super().__init__()
        space = space if space is not None else ElasticSpace()
        if not isinstance(space, ElasticSpace):
            raise TypeError(f"space must be an ElasticSpace, got {type(space).__name__}")
        self.space = space
        self._act_spec = QuantizationSpec(
            dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine, is_dynamic=False,
            observer_or_fake_quant_ctr=ElasticPT2EFakeQuantize.with_args(is_weight=False, space=space))
        self._weight_spec = QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127,
            qscheme=torch.per_channel_symmetric if True in space.weight_per_channel else torch.per_tensor_symmetric,
            ch_axis=0, is_dynamic=False,
            observer_or_fake_quant_ctr=ElasticPT2EFakeQuantize.with_args(is_weight=True, space=space, ch_axis=0))

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """`split_reused_modules` (see the module docstring)."""
        return split_reused_modules(model)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Annotate with torchao's x86 QAT recipe, make every learnable-range spec elastic, then swap BatchNorm and
        dropout calls for module calls (annotations follow the swapped nodes)."""
        _x86_qat_quantizer().annotate(model)
        for node in model.graph.nodes:
            ann = node.meta.get(_ANNOTATION)
            if ann is None:
                continue
            ann.input_qspec_map = {arg: self._elastic(spec) for arg, spec in ann.input_qspec_map.items()}
            ann.output_qspec = self._elastic(ann.output_qspec)
        swap_training_ops(model)
        return model

    def _elastic(self, spec: Any) -> Any:
        if not isinstance(spec, QuantizationSpec):
            return spec                              # None, shared, derived or fixed-range specs stay as they are
        if spec.is_dynamic:
            raise ValueError("the x86 QAT recipe asked for a dynamic spec; ElasticQuantizer is static only")
        return self._weight_spec if spec.dtype == torch.int8 else self._act_spec

    def validate(self, model: torch.fx.GraphModule) -> None:
        """Refuse a graph in which some Conv/Linear weight was not annotated (nothing to search for it)."""
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in _WEIGHTED_OPS:
                ann = node.meta.get(_ANNOTATION)
                w = node.args[1] if len(node.args) > 1 else None
                if ann is None or ann.input_qspec_map.get(w) is None:
                    raise PlacementError(f"{node.name} ({node.target}) got no weight quantizer from the x86 QAT "
                                         "recipe; exclude it from the model or report the pattern")


# --- BatchNorm / dropout as modules ----------------------------------------------------------------------------
class _TrainOnlySDPA(nn.Module):
    """``scaled_dot_product_attention`` whose dropout applies in training mode only (the exported graph bakes the
    training-time ``dropout_p`` in)."""

    def __init__(self, dropout_p: float, kwargs: dict) -> None:
        super().__init__()
        self.dropout_p = float(dropout_p)
        self.kwargs = dict(kwargs)

    def forward(self, q, k, v, attn_mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0, **self.kwargs)


def _free_name(gm: nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _replace_with_module(gm: torch.fx.GraphModule, node: torch.fx.Node, target: str, args: tuple,
                         remap: dict) -> torch.fx.Node:
    graph = gm.graph
    with graph.inserting_before(node):
        new = graph.call_module(target, args)
    new.meta = dict(node.meta)
    new.meta[_SOURCE] = node.meta.get(_SOURCE, node.name)
    node.replace_all_uses_with(new)
    remap[node] = new
    graph.erase_node(node)
    return new


def swap_training_ops(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Replace, in place, every ``aten.batch_norm`` call by a call of a real `nn.BatchNorm*d` module (holding the
    very same parameters and buffers, at the exported BatchNorm's path, so the state dict is unchanged), every
    ``aten.dropout`` by an `nn.Dropout` module and a training-time attention dropout by a module that applies it in
    training mode only. The ``num_batches_tracked`` increments of the exported graph are removed (the modules count).
    Quantization annotations referring to replaced nodes are updated.

    Returns:
        {replaced node name: module path}.

    Raises:
        RuntimeError: a BatchNorm whose parameters are not attributes of one submodule (cannot be re-homed).
    """
    remap: dict[torch.fx.Node, torch.fx.Node] = {}
    out: dict[str, str] = {}
    graph = gm.graph
    counters = [n for n in graph.nodes if n.op == "call_function" and n.target in (_aten.add_.Tensor,
                                                                                     _aten.add.Tensor)
                and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"
                and str(n.args[0].target).endswith("num_batches_tracked")]
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.batch_norm.default:
            x, w, b, mean, var, training, momentum, eps = node.args[:8]
            attrs = [a for a in (w, b, mean, var) if a is not None]
            paths = {str(a.target).rpartition(".")[0] for a in attrs}
            if not attrs or len(paths) != 1 or any(a.op != "get_attr" for a in attrs):
                raise RuntimeError(f"BatchNorm {node.name}: its parameters are not attributes of one submodule; "
                                   "export the model with its nn.BatchNorm modules (strict=False is fine)")
            path = paths.pop()
            holder = gm.get_submodule(path)
            rank = x.meta["val"].dim() if "val" in x.meta else 4
            num = (holder.weight if w is not None else holder.running_mean).shape[0]
            bn = _BN_BY_RANK[rank](num, eps=eps, momentum=momentum, affine=w is not None,
                                   track_running_stats=mean is not None)
            for attr in ("weight", "bias"):
                if getattr(holder, attr, None) is not None:
                    setattr(bn, attr, getattr(holder, attr))
            for attr in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(holder, attr, None)
                if t is not None:
                    bn._buffers[attr] = t
            bn.train(bool(training))
            extra = set(dict(holder.named_parameters(recurse=False))) | set(dict(holder.named_buffers(recurse=False)))
            extra -= {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
            target = path if not extra and not list(holder.children()) else _free_name(gm, path + "_bn")
            if target == path:
                set_submodule(gm, path, bn)
            else:
                gm.add_module(target, bn)
            _replace_with_module(gm, node, target, (x,), remap)
            out[node.name] = target
        elif node.target is _aten.dropout.default:
            x, p, train = node.args[:3]
            target = _free_name(gm, node.name)
            gm.add_module(target, nn.Dropout(float(p)).train(bool(train)))
            _replace_with_module(gm, node, target, (x,), remap)
            out[node.name] = target
        elif node.target is _aten.scaled_dot_product_attention.default:
            args = list(node.args) + [None] * (5 - len(node.args))
            kwargs = dict(node.kwargs)
            p = kwargs.pop("dropout_p", args[4] if args[4] is not None else 0.0)
            if not p:
                continue
            if len(node.args) > 5:
                kwargs.update(zip(("is_causal", "scale", "enable_gqa"), node.args[5:]))
            target = _free_name(gm, node.name)
            gm.add_module(target, _TrainOnlySDPA(p, kwargs))
            _replace_with_module(gm, node, target, tuple(args[:4]), remap)
            out[node.name] = target
    for n in counters:
        if not n.users:
            graph.erase_node(n)
    if remap:
        _remap_annotations(gm, remap)
    graph.eliminate_dead_code()
    gm.recompile()
    return out


def _remap_annotations(gm: torch.fx.GraphModule, remap: dict) -> None:
    def node_of(n):
        return remap.get(n, n)

    def spec_of(spec):
        if isinstance(spec, SharedQuantizationSpec):
            e = spec.edge_or_node
            e = tuple(node_of(x) for x in e) if isinstance(e, tuple) else node_of(e)
            return SharedQuantizationSpec(e)
        if isinstance(spec, DerivedQuantizationSpec):
            return dc_replace(spec, derived_from=[tuple(node_of(x) for x in e) if isinstance(e, tuple) else
                                                  node_of(e) for e in spec.derived_from])
        return spec

    for node in gm.graph.nodes:
        ann = node.meta.get(_ANNOTATION)
        if ann is not None:
            ann.input_qspec_map = {node_of(a): spec_of(s) for a, s in ann.input_qspec_map.items()}
            ann.output_qspec = spec_of(ann.output_qspec)


_ = FixedQParamsQuantizationSpec   # fixed-range specs pass through ElasticQuantizer unchanged


# --- prepared models -------------------------------------------------------------------------------------------
def is_pt2e_prepared(model: nn.Module) -> bool:
    """Does `model` hold `ElasticPT2EFakeQuantize` modules (a graph prepared with `ElasticQuantizer`)?"""
    return any(isinstance(m, ElasticPT2EFakeQuantize) for m in model.modules())


def enable_train_eval(gm: nn.Module) -> nn.Module:
    """Let ``gm.train()`` / ``gm.eval()`` work again on a graph prepared with `ElasticQuantizer`, in place.

    torchao disables them on every prepared or converted graph, because an exported graph bakes BatchNorm's and
    dropout's mode in. `ElasticQuantizer` turned those into modules, so the ordinary methods are right here.
    """
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    return gm


def _weight_fq_node(node: torch.fx.Node, gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The elastic weight fake-quant node feeding a Conv/Linear call, when its input is a parameter."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.op == "call_module" and \
            isinstance(gm.get_submodule(w.target), ElasticFakeQuantize) and \
            isinstance(w.args[0], torch.fx.Node) and w.args[0].op == "get_attr":
        return w
    return None


def _use_exact_pools(gm: torch.fx.GraphModule) -> list[str]:
    """``aten.adaptive_avg_pool*d(x, 1)`` and ``aten.mean(x, [-1, -2], keepdim=True)`` calls become
    `exact_global_avg_pool` (see `eqnet_plugin.quant.exact_pool`), in place; fake-quant placement is unchanged."""
    pools = (_aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool2d.default, _aten.adaptive_avg_pool3d.default)
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in pools:
            size = node.args[1]
            size = size if isinstance(size, (list, tuple)) else [size]
            if all(s == 1 for s in size):
                node.target, node.args, node.kwargs = exact_global_avg_pool, (node.args[0],), {}
                out.append(node.name)
    if out:
        gm.recompile()
    return out


class PT2ESupernet(Supernet):
    """`Supernet` over a graph prepared with ``prepare_qat_pt2e(exported, ElasticQuantizer(space))``.

    Everything of `Supernet` applies (groups, `sample` / `uniform` / `activate`, `calibrate`, per-subnet BatchNorm
    statistics; `sandwich_step`, `evaluate`, checkpoints and WDR take it unchanged). PT2E specifics:

    * layers are the ``aten.conv*d`` / ``aten.linear`` calls whose weight passes through an elastic fake-quant;
      a layer's name is the path of the submodule holding its weight (``layer1.0.conv1``, as in the FX flow);
    * ``model.train()`` / ``model.eval()`` are enabled again (`enable_train_eval`);
    * global average pools are made exact, as in the FX flow;
    * conv weights are quantized unfolded (BatchNorm stays a module after the conv), so ``bn_fold`` must be
      "fixed" (the default): every subnet quantizes the same weight tensor, and BatchNorm's running statistics
      are updated by the widest (H) subnet only during `sandwich_step`;
    * `freeze` builds a `FrozenSubnet` (`freeze_pt2e`) and `to_reference` returns torchao's `convert_pt2e` graph.

    Args:
        model: the prepared GraphModule.
        space: the space to sample from (default: the quantizers' space).
        bn_fold: "fixed" only (see above).

    Raises:
        TypeError: `model` was not prepared with `ElasticQuantizer`.
        ValueError: ``bn_fold="running"`` (PT2E never folds BatchNorm into quantized weights here).
    """

    def __init__(self, model: torch.fx.GraphModule, space: ElasticSpace | None = None, bn_fold: str = "fixed"
                 ) -> None:
        if not isinstance(model, torch.fx.GraphModule) or not is_pt2e_prepared(model):
            raise TypeError("PT2ESupernet needs the GraphModule returned by prepare_qat_pt2e(torch.export.export("
                            "model, example_inputs).module(), eqnet_plugin.frontends.pt2e.ElasticQuantizer(space))")
        if bn_fold != "fixed":
            raise ValueError(f"bn_fold={bn_fold!r}: the PT2E flow quantizes unfolded conv weights (BatchNorm is a "
                             "module after the conv), which is what 'fixed' guarantees; use bn_fold='fixed'")
        enable_train_eval(model)
        pools = _use_exact_pools(model)
        super().__init__(model, space, bn_fold)
        self.exact_pools = pools
        self._find_layers()

    def _find_layers(self) -> None:
        model = self.model
        named = list(model.named_modules(remove_duplicate=False))
        modules = dict(named)
        name_of: dict[int, str] = {}
        for n, m in named:
            if isinstance(m, ElasticFakeQuantize):
                name_of.setdefault(id(m), n)
        layers: list[Layer] = []
        self._layer_nodes: dict[str, str] = {}
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in _WEIGHTED_OPS:
                continue
            wfq = _weight_fq_node(node, model)
            if wfq is None:
                raise ValueError(f"{node.name} ({node.target}) has no elastic weight fake-quant: prepare the model "
                                 "with eqnet_plugin.frontends.pt2e.ElasticQuantizer (eqnet_plugin.frontends.pt2e.prepare_qat checks it)")
            fq = modules[wfq.target]
            param = str(wfq.args[0].target)
            name = param.rpartition(".")[0] or param
            if name in self._layer_nodes:
                name = f"{name}@{node.name}"             # one weight used by several calls
            fq.materialize(_attr(model, param).shape[0])
            layers.append(Layer(name, _WEIGHTED_OPS[node.target], name_of[id(fq)],
                                self._input_group(node, modules, name_of)))
            self._layer_nodes[name] = node.name
        output_groups = set()
        for node in model.graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target), ElasticFakeQuantize) and \
                    any(u.op == "output" for u in node.users):
                output_groups.add(name_of[id(modules[node.target])])
        self._set_groups(self.groups, layers, [g for g, fq in self.groups.items() if not fq.is_weight],
                         output_groups)

    @torch.no_grad()
    def layer_io(self, example_inputs) -> dict[str, dict]:
        """`Supernet.layer_io` on the graph: the layers are ``aten.conv*d`` / ``aten.linear`` calls, not modules, so
        one eval-mode forward with fake quantization off runs through a `torch.fx.Interpreter` that records each
        layer call's input and output (`_LayerIORecorder`). ``weight`` is the parameter the layer's weight
        fake-quant reads; ``has_bias``: the call has a bias or its output feeds a BatchNorm module (folded into a
        bias at deployment, as the FX flow's Conv-BN modules). The model's training flag, the quantizers' flags
        and the BatchNorm statistics are left unchanged."""
        gm = self.model
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        nodes = {n.name: n for n in gm.graph.nodes}
        by_node = {node_name: name for name, node_name in self._layer_nodes.items()}
        recorder = _LayerIORecorder(gm, by_node)
        with self._float_eval_forward() as run:
            run(recorder.run, inputs)
        modules = dict(gm.named_modules(remove_duplicate=False))
        out: dict[str, dict] = {}
        for lay in self.layers:
            if lay.name not in recorder.seen:
                continue
            node = nodes[self._layer_nodes[lay.name]]
            x, y = recorder.seen[lay.name]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bn = any(u.op == "call_module" and isinstance(modules.get(u.target), nn.modules.batchnorm._BatchNorm)
                     for u in node.users)
            weight = _attr(gm, str(_weight_fq_node(node, gm).args[0].target))
            out[lay.name] = {"input": x, "output": y, "weight": weight,
                             "op": "linear" if lay.kind == "Linear" else "conv", "has_bias": bias is not None or bn}
        return out

    def freeze(self, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None) -> FrozenSubnet:
        """`freeze_pt2e(self, cfg, bn_batches)`: the export IR of one subnet (default: the active one)."""
        return freeze_pt2e(self, cfg, bn_batches)

    def to_reference(self, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None
                     ) -> torch.fx.GraphModule:
        """torchao's `convert_pt2e` of one subnet (default: the active one): its standard Q/DQ graph, computing
        the supernet's eval output under ``activate(cfg)`` (`convert_subnet`). The supernet is unchanged.

        Args:
            bn_batches: training batches to re-estimate the subnet's BatchNorm statistics on first (needed once
                the model has been trained, unless they were estimated already).
        """
        return convert_subnet(self, cfg, bn_batches)


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


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    mod, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(mod) if mod else root, attr)


def convert_subnet(supernet: PT2ESupernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None
                   ) -> torch.fx.GraphModule:
    """``convert_pt2e`` of a deep copy of the prepared model in eval mode with subnet `cfg` active (default: the
    active one): torchao's standard quantized graph (quantize / dequantize ops around the quantized tensors, with
    each cell's integer range, so sub-8-bit grids are kept). Its outputs equal the supernet's eval output.

    Raises:
        RuntimeError: the supernet is not calibrated.
        BatchNormStatsError: the subnet's BatchNorm statistics are unknown (pass `bn_batches`).
    """
    supernet.require_calibrated("convert")
    with supernet.activate(cfg if cfg is not None else supernet.current_config()) as c:
        if bn_batches is not None:
            supernet.recalibrate_bn(bn_batches)
        supernet.require_bn_stats(c, "convert")
        was_training = supernet.model.training
        supernet.model.eval()
        try:
            gm = copy.deepcopy(supernet.model)
        finally:
            supernet.model.train(was_training)
    for m in gm.modules():
        if isinstance(m, ElasticFakeQuantize):
            m.enable_observer(False)
    return convert_pt2e(gm)


# --- freeze ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def freeze_pt2e(supernet: PT2ESupernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None
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
        node = nodes[supernet._layer_nodes[lay.name]]
        wfq = node.args[1]
        w = _attr(gm, str(wfq.args[0].target)).detach()
        args = list(node.args)
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        b = _attr(gm, str(bias.target)).detach() if isinstance(bias, torch.fx.Node) else None
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
        target = _free_name(gm, "frozen_" + lay.name) if "@" in lay.name else lay.name
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
        if node.op != "call_function" or node.target is not _aten.sym_size.int:
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


# --- one call --------------------------------------------------------------------------------------------------
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
        the prepared GraphModule (train()/eval() enabled); build the supernet with ``PT2ESupernet(gm)``.

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
