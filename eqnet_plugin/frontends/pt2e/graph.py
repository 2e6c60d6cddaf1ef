"""Graph surgery on exported and PT2E-prepared graphs: BatchNorm / dropout / attention dropout as modules
(`swap_training_ops`), ``train()`` / ``eval()`` re-enabled (`enable_train_eval`), exact global average pools
(`use_exact_pools`), and the small lookups the other modules share."""
from __future__ import annotations

from dataclasses import replace as dc_replace

import torch
from torch import nn

from ...export.ir import set_submodule
from ...quant.exact_pool import exact_global_avg_pool
from ...quant.fake_quant import ElasticFakeQuantize
from ._torchao import DerivedQuantizationSpec, SharedQuantizationSpec

__all__ = ["swap_training_ops", "enable_train_eval", "use_exact_pools", "weight_fq_node", "attr_value",
           "free_name", "ANNOTATION", "SOURCE", "WEIGHTED_OPS", "aten"]

ANNOTATION = "quantization_annotation"
SOURCE = "eqnet_pt2e_source"           # node.meta key: the exported node a swapped module call replaced
aten = torch.ops.aten
WEIGHTED_OPS = {aten.conv1d.default: "Conv1d", aten.conv2d.default: "Conv2d", aten.conv3d.default: "Conv3d",
                aten.linear.default: "Linear"}
_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


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


def free_name(gm: nn.Module, base: str) -> str:
    """`base` with dots as underscores, numbered if `gm` already has an attribute of that name."""
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
    new.meta[SOURCE] = node.meta.get(SOURCE, node.name)
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
    counters = [n for n in graph.nodes if n.op == "call_function" and n.target in (aten.add_.Tensor,
                                                                                     aten.add.Tensor)
                and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"
                and str(n.args[0].target).endswith("num_batches_tracked")]
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.batch_norm.default:
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
            target = path if not extra and not list(holder.children()) else free_name(gm, path + "_bn")
            if target == path:
                set_submodule(gm, path, bn)
            else:
                gm.add_module(target, bn)
            _replace_with_module(gm, node, target, (x,), remap)
            out[node.name] = target
        elif node.target is aten.dropout.default:
            x, p, train = node.args[:3]
            target = free_name(gm, node.name)
            gm.add_module(target, nn.Dropout(float(p)).train(bool(train)))
            _replace_with_module(gm, node, target, (x,), remap)
            out[node.name] = target
        elif node.target is aten.scaled_dot_product_attention.default:
            args = list(node.args) + [None] * (5 - len(node.args))
            kwargs = dict(node.kwargs)
            p = kwargs.pop("dropout_p", args[4] if args[4] is not None else 0.0)
            if not p:
                continue
            if len(node.args) > 5:
                kwargs.update(zip(("is_causal", "scale", "enable_gqa"), node.args[5:]))
            target = free_name(gm, node.name)
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
        ann = node.meta.get(ANNOTATION)
        if ann is not None:
            ann.input_qspec_map = {node_of(a): spec_of(s) for a, s in ann.input_qspec_map.items()}
            ann.output_qspec = spec_of(ann.output_qspec)


def enable_train_eval(gm: nn.Module) -> nn.Module:
    """Let ``gm.train()`` / ``gm.eval()`` work again on a graph prepared with `ElasticQuantizer`, in place.

    torchao disables them on every prepared or converted graph, because an exported graph bakes BatchNorm's and
    dropout's mode in. `ElasticQuantizer` turned those into modules, so the ordinary methods are right here.
    """
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    return gm


def weight_fq_node(node: torch.fx.Node, gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The elastic weight fake-quant node feeding a Conv/Linear call, when its input is a parameter."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.op == "call_module" and \
            isinstance(gm.get_submodule(w.target), ElasticFakeQuantize) and \
            isinstance(w.args[0], torch.fx.Node) and w.args[0].op == "get_attr":
        return w
    return None


def use_exact_pools(gm: torch.fx.GraphModule) -> list[str]:
    """``aten.adaptive_avg_pool*d(x, 1)`` and ``aten.mean(x, [-1, -2], keepdim=True)`` calls become
    `exact_global_avg_pool` (see `eqnet_plugin.quant.exact_pool`), in place; fake-quant placement is unchanged."""
    pools = (aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default)
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


def attr_value(root: nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer at dotted path `target` of `root`."""
    mod, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(mod) if mod else root, attr)
