"""`ElasticQuantizer`, the torchao `Quantizer` that puts `ElasticPT2EFakeQuantize` modules where torchao's x86 QAT
recipe puts its own fake-quants.

Placement is torchao's x86 QAT recipe (`X86InductorQuantizer` with its QAT config): the quantizer runs that
recipe's own annotation and swaps every learnable-range spec for an elastic one, so fake-quants land exactly where
the x86 recipe puts its own (`check_placement` verifies it on the prepared graph). Differences, all deliberate
(docs/pt2e.md): BatchNorm and dropout become real `nn.BatchNorm*d` / `nn.Dropout` modules before torchao's QAT
Conv-BN fusion (`swap_training_ops`), so conv weights are quantized *unfolded* (the official EQ-Net layout: every
subnet quantizes the same weight tensor, whatever BatchNorm statistics a subnet re-estimates) and
``model.train()`` / ``model.eval()`` switch them.

torchao 0.18's x86 recipe fails on a ReLU module called twice (torchvision's BasicBlock): it groups both calls
into one source partition ("Input partition has more than one output node"). `split_reused_modules` (run by
`ElasticQuantizer.transform_for_annotation` and by the reference annotation of `check_placement`) gives each call
of a reused single-op module its own partition.
"""
from __future__ import annotations

import pydoc
from typing import Any

import torch

from ...quant.fake_quant import ElasticFakeQuantize
from ...quant.space import ElasticSpace
from ..base import PlacementError
from ._torchao import (AOFakeQuantizeBase, FixedQParamsQuantizationSpec, QuantizationSpec, Quantizer,
                       X86InductorQuantizer, ao_with_args, get_default_x86_inductor_quantization_config)
from .graph import ANNOTATION, WEIGHTED_OPS, swap_training_ops

__all__ = ["ElasticPT2EFakeQuantize", "ElasticQuantizer", "split_reused_modules", "x86_qat_quantizer"]


class ElasticPT2EFakeQuantize(ElasticFakeQuantize, AOFakeQuantizeBase):
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

    with_args = classmethod(ao_with_args)

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


def x86_qat_quantizer() -> X86InductorQuantizer:
    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))


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
        x86_qat_quantizer().annotate(model)
        for node in model.graph.nodes:
            ann = node.meta.get(ANNOTATION)
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
            if node.op == "call_function" and node.target in WEIGHTED_OPS:
                ann = node.meta.get(ANNOTATION)
                w = node.args[1] if len(node.args) > 1 else None
                if ann is None or ann.input_qspec_map.get(w) is None:
                    raise PlacementError(f"{node.name} ({node.target}) got no weight quantizer from the x86 QAT "
                                         "recipe; exclude it from the model or report the pattern")


_ = FixedQParamsQuantizationSpec   # fixed-range specs pass through ElasticQuantizer unchanged
