"""The FX frontend: the seam to torch.ao FX graph mode quantization, the only module that uses torch.ao's graph API.
`FXFrontend` (`eqnet_plugin.frontends.fx_graph`) is what `Supernet` uses of such a graph.

Entry points (the same pair as the PT2E frontend's, `eqnet_plugin.frontends.pt2e`):

* `prepare_qat(model, example_inputs, space)`: prepare + the placement postcondition, with a clear error for
  models FX cannot trace (`TraceError`).
* `check_placement(model, prepared, example_inputs)`: raise `eqnet_plugin.frontends.base.PlacementError` unless
  the fake-quants sit where torch.ao's own default x86 QAT mapping puts them.

The pieces:

* `elastic_qconfig_mapping(space)`: torch.ao's default x86 QAT mapping with every learnable-range fake-quant
  replaced by `ElasticFakeQuantize`; works with a plain `prepare_qat_fx(model, mapping, example_inputs)`.
* `elastic_backend_config()`: the native backend config plus Conv(-BN)-ReLU6 patterns, so MobileNet-style models get
  one quantizer after ReLU6 instead of one observing both sides of it.
* `fake_quant_placement`: where fake-quants sit.
* `convert_reference(gm)`: the decomposed reference conversion, the one that keeps sub-8-bit ranges.

torch.ao FX is deprecated upstream (torchao PT2E is the successor); its DeprecationWarnings are filtered in the test
configuration, not here.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
import torch.ao.nn.qat as nnqat
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.backend_config import (BackendConfig, BackendPatternConfig, DTypeConfig,
                                                  ObservationType, get_native_backend_config)
from torch.ao.quantization.fake_quantize import FakeQuantizeBase, FusedMovingAvgObsFakeQuantize
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx, prepare_qat_fx

from ..quant.bn_fold import export_weight, torch_classes
from ..quant.fake_quant import ElasticFakeQuantize
from ..quant.space import ElasticSpace
from .base import PlacementError

__all__ = ["elastic_qconfig_mapping", "elastic_backend_config", "prepare_qat", "fake_quant_placement",
           "check_placement", "convert_reference", "PlacementError", "TraceError"]

WEIGHTED_QAT_TYPES = (nnqat.Conv1d, nnqat.Conv2d, nnqat.Conv3d, nnqat.Linear)  # nniqat fused types subclass these
FLOAT_WEIGHTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class TraceError(RuntimeError):
    """torch.fx could not trace the model."""


def _elastic_qconfig(space: ElasticSpace, weight_per_tensor_only: bool = False) -> QConfig:
    wspace = space
    if weight_per_tensor_only:
        from dataclasses import replace
        wspace = replace(space, weight_per_channel=(False,))
    return QConfig(activation=ElasticFakeQuantize.with_args(is_weight=False, space=space),
                   weight=ElasticFakeQuantize.with_args(is_weight=True, space=wspace, ch_axis=0))


def elastic_qconfig_mapping(space: ElasticSpace | None = None) -> QConfigMapping:
    """A QConfigMapping for `prepare_qat_fx` that inserts `ElasticFakeQuantize` modules.

    It is torch.ao's `get_default_qat_qconfig_mapping("x86")` with every moving-average fake-quant (activations and
    weights) replaced by an elastic one, so the fake-quants land where torch.ao's own would. Fixed-range ops
    (sigmoid, tanh, softmax, hardsigmoid) keep torch.ao's fixed 8-bit quantizers, and shape ops keep sharing their
    input's quantizer. Activations use dtype quint8 (the default backend config drops qint8 activations); signed
    activations are represented on that grid with a zero point of 2^(b-1).

    Args:
        space: the elastic space (default: bits 2..8, both symmetries, both weight granularities).

    Example:
        >>> from torch.ao.quantization.quantize_fx import prepare_qat_fx
        >>> gm = prepare_qat_fx(model, elastic_qconfig_mapping(), example_inputs)  # doctest: +SKIP
    """
    space = space if space is not None else ElasticSpace()
    if not isinstance(space, ElasticSpace):
        raise TypeError(f"space must be an ElasticSpace, got {type(space).__name__}")
    default = get_default_qat_qconfig_mapping("x86")
    elastic = _elastic_qconfig(space)
    mapping = QConfigMapping().set_global(elastic)
    for obj, qc in default.object_type_qconfigs.items():
        mapping.set_object_type(obj, _translate(qc, space, elastic, obj))
    return mapping


def _is_learnable_range(ctor: Any) -> bool:
    """Is this qconfig constructor one of the moving-average fake-quants that our elastic one replaces?"""
    func = getattr(ctor, "p", ctor)
    func = getattr(func, "func", func)
    return isinstance(func, type) and func.__name__ in ("FusedMovingAvgObsFakeQuantize", "FakeQuantize")


def _translate(qc: QConfig | None, space: ElasticSpace, elastic: QConfig, obj: Any) -> QConfig | None:
    if qc is None:
        return None
    act = elastic.activation if _is_learnable_range(qc.activation) else qc.activation
    weight = qc.weight
    if _is_learnable_range(qc.weight):
        # Transposed convolutions keep per-tensor weights, as in torch.ao's mapping (their channel axis is 1).
        transposed = obj in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d) or \
            getattr(obj, "__name__", "").startswith("conv_transpose")
        weight = _elastic_qconfig(space, weight_per_tensor_only=transposed).weight
    return QConfig(activation=act, weight=weight)


def elastic_backend_config() -> BackendConfig:
    """torch.ao's native backend config plus Conv(-BN)-ReLU6/Hardtanh patterns.

    Without them MobileNetV2's ReLU6 is not fused, and one fake-quant observes the tensor on both sides of ReLU6.
    With them the conv output is quantized once, after the ReLU6 (as for ReLU). Pass it to `prepare_qat_fx` and to
    `prepare_qat`; the reference conversion stays exact.
    """
    bc = get_native_backend_config()
    dtype_configs = [DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8, weight_dtype=torch.qint8,
                                 bias_dtype=torch.float)]
    obs = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
    for conv in (nniqat.ConvBn2d, nnqat.Conv2d, nni.ConvBn2d, nn.Conv2d):
        for act in (nn.ReLU6, F.relu6, nn.Hardtanh, F.hardtanh):
            bc.set_backend_pattern_config(
                BackendPatternConfig((conv, act)).set_observation_type(obs).set_dtype_configs(dtype_configs))
    return bc


# --- placement ------------------------------------------------------------------------------------------------
def fake_quant_placement(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """Where fake-quants sit in a prepared graph.

    Returns:
        {"activations": sorted names of the nodes whose outputs a fake-quant observes,
         "weights": sorted names of the modules holding a ``weight_fake_quant``}
    """
    acts = []
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantizeBase):
            acts.append(node.args[0].name if isinstance(node.args[0], torch.fx.Node) else str(node.args[0]))
    weights = [name for name, m in modules.items() if isinstance(getattr(m, "weight_fake_quant", None),
                                                                    FakeQuantizeBase)]
    return {"activations": sorted(acts), "weights": sorted(set(weights))}


def check_placement(model: nn.Module, prepared: torch.fx.GraphModule, example_inputs: tuple,
                    prepare_custom_config: Any = None) -> None:
    """Raise `PlacementError` unless `prepared` has fake-quants exactly where torch.ao's default x86 QAT mapping
    would put them on `model`, and all of them are elastic (where the default's are learnable-range ones)."""
    ref = _prepare(copy.deepcopy(model), get_default_qat_qconfig_mapping("x86"), example_inputs,
                   prepare_custom_config, None)
    want, got = fake_quant_placement(ref), fake_quant_placement(prepared)
    problems = []
    for kind in ("activations", "weights"):
        missing = sorted(set(want[kind]) - set(got[kind]))
        extra = sorted(set(got[kind]) - set(want[kind]))
        if missing:
            problems.append(f"{kind} without an elastic fake-quant: {missing[:8]}")
        if extra:
            problems.append(f"unexpected {kind} fake-quants: {extra[:8]}")
        if len(want[kind]) != len(got[kind]) and not (missing or extra):
            problems.append(f"{kind}: {len(got[kind])} fake-quants where torch.ao places {len(want[kind])}")
    if problems:
        raise PlacementError(
            "elastic fake-quants are not where torch.ao's default QAT mapping puts its own: " + "; ".join(problems)
            + ". A backend_config that rejects the elastic dtypes drops qconfigs silently: prepare without "
            "backend_config, or with elastic_backend_config().")


def _prepare(model, mapping, example_inputs, prepare_custom_config, backend_config):
    model = model.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
            return prepare_qat_fx(model, mapping, example_inputs, prepare_custom_config=prepare_custom_config,
                                  backend_config=backend_config)
    except (torch.fx.proxy.TraceError, NotImplementedError, TypeError, RuntimeError, AttributeError) as e:
        if isinstance(e, (TypeError, RuntimeError, AttributeError)) and "Proxy" not in str(e) \
                and "symbolically traced" not in str(e) and "trace" not in str(e).lower():
            raise
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {e}. Make the model traceable: mark the "
            "untraceable submodules with prepare_custom_config={'non_traceable_module_name': [...]} or "
            "{'non_traceable_module_class': [...]}, or fix data-dependent control flow by passing "
            "concrete_args / moving it out of forward (see torch.fx 'Limitations of Symbolic Tracing').") from e


