"""`Supernet`: a view over a prepared GraphModule that enumerates quantizer groups and layers and switches subnets.

The model stays the user's GraphModule (train it, wrap it in DDP, save its state_dict as usual); the Supernet only
holds references to its `ElasticFakeQuantize` modules and knows the graph around them through its frontend (FX or
PT2E; `eqnet_plugin.frontends.base` describes the protocol).
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn

from ..export.ir import FrozenSubnet
from ..frontends.base import Frontend, Layer, QuantizerLayout, frontend_for
from ..frontends.fx_graph import FXFrontend
from ..quant.fake_quant import ElasticFakeQuantize
from ..quant.space import ElasticSpace, QuantChoice, SubnetConfig
from .batches import all_gather_fn, batch_inputs, device_of
from .tracking import Activation, BnTracker

__all__ = ["Supernet", "BatchNormStatsError"]

_BN_CACHE_SIZE = 64      # subnets whose re-estimated BatchNorm statistics are kept (least recently used dropped)


class BatchNormStatsError(RuntimeError):
    """The BatchNorm statistics in the model are not the requested subnet's (re-estimate them first)."""


class Supernet:
    """View over a GraphModule prepared for elastic QAT by one of the frontends (`eqnet_plugin.frontends`).

    Args:
        model: a graph prepared with FX, ``prepare_qat_fx(model, elastic_qconfig_mapping(space), example_inputs)``
            (or `eqnet_plugin.prepare_qat`), or with PT2E, ``prepare_qat_pt2e(torch.export.export(model,
            example_inputs).module(), ElasticQuantizer(space))`` (or `eqnet_plugin.frontends.pt2e.prepare_qat`).
            The frontend is picked from the model (`eqnet_plugin.frontends.base.frontend_for`).
        space: the space to sample from (default: the space the quantizers were built with). It must be covered by
            the quantizers' cells.

    Attributes:
        frontend: the `Frontend` of the graph (`FXFrontend`, `PT2EFrontend`).
        groups: name -> ElasticFakeQuantize, one entry per distinct quantizer object (FX may reuse one for several
            nodes), weights and activations in graph order.
        layers: the weighted layers (`Layer`), in graph order. FX: the QAT modules; PT2E: the ``aten.conv*d`` /
            ``aten.linear`` calls, named by the path of the submodule holding the weight (``layer1.0.conv1``).
        fixed_groups: groups kept at `space.fixed_bits`: the first and last layers' weight and input quantizers and
            the quantizers of the model outputs.
        exact_pools: the global average pools of `model` that were made exact (in place; `ExactGlobalAvgPool`
            modules in FX, `exact_global_avg_pool` calls in PT2E): torch.ao re-quantizes a pool's output on its
            input's grid, where exact rounding ties are frequent, and a float32 mean decides them by summation
            order; the exact pool gives the same codes on CPU, CUDA and in the exported ONNX (see
            `eqnet_plugin.quant.exact_pool`). Placement and parameters are unchanged.
        fixed_fold: the Conv-BN modules switched to the fixed fold, so every subnet quantizes the same weights in
            training, evaluation and export (`eqnet_plugin.quant.bn_fold`); empty in PT2E, where conv weights are
            quantized unfolded and BatchNorm stays a module after the conv.

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

    def __init__(self, model: torch.fx.GraphModule, space: ElasticSpace | None = None) -> None:
        if space is not None and not isinstance(space, ElasticSpace):
            raise TypeError(f"space must be an ElasticSpace, got {type(space).__name__}")
        self.frontend: Frontend = frontend_for(model, FXFrontend)(model)
        self.model = model
        self.fixed_fold = self.frontend.fixed_fold
        self.exact_pools = self.frontend.exact_pools
        layout = self.frontend.layout()
        self.space = space if space is not None else next(iter(layout.quantizers.values())).space
        self.bn_modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._bn_cache: OrderedDict[SubnetConfig, list[tuple[torch.Tensor, ...]]] = OrderedDict()
        self._bn_owner: SubnetConfig | None = None     # whose re-estimated statistics are in the BN buffers
        self._bn_trained = False                       # a training-mode forward happened since the model was built
        self._bn_warned = False
        self._recalibrating = False
        self._calibrated = False
        self._calib_warned = False
        self._hook = model.register_forward_pre_hook(BnTracker(self))
        self._set_groups(layout)

    def _set_groups(self, layout: QuantizerLayout) -> None:
        """Set `groups` (weights in layer order, then weight quantizers of modules not called in the graph (rare),
        then the activations in graph order), `layers`, the weight / activation group lists and the fixed groups
        (first and last layer, graph outputs), and check that the space covers them."""
        quantizers, layers = layout.quantizers, layout.layers
        weight_order = [lay.weight for lay in layers]
        weight_order += [g for g, fq in quantizers.items() if fq.is_weight and g not in weight_order]
        self.groups: dict[str, ElasticFakeQuantize] = {g: quantizers[g] for g in weight_order + layout.act_order}
        self.layers: list[Layer] = layers
        self.weight_groups = [g for g in self.groups if self.groups[g].is_weight]
        self.act_groups = [g for g in self.groups if not self.groups[g].is_weight]
        fixed: set[str] = set()
        if self.space.fixed_bits is not None and layers:
            for lay in (layers[0], layers[-1]):
                fixed.add(lay.weight)
                if lay.input is not None:
                    fixed.add(lay.input)
            fixed |= layout.output_groups
        self.fixed_groups = frozenset(fixed)
        self._check_space_covered()

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

    def activate(self, cfg: SubnetConfig) -> Activation:
        """Context manager: run with `cfg` active, restore the previous cells afterwards (also on error)::

            with sn.activate(cfg):
                logits = model(x)

        It switches nothing until the ``with`` block is entered (a warning says so if it never is; `apply(cfg)`
        switches for good). `cfg` is validated at once.

        BatchNorm: if `cfg`'s statistics were re-estimated earlier (`recalibrate_bn`), they are put in place for
        the block and the previous ones restored on exit."""
        self.validate(cfg)
        return Activation(self, cfg)

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
                8-bit activations then export exactly (`export_to_tensorrt`, whose default refuses the unsigned
                grid, accepts it), at the cost of one bit of resolution on post-ReLU tensors. The choice is stored in
                the quantizers' `signed` buffers, so it is part of the model's state_dict and checkpoints.
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
        device = device_of(self.model)
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
            gather = all_gather_fn()
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
        device = device_of(self.model)
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
        """The framework's reference (quantize / dequantize) model of one subnet (default: the active one); it keeps
        sub-8-bit ranges and matches the prepared model's eval output under ``activate(cfg)``. The supernet itself
        is left unchanged.

        FX: torch.ao's decomposed reference model (`eqnet_plugin.frontends.fx.convert_reference`). Use this
        instead of torch.ao's ``convert_fx``, which refuses elastic Conv-BN layers (it would fold BatchNorm with the
        running variance and re-quantize the trained weights; see `eqnet_plugin.quant.bn_fold`). The integer
        weights always equal the trained ones; torch.ao's folded conv bias and the QAT Conv-BN arithmetic (divide
        by the BN scale, then batch-norm) can differ in the last float bit, so an activation that falls exactly on
        a rounding tie can land one quantization step apart, and low-bit layers downstream amplify that step:
        compare in output steps and top-1 agreement, not bitwise.

        PT2E: torchao's ``convert_pt2e`` of a copy of the model in eval mode, its standard Q/DQ graph (with each
        cell's integer range); its outputs equal the supernet's eval output.

        Args:
            bn_batches: training batches to re-estimate the subnet's BatchNorm statistics on first (needed once
                the model has been trained, unless they were estimated already; see `require_bn_stats`).

        Raises:
            RuntimeError: the supernet is not calibrated.
            BatchNormStatsError: the subnet's BatchNorm statistics are unknown (pass `bn_batches`).
        """
        self.require_calibrated("to_reference")
        with self.activate(cfg if cfg is not None else self.current_config()) as c:
            if bn_batches is not None:
                self.recalibrate_bn(bn_batches)
            self.require_bn_stats(c, "to_reference")
            return self.frontend.to_reference()

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

    def freeze(self, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None) -> FrozenSubnet:
        """The export IR of one subnet (default: the active one), built by the frontend (`Frontend.freeze`); see
        `eqnet_plugin.freeze` for the arguments and errors. Every exporter calls this when it is given a Supernet
        with ``cfg=``."""
        return self.frontend.freeze(self, cfg, bn_batches)

    @torch.no_grad()
    def layer_io(self, example_inputs) -> dict[str, dict]:
        """What every layer sees on one forward of `example_inputs`: the shapes the search cost model
        (`eqnet_plugin.search.CostModel`) counts MACs from.

        One eval-mode forward of `model` with fake quantization off (shapes do not depend on it), recorded by the
        frontend (forward hooks on the layers' modules in FX, a `torch.fx.Interpreter` over the graph in PT2E).
        The model's training flag, the quantizers' fake-quant flags and the BatchNorm statistics are left
        unchanged. A layer called several times (a shared module) reports its first call.

        Args:
            example_inputs: an input tensor or a tuple of positional inputs (moved to the model's device).
        Returns:
            {layer name: {"input": the layer's input tensor, "output": its output tensor, "weight": its weight
            tensor, "op": "conv" | "conv_transpose" | "linear" | "embedding" (None: a layer type without a MAC
            rule), "has_bias": it has a bias or a BatchNorm (folded into a bias at deployment)}}, for the layers
            the forward called, in `layers` order.
        """
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        with self._float_eval_forward() as run:
            return self.frontend.layer_io(self.layers, run, tuple(inputs))

    def __repr__(self) -> str:
        return (f"Supernet({len(self.layers)} layers, {len(self.weight_groups)} weight groups, "
                f"{len(self.act_groups)} activation groups, {len(self.fixed_groups)} fixed)")
