"""`Supernet`: a view over a prepared GraphModule that enumerates quantizer groups and layers and switches subnets.

The model stays the user's GraphModule (train it, wrap it in DDP, save its state_dict as usual); the Supernet only
holds references to its `ElasticFakeQuantize` modules and knows the graph around them.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from .quant.bn_fold import use_fixed_bn_fold
from .quant.exact_pool import use_exact_global_pools
from .quant.fake_quant import ElasticFakeQuantize
from .frontends.fx import convert_reference, unprepared_layers
from .quant.space import ElasticSpace, QuantChoice, SubnetConfig

__all__ = ["Supernet", "Layer", "batch_inputs", "BatchNormStatsError"]

_SHAPE_WALK_LIMIT = 16   # how many non-quantizer nodes to walk back from a layer to find its input quantizer
_BN_CACHE_SIZE = 64      # subnets whose re-estimated BatchNorm statistics are kept (least recently used dropped)


class BatchNormStatsError(RuntimeError):
    """The BatchNorm statistics in the model are not the requested subnet's (re-estimate them first)."""


@dataclass(frozen=True)
class Layer:
    """A weighted layer: its module name and type, and the names of its weight and input-activation groups
    (`input` is None when no activation quantizer feeds it)."""

    name: str
    kind: str
    weight: str
    input: str | None