def prepare_qat(model: nn.Module, example_inputs: tuple, space: ElasticSpace | None = None,
                backend_config: BackendConfig | None = None, prepare_custom_config: Any = None,
                check: bool = True) -> torch.fx.GraphModule:
    """`prepare_qat_fx` with the elastic mapping, a clear error for untraceable models, and (with no
    backend_config) the placement postcondition checked against torch.ao's default mapping.

    The input model is not modified (it is deep-copied first).

    Raises:
        TraceError: FX could not trace the model (the message says how to make it traceable).
        PlacementError: a fake-quant was dropped or added relative to torch.ao's default QAT mapping.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors, e.g. (torch.randn(1, 3, 32, 32),)")
    gm = _prepare(copy.deepcopy(model), elastic_qconfig_mapping(space), example_inputs, prepare_custom_config,
                  backend_config)
    if check and backend_config is None:
        check_placement(model, gm, example_inputs, prepare_custom_config)
    return gm


def convert_reference(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Decomposed reference conversion (keeps sub-8-bit ranges) of the active subnet. Converts a deep copy;
    observers are disabled.

    torch.ao folds BatchNorm into the converted conv weights with the running variance and re-quantizes them,
    while the supernet's Conv-BN modules quantize a weight folded with a fixed statistic (`eqnet_plugin.quant.bn_fold`).
    So every converted Conv-BN weight is replaced by the trained integer weights on the export grid of
    `bn_fold.fold_to_export` (per-channel scales ``s * r``), with torch.ao's reference weight qparams set to match:
    the reference integer weights are the trained ones, and the model computes the supernet's eval output.
    """
    gm = copy.deepcopy(gm)
    for m in gm.modules():
        if isinstance(m, FakeQuantizeBase):
            m.disable_observer()
    gm.eval()
    exported = {name: _export_weight(m) for name, m in gm.named_modules() if isinstance(m, _ConvBnNd)}
    with warnings.catch_warnings(), torch_classes(gm):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        ref = _convert_to_reference_decomposed_fx(gm)
    for name, (w, scale, zp, per_channel) in exported.items():
        conv = ref.get_submodule(name)
        conv = conv[0] if isinstance(conv, nni._FusedModule) else conv                  # ConvReLU: (conv, relu)
        if getattr(conv, "weight", None) is None or conv.weight.shape != w.shape \
                or not hasattr(conv, "weight_scale"):
            raise RuntimeError(f"reference conversion changed layer {name!r} unexpectedly ({type(conv).__name__}); "
                               "please report this with the torch version")
        with torch.no_grad():
            conv.weight.copy_(w)
        dev = conv.weight.device
        conv.weight_scale = scale.to(dev)
        conv.weight_zero_point = zp.to(dev)
        if per_channel:
            conv.weight_qscheme = torch.per_channel_affine
            conv.weight_axis = torch.tensor(0, dtype=torch.int, device=dev)
            conv.weight_axis_int = 0
    return ref


def _export_weight(m: "_ConvBnNd") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(weight on the export grid, scale, zero point, per_channel) of a QAT Conv-BN module's active cell."""
    fq = m.weight_fake_quant
    scale, zp = fq.calculate_qparams()
    w, scale, zp, _, per_channel = export_weight(m, scale, zp, fq.quant_min, fq.quant_max, fq.cell[2])
    return w.detach().clone(), scale.detach().clone(), zp.to(torch.int32).clone(), per_channel


def unprepared_layers(gm: torch.fx.GraphModule) -> list[str]:
    """Conv/Linear modules left in float (their qconfig was dropped): the Supernet postcondition."""
    return [n for n, m in gm.named_modules() if isinstance(m, FLOAT_WEIGHTED_TYPES)
            and not isinstance(m, WEIGHTED_QAT_TYPES) and not hasattr(m, "weight_fake_quant")]


__all__ += ["unprepared_layers", "WEIGHTED_QAT_TYPES"]
_ = FusedMovingAvgObsFakeQuantize  # referenced in docs: the fake-quant replaced by the elastic one