def batch_inputs(batch) -> torch.Tensor:
    """The input tensor of a batch that is either a tensor or an (inputs, targets, ...) tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a batch must be a tensor or an (inputs, targets) tuple, got {type(batch).__name__}")


class _BnTracker:
    """The Supernet's forward pre-hook on its model. Holds the Supernet weakly; copies (deepcopy, pickle) of the
    model carry an inert tracker, so frozen and converted copies never report to the original."""

    def __init__(self, supernet: "Supernet") -> None:
        self._ref = weakref.ref(supernet)

    def __call__(self, module, args):
        sn = self._ref() if self._ref is not None else None
        if sn is not None:
            sn._on_forward(module, args)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._ref = None


class _Activation:
    """What `Supernet.activate` returns: a context manager that switches to a subnet for its block."""

    def __init__(self, supernet: "Supernet", cfg: SubnetConfig) -> None:
        self._sn, self.cfg, self._state, self._entered = supernet, cfg, None, False

    def __enter__(self) -> SubnetConfig:
        self._entered = True
        self._state = self._sn._enter(self.cfg)
        return self.cfg

    def __exit__(self, *exc) -> None:
        state, self._state = self._state, None
        self._sn._exit(self.cfg, state)

    def __del__(self) -> None:
        if not self._entered:
            warnings.warn("Supernet.activate(cfg) switched nothing: use it as `with sn.activate(cfg): ...`, or "
                          "call sn.apply(cfg) to switch for good", stacklevel=2)


def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


class Supernet:
    """View over a GraphModule prepared with `elastic_qconfig_mapping`.

    Args:
        model: the output of `prepare_qat_fx(model, elastic_qconfig_mapping(space), example_inputs)`.
        space: the space to sample from (default: the space the quantizers were built with). It must be covered by
            the quantizers' cells.
        bn_fold: "fixed" (default): Conv-BN weights are folded with a fixed statistic, so every subnet quantizes
            the same weights in training, evaluation and export (`eqnet_plugin.quant.bn_fold`); "running": torch.ao's
            fold with the running variance (the first release's behaviour, kept for ablations).

    Attributes:
        groups: name -> ElasticFakeQuantize, one entry per distinct quantizer object (FX may reuse one for several
            nodes), weights and activations in graph order.
        layers: the weighted layers (`Layer`), in graph order.
        fixed_groups: groups kept at `space.fixed_bits`: the first and last layers' weight and input quantizers and
            the quantizers of the model outputs.
        exact_pools: the global average pools of `model` that were swapped (in place) for `ExactGlobalAvgPool`:
            torch.ao re-quantizes a pool's output on its input's grid, where exact rounding ties are frequent, and a
            float32 mean decides them by summation order; the exact pool gives the same codes on CPU, CUDA and in
            the exported ONNX (see `eqnet_plugin.quant.exact_pool`). Placement and parameters are unchanged.
        fixed_fold: the Conv-BN modules switched to the fixed fold (empty with ``bn_fold="running"``).

    BatchNorm statistics: training-mode forwards through `sandwich_step` update the running statistics with the
    widest (H) subnet only, so the model's own eval mode is right for the widest subnet. Every other subnet needs
    statistics of its own: `recalibrate_bn` (which `evaluate` calls) re-estimates them for the active subnet and
    remembers them, and `activate(cfg)` puts a remembered subnet's statistics in place (and restores the previous
    ones afterwards), so `evaluate`, `freeze`, `to_reference` and every exporter compute the same numbers.
    `freeze` / `to_reference` refuse a non-widest subnet whose statistics were never estimated since the last
    training step (`BatchNormStatsError`, naming the fix). Eval-mode forwards of such a subnet warn once.

    Example:
        >>> sn = Supernet(gm)                                  # doctest: +SKIP
        >>> sn.calibrate(batches)                              # doctest: +SKIP
        >>> with sn.activate(sn.uniform(4, 4)):                # doctest: +SKIP
        ...     logits = gm(x)
    """

    def __new__(cls, model=None, *args, **kwargs):
        # A graph prepared by torchao's PT2E flow (eqnet_plugin.frontends.pt2e.ElasticQuantizer) gets the PT2E subclass.
        if cls is Supernet and isinstance(model, nn.Module) and any(
                type(m).__name__ == "ElasticPT2EFakeQuantize" for m in model.modules()):
            from .frontends.pt2e import PT2ESupernet
            cls = PT2ESupernet
        return super().__new__(cls)

    def __init__(self, model: torch.fx.GraphModule, space: ElasticSpace | None = None, bn_fold: str = "fixed"
                 ) -> None:
        if not isinstance(model, torch.fx.GraphModule):
            raise TypeError(f"Supernet needs the GraphModule returned by prepare_qat_fx, got {type(model).__name__}; "
                            "call prepare_qat_fx(model, eqnet_plugin.elastic_qconfig_mapping(), example_inputs) first")
        self.model = model
        named = list(model.named_modules(remove_duplicate=False))
        fqs = [(n, m) for n, m in named if isinstance(m, ElasticFakeQuantize)]
        if not fqs:
            raise ValueError("the model holds no ElasticFakeQuantize: prepare it with "
                             "prepare_qat_fx(model, eqnet_plugin.elastic_qconfig_mapping(), example_inputs)")
        left = unprepared_layers(model)
        if left:
            raise ValueError(f"layers {left[:6]} were not prepared for QAT (their qconfig was dropped, e.g. by a "
                             "backend_config that rejects the elastic dtypes): prepare without backend_config or "
                             "with elastic_backend_config()")
        self.space = space if space is not None else fqs[0][1].space
        if not isinstance(self.space, ElasticSpace):
            raise TypeError(f"space must be an ElasticSpace, got {type(self.space).__name__}")
        if bn_fold not in ("fixed", "running"):
            raise ValueError(f"bn_fold={bn_fold!r}: use 'fixed' (default) or 'running' (torch.ao's fold)")
        self.bn_fold = bn_fold
        self.fixed_fold = use_fixed_bn_fold(model) if bn_fold == "fixed" else []
        self.bn_modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._bn_cache: OrderedDict[SubnetConfig, list[tuple[torch.Tensor, ...]]] = OrderedDict()
        self._bn_owner: SubnetConfig | None = None     # whose re-estimated statistics are in the BN buffers
        self._bn_trained = False                       # a training-mode forward happened since the model was built
        self._bn_warned = False
        self._recalibrating = False
        self._calibrated = False
        self._calib_warned = False
        self._hook = model.register_forward_pre_hook(_BnTracker(self))
        self.exact_pools = use_exact_global_pools(model)
        if self.exact_pools:
            named = list(model.named_modules(remove_duplicate=False))

        name_of: dict[int, str] = {}
        for n, m in fqs:
            name_of.setdefault(id(m), n)
        modules = dict(named)
        by_name = {name_of[id(m)]: m for _, m in fqs}

        # Graph walk: order of activation groups, layers and their inputs, output groups.
        act_order: list[str] = []
        layers: list[Layer] = []
        output_groups: set[str] = set()
        for node in model.graph.nodes:
            mod = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(mod, ElasticFakeQuantize):
                g = name_of[id(mod)]
                if g not in act_order:
                    act_order.append(g)
                if any(u.op == "output" for u in node.users):
                    output_groups.add(g)
            elif isinstance(getattr(mod, "weight_fake_quant", None), ElasticFakeQuantize):
                layers.append(Layer(node.target, type(mod).__name__, name_of[id(mod.weight_fake_quant)],
                                    self._input_group(node, modules, name_of)))
                mod.weight_fake_quant.materialize(mod.weight.shape[0])
        self._set_groups(by_name, layers, act_order, output_groups)

    def _set_groups(self, quantizers: Mapping[str, ElasticFakeQuantize], layers: list[Layer], act_order: list[str],
                    output_groups: set[str]) -> None:
        """Set `groups` (weights in layer order, then weight quantizers of modules not called in the graph (rare),
        then the activations in `act_order`), `layers`, the weight / activation group lists and the fixed groups
        (first and last layer, graph outputs), and check that the space covers them."""
        weight_order = [lay.weight for lay in layers]
        weight_order += [g for g, fq in quantizers.items() if fq.is_weight and g not in weight_order]
        self.groups: dict[str, ElasticFakeQuantize] = {g: quantizers[g] for g in weight_order + act_order}
        self.layers: list[Layer] = layers
        self.weight_groups = [g for g in self.groups if self.groups[g].is_weight]
        self.act_groups = [g for g in self.groups if not self.groups[g].is_weight]
        fixed: set[str] = set()
        if self.space.fixed_bits is not None and layers:
            for lay in (layers[0], layers[-1]):
                fixed.add(lay.weight)
                if lay.input is not None:
                    fixed.add(lay.input)
            fixed |= output_groups
        self.fixed_groups = frozenset(fixed)
        self._check_space_covered()

    @staticmethod
    def _input_group(node, modules, name_of) -> str | None:
        cur = node.args[0] if node.args else None
        for _ in range(_SHAPE_WALK_LIMIT):
            if not isinstance(cur, torch.fx.Node):
                return None
            mod = modules.get(cur.target) if cur.op == "call_module" else None
            if isinstance(mod, ElasticFakeQuantize):
                return name_of[id(mod)]
            cur = cur.args[0] if cur.args else None
        return None

    def _check_space_covered(self) -> None:
        for g, fq in self.groups.items():
            bits = self.space.weight_bits if fq.is_weight else self.space.act_bits
            syms = self.space.weight_symmetric if fq.is_weight else self.space.act_symmetric
            missing = [b for b in bits if b not in fq.bit_choices] + [s for s in syms if s not in fq.sym_choices]
            if fq.is_weight:
                missing += [p for p in self.space.weight_per_channel if p not in fq.pc_choices]
            if missing:
                raise ValueError(f"the Supernet space asks for {missing} that quantizer {g!r} was not built with; "
                                 "prepare the model with elastic_qconfig_mapping(space) for the same space")

    # --- BatchNorm statistics -------------------------------------------------------------------------------
    def _on_forward(self, module, args) -> None:
        """Forward pre-hook on the model: track what the BN buffers hold (Python only), and warn once about an
        uncalibrated supernet (one host sync, until calibrated)."""
        fqs = self.groups.values()
        if not self._calibrated and not self._calib_warned and not any(fq._observing for fq in fqs) \
                and any(fq._fq_on for fq in fqs):                 # quantizing (not calibrating, not shape probing)
            if not self.is_calibrated():
                self._calib_warned = True
                warnings.warn("this supernet is not calibrated: every quantizer scale is 1.0 and the outputs are "
                              "nearly constant; call sn.calibrate(batches) first", stacklevel=3)
        if self._recalibrating or not self.bn_modules:
            return
        if module.training:
            if self._bn_cache or self._bn_owner is not None or not self._bn_trained:
                self._bn_cache.clear()
                self._bn_owner = None
                self._bn_trained = True
        elif not self._bn_warned and self._bn_trained and self._bn_owner is None and not self._is_widest():
            self._bn_warned = True
            warnings.warn("this subnet runs with the BatchNorm statistics of the widest subnet (tracked during "
                          "training), not its own: re-estimate them with `with sn.activate(cfg): "
                          "sn.recalibrate_bn(train_batches)` (eqnet_plugin.evaluate does this)", stacklevel=3)

    def _is_widest(self) -> bool:
        return all(fq._bits == max(self._choices(g)[0]) for g, fq in self.groups.items())

    def _bn_snapshot(self) -> list[tuple[torch.Tensor, ...]]:
        return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                for m in self.bn_modules if m.running_mean is not None]

    @torch.no_grad()
    def _bn_restore(self, snap: list[tuple[torch.Tensor, ...]]) -> None:
        for m, (mean, var, n) in zip([m for m in self.bn_modules if m.running_mean is not None], snap):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)

    def bn_stats_ready(self, cfg: SubnetConfig | None = None) -> bool:
        """Do the BN buffers hold statistics right for `cfg` (default: the active subnet)? True when the model
        has no BatchNorm, was not trained since it was built, holds `cfg`'s re-estimated statistics, or `cfg` is
        the widest subnet (whose statistics training tracks)."""
        cfg = cfg if cfg is not None else self.current_config()
        if not self.bn_modules or not self._bn_trained or cfg in self._bn_cache:
            return True
        return all(ch.bits == max(self._choices(g)[0]) for g, ch in cfg.groups.items())

    def require_bn_stats(self, cfg: SubnetConfig | None = None, what: str = "this") -> None:
        """Raise `BatchNormStatsError` naming the fix unless `bn_stats_ready(cfg)`."""
        if not self.bn_stats_ready(cfg):
            raise BatchNormStatsError(
                f"{what} needs the BatchNorm statistics of this subnet, which were not estimated since the last "
                "training step (the model holds the widest subnet's): pass bn_batches=<training batches>, or "
                "first run `with sn.activate(cfg): sn.recalibrate_bn(train_batches)` or "
                "eqnet_plugin.evaluate(sn, cfg, loader, bn_batches)")

    def is_calibrated(self) -> bool:
        """Have the cells been initialized (`calibrate`, or a loaded trained state)? A fresh quantizer's scales are
        all 1.0. Checked on the device once (one host sync), then remembered."""
        if not self._calibrated:
            with torch.no_grad():
                flags = [(p != 1).any() for fq in self.groups.values()
                         for n, p in fq.named_parameters(recurse=False) if n.startswith("scale")]
                self._calibrated = bool(torch.stack(flags).all()) if flags else True
        return self._calibrated

    def require_calibrated(self, what: str = "this") -> None:
        """Raise RuntimeError naming the fix unless `is_calibrated()`."""
        if not self.is_calibrated():
            raise RuntimeError(f"{what} needs a calibrated supernet: call sn.calibrate(batches) first (every cell "
                               "still has its initial scale 1.0, which gives constant outputs)")

    def mark_bn_trained(self) -> None:
        """Declare the BN statistics as training statistics (after loading a trained state_dict)."""
        self._bn_cache.clear()
        self._bn_owner = None
        self._bn_trained = bool(self.bn_modules)

    # --- configs --------------------------------------------------------------------------------------------
    def _choices(self, g: str) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[bool, ...]]:
        fq = self.groups[g]
        if fq.is_weight:
            bits, syms, pcs = self.space.weight_bits, self.space.weight_symmetric, self.space.weight_per_channel
        else:
            bits, syms, pcs = self.space.act_bits, self.space.act_symmetric, (False,)
        if g in self.fixed_groups:
            bits = (self.space.fixed_bits,)
        return bits, syms, pcs

    def validate(self, cfg: SubnetConfig) -> None:
        """Raise ValueError naming the problem if `cfg` does not fit this supernet and space."""
        if not isinstance(cfg, SubnetConfig):
            raise TypeError(f"expected a SubnetConfig, got {type(cfg).__name__}")
        extra = [g for g in cfg.groups if g not in self.groups]
        if extra:
            raise ValueError(f"SubnetConfig names groups this model does not have: {extra[:6]}; valid group names "
                             f"come from Supernet.groups (e.g. {next(iter(self.groups))!r})")
        missing = [g for g in self.groups if g not in cfg.groups]
        if missing:
            raise ValueError(f"SubnetConfig misses groups {missing[:6]} ({len(missing)} in all); build configs with "
                             "Supernet.sample/uniform/max_config or SubnetConfig.replace on one of them")
        for g, ch in cfg.groups.items():
            bits, syms, pcs = self._choices(g)
            if ch.bits not in bits:
                why = " (first/last layer or model output: fixed_bits)" if g in self.fixed_groups else ""
                raise ValueError(f"group {g!r}: {ch.bits}-bit is outside the space{why}; allowed bits: {bits}")
            if ch.symmetric not in syms:
                raise ValueError(f"group {g!r}: symmetric={ch.symmetric} is outside the space; allowed: {syms}")
            if ch.per_channel not in pcs:
                raise ValueError(f"group {g!r}: per_channel={ch.per_channel} is not allowed; allowed: {pcs}"
                                 + ("" if self.groups[g].is_weight else " (activations are per-tensor)"))

    def apply(self, cfg: SubnetConfig) -> None:
        """Switch every quantizer to its cell in `cfg` (validated first; nothing changes if it is invalid)."""
        self.validate(cfg)
        for g, ch in cfg.groups.items():
            self.groups[g].set_cell(ch.bits, ch.symmetric, ch.per_channel)

    def activate(self, cfg: SubnetConfig) -> "_Activation":
        """Context manager: run with `cfg` active, restore the previous cells afterwards (also on error)::

            with sn.activate(cfg):
                logits = model(x)

        It switches nothing until the ``with`` block is entered (a warning says so if it never is; `apply(cfg)`
        switches for good). `cfg` is validated at once.

        BatchNorm: if `cfg`'s statistics were re-estimated earlier (`recalibrate_bn`), they are put in place for
        the block and the previous ones restored on exit."""
        self.validate(cfg)
        return _Activation(self, cfg)

    def _enter(self, cfg: SubnetConfig):
        previous = self.current_config()
        self.apply(cfg)
        snap = owner = None
        cached = self._bn_cache.get(cfg)
        if cached is not None:
            snap, owner = self._bn_snapshot(), self._bn_owner
            self._bn_restore(cached)
            self._bn_owner = cfg
        return previous, snap, owner

    def _exit(self, cfg: SubnetConfig, state) -> None:
        previous, snap, owner = state
        for g, ch in previous.groups.items():
            self.groups[g].set_cell(ch.bits, ch.symmetric, ch.per_channel)
        if snap is not None and self._bn_owner == cfg:
            self._bn_restore(snap)
            self._bn_owner = owner

    def current_config(self) -> SubnetConfig:
        """The active cells as a SubnetConfig."""
        return SubnetConfig({g: QuantChoice(*fq.cell) for g, fq in self.groups.items()})

    def _build(self, pick_bits, symmetric, per_channel, generator, act_symmetric=None) -> SubnetConfig:
        out = {}
        for g in self.groups:
            bits, syms, pcs = self._choices(g)
            sym = act_symmetric if (act_symmetric is not None and not self.groups[g].is_weight) else symmetric
            out[g] = QuantChoice(pick_bits(g, bits), self._pick(g, "symmetric", sym, syms, generator),
                                 self._pick(g, "per_channel", per_channel, pcs, generator))
        return SubnetConfig(out)

    @staticmethod
    def _pick(g: str, what: str, want: bool | None, options: tuple, generator) -> bool:
        if want is None:
            if generator is None or len(options) == 1:
                return options[0]
            return options[int(torch.randint(len(options), (1,), generator=generator))]
        if want not in options:
            if what == "per_channel" and want and options == (False,):
                return False        # activations are per-tensor whatever the weights use
            raise ValueError(f"{what}={want} is outside the space for group {g!r}; allowed: {options}")
        return want

    def sample(self, generator: torch.Generator | None = None, symmetric: bool | None = None,
               per_channel: bool | None = None) -> SubnetConfig:
        """A random subnet: uniform bits per group; symmetry/granularity random per group unless given."""
        def pick(g, bits):
            return bits[int(torch.randint(len(bits), (1,), generator=generator))]
        return self._build(pick, symmetric, per_channel, generator)

    def max_config(self, symmetric: bool | None = None, per_channel: bool | None = None,
                   generator: torch.Generator | None = None) -> SubnetConfig:
        """Every group at its widest bits. Symmetry/granularity as given, random per group with a generator, else
        the space's first option (symmetric, per-channel for the default space)."""
        return self._build(lambda g, bits: max(bits), symmetric, per_channel, generator)

    def min_config(self, symmetric: bool | None = None, per_channel: bool | None = None,
                   generator: torch.Generator | None = None) -> SubnetConfig:
        """Every group at its narrowest bits (fixed groups stay at fixed_bits)."""
        return self._build(lambda g, bits: min(bits), symmetric, per_channel, generator)

    def uniform(self, w_bits: int, a_bits: int, symmetric: bool = True, per_channel: bool = False,
                act_symmetric: bool | None = None) -> SubnetConfig:
        """Weights at `w_bits`, activations at `a_bits` (fixed groups at fixed_bits), one scheme everywhere.

        `act_symmetric` overrides `symmetric` for activations (e.g. TensorRT-style W sym / A sym, QNN-style
        W sym / A asym).
        """
        for what, b, allowed in (("w_bits", w_bits, self.space.weight_bits), ("a_bits", a_bits, self.space.act_bits)):
            if isinstance(b, bool) or not isinstance(b, int):
                raise TypeError(f"{what} must be an int, got {type(b).__name__} {b!r}")
            if b not in allowed:
                raise ValueError(f"{what}={b} is outside the space; allowed: {allowed}")
        return self._build(lambda g, bits: bits[0] if len(bits) == 1 else
                           (w_bits if self.groups[g].is_weight else a_bits),
                           symmetric, per_channel, None, act_symmetric)

    # --- data-driven steps ----------------------------------------------------------------------------------
    def _elastic_modules(self) -> list[ElasticFakeQuantize]:
        return list(self.groups.values())

    @torch.no_grad()
    def calibrate(self, batches: Iterable, max_batches: int | None = None, signed_activations: bool = False,
                  overwrite: bool = False) -> int:
        """Initialize every cell of every quantizer (paper grid search) from float activations on `batches`.

        Args:
            batches: iterable of input tensors or (inputs, targets) tuples; a single tensor is one batch.
            max_batches: stop after this many batches.
            signed_activations: False (default): each activation quantizer takes the grid its data needs, the
                unsigned grid [0, 2^b-1] with zero point 0 for non-negative (post-ReLU) tensors and the signed
                symmetric grid for tensors with negative values. True: every activation quantizer uses the signed
                interpretation (its `signed` buffer is 1; symmetric cells are calibrated on
                [-2^(b-1), 2^(b-1)-1] with zero point 0; asymmetric cells are unchanged). Use it for supernets
                meant for TensorRT, which runs only INT8 activations with zero point 0: symmetric subnets with
                8-bit activations then export exactly (`export_to_tensorrt(..., unsigned_activations="refuse")` accepts
                it), at the cost of one bit of resolution on post-ReLU tensors. The choice is stored in the
                quantizers' `signed` buffers, so it is part of the model's state_dict and checkpoints.
            overwrite: re-initialize a supernet whose cells were calibrated (or trained and loaded) already;
                without it that is refused, since it would overwrite the learned scales.
        Returns:
            the number of batches used.
        Raises:
            ValueError: no batches; `signed_activations` not a bool; already calibrated and not `overwrite`.
        Under torch.distributed the statistics are gathered from all ranks, so every rank gets identical scales.
        """
        if not isinstance(signed_activations, bool):
            raise ValueError(f"signed_activations must be True or False, got {signed_activations!r}")
        if not overwrite and self.is_calibrated():
            raise ValueError("this supernet is calibrated already (or holds trained scales): calibrating again would "
                             "overwrite every learned scale; pass overwrite=True to re-initialize the cells")
        if isinstance(batches, torch.Tensor):
            batches = [batches]                    # one batch, not an iterable of single samples
        fqs = self._elastic_modules()
        was_training = self.model.training
        device = _device_of(self.model)
        self.model.eval()
        n = 0
        try:
            for fq in fqs:
                fq.enable_observer(True)
                fq.enable_fake_quant(False)
            for batch in batches:
                if max_batches is not None and n >= max_batches:
                    break
                self.model(batch_inputs(batch).to(device))
                n += 1
            if n == 0:
                raise ValueError("calibrate() got no batches; pass an iterable of input tensors or (x, y) tuples")
            gather = _all_gather_fn()
            for fq in fqs:
                if fq.is_weight:
                    fq.finish_calibration()
                else:
                    fq.finish_calibration(all_gather=gather, signed=True if signed_activations else None)
            self._calibrated = True
        finally:
            for fq in fqs:
                fq.enable_observer(False)
                fq.enable_fake_quant(True)
                fq._calib_reset()
            self.model.train(was_training)
        return n

    @torch.no_grad()
    def recalibrate_bn(self, batches: Iterable, max_batches: int | None = None) -> int:
        """Re-estimate BatchNorm statistics for the active subnet on `batches` (reset, then cumulative average).

        Use training batches, never test data. The statistics are remembered for this subnet until the next
        training step, so a later ``activate(cfg)`` (and `freeze`, the exporters) use them. Returns the number of
        batches used.
        """
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return 0
        saved = [(m.momentum, m.training) for m in bns]
        was_training = self.model.training
        device = _device_of(self.model)
        n = 0
        self._recalibrating = True
        try:
            self.model.eval()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for batch in batches:
                if max_batches is not None and n >= max_batches:
                    break
                self.model(batch_inputs(batch).to(device))
                n += 1
        finally:
            self._recalibrating = False
            for m, (momentum, training) in zip(bns, saved):
                m.momentum = momentum
                m.train(training)
            self.model.train(was_training)
        if n == 0:
            raise ValueError("recalibrate_bn() got no batches; pass training batches (tensors or (x, y) tuples)")
        cfg = self.current_config()
        self._bn_owner = cfg
        self._bn_cache[cfg] = self._bn_snapshot()
        self._bn_cache.move_to_end(cfg)
        while len(self._bn_cache) > _BN_CACHE_SIZE:
            self._bn_cache.popitem(last=False)
        return n

    def to_reference(self, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None
                     ) -> torch.fx.GraphModule:
        """Decomposed torch.ao reference model of one subnet (default: the active one); keeps sub-8-bit ranges and
        matches the prepared model's eval output under ``activate(cfg)``. The supernet itself is left unchanged.

        Use this instead of torch.ao's ``convert_fx``, which refuses elastic Conv-BN layers (it would fold
        BatchNorm with the running variance and re-quantize the trained weights; see `eqnet_plugin.quant.bn_fold`).

        Args:
            bn_batches: training batches to re-estimate the subnet's BatchNorm statistics on first (needed once
                the model has been trained, unless they were estimated already; see `require_bn_stats`).

        The integer weights always equal the trained ones (see `fx.convert_reference`). torch.ao's folded conv
        bias and the QAT Conv-BN arithmetic (divide by the BN scale, then batch-norm) can differ in the last float
        bit, so an activation that falls exactly on a rounding tie can land one quantization step apart, and
        low-bit layers downstream amplify that step: compare in output steps and top-1 agreement, not bitwise.
        """
        self.require_calibrated("to_reference")
        with self.activate(cfg if cfg is not None else self.current_config()) as c:
            if bn_batches is not None:
                self.recalibrate_bn(bn_batches)
            self.require_bn_stats(c, "to_reference")
            return convert_reference(self.model)

    @contextlib.contextmanager
    def _float_eval_forward(self):
        """Eval mode with fake quantization off (shapes do not depend on it); yields ``run(fn, inputs)``, which
        calls `fn` on the inputs moved to the model's device. Mode and fake-quant switches are restored."""
        gm = self.model
        was_training = gm.training
        fq_on = {g: bool(fq.fake_quant_enabled[0]) for g, fq in self.groups.items()}
        dev = next(itertools.chain(gm.parameters(), gm.buffers())).device
        try:
            gm.eval()
            for fq in self.groups.values():
                fq.enable_fake_quant(False)
            yield lambda fn, inputs: fn(*[t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs])
        finally:
            for g, fq in self.groups.items():
                fq.enable_fake_quant(fq_on[g])
            gm.train(was_training)

    def freeze(self, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None):
        """`eqnet_plugin.export.freeze.freeze(self, cfg, bn_batches)`: the export IR of one subnet (default: the active
        one). Every exporter calls this when it is given a Supernet with ``cfg=``."""
        from .export.freeze import freeze
        return freeze(self, cfg, bn_batches)

    @torch.no_grad()
    def layer_io(self, example_inputs) -> dict[str, dict]:
        """What every layer sees on one forward of `example_inputs`: the shapes the search cost model
        (`eqnet_plugin.search.CostModel`) counts MACs from.

        One eval-mode forward of `model` with fake quantization off (shapes do not depend on it), recorded with
        forward hooks on the layers' modules. The model's training flag, the quantizers' fake-quant flags and the
        BatchNorm statistics are left unchanged. A layer called several times (a shared module) reports its first
        call. Subclasses whose layers are not modules (`eqnet_plugin.frontends.pt2e.PT2ESupernet`) override this.

        Args:
            example_inputs: an input tensor or a tuple of positional inputs (moved to the model's device).
        Returns:
            {layer name: {"input": the layer's input tensor, "output": its output tensor, "weight": its weight
            tensor, "op": "conv" | "conv_transpose" | "linear" | "embedding" (None: a layer type without a MAC
            rule), "has_bias": it has a bias or a BatchNorm (folded into a bias at deployment)}}, for the layers
            the forward called, in `layers` order.
        """
        gm = self.model
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = []
        for lay in self.layers:
            def hook(m, args, out, name=lay.name):
                if name not in seen:     # a module called twice (shared) counts its first call's shapes
                    seen[name] = (args[0], out)
            hooks.append(gm.get_submodule(lay.name).register_forward_hook(hook))
        try:
            with self._float_eval_forward() as run:
                run(gm, inputs)
        finally:
            for h in hooks:
                h.remove()
        out: dict[str, dict] = {}
        for lay in self.layers:
            if lay.name not in seen:
                continue
            mod = gm.get_submodule(lay.name)
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                op = "conv_transpose"
            elif isinstance(mod, nn.modules.conv._ConvNd):
                op = "conv"
            elif isinstance(mod, nn.Linear):
                op = "linear"
            elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                op = "embedding"
            else:
                op = None
            x, y = seen[lay.name]
            out[lay.name] = {"input": x, "output": y, "weight": mod.weight, "op": op,
                             "has_bias": getattr(mod, "bias", None) is not None or getattr(mod, "bn", None) is not None}
        return out

    def __repr__(self) -> str:
        return (f"Supernet({len(self.layers)} layers, {len(self.weight_groups)} weight groups, "
                f"{len(self.act_groups)} activation groups, {len(self.fixed_groups)} fixed)")


def _all_gather_fn():
    """A callable concatenating a 1-D tensor over all ranks, or None outside torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def gather(t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.numel()], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n)
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
    return gather
