"""ElasticFakeQuantize: a torch.ao FakeQuantizeBase holding one learnable quantizer per cell of the space.

A *cell* is (symmetric, per_channel, bits). Every cell has its own learnable scale (and, when asymmetric, its own
learnable zero point, rounded to an integer in the forward pass), so each subnet keeps the range that suits it
(paper Table 4). Each cell is its own Parameter, ``scale_<sym|asym>_<channel|tensor>_<bits>b`` (and
``zero_point_...``), of shape (C,) per-channel or (1,) per-tensor, so a training step that does not use a cell
leaves its gradient None and optimizers with momentum (Adam) leave it alone. Switching the active cell is
`set_cell`; the active cell's `Grid` is `grid` (the integer container the forward pass uses) and `export_grid`
(the natural grid an exporter writes).

Integer grids (one source of truth: `grid.Grid` / `grid.int_range`):
  * weights: signed grid [-2^(b-1), 2^(b-1)-1]; symmetric cells have zero point 0.
  * activations: unsigned grid [0, 2^b-1] (dtype quint8, what torch.ao's default backend config accepts);
    symmetric cells use zero point 0 for non-negative data and 2^(b-1) for signed data, which is exactly the
    signed symmetric grid shifted by 2^(b-1). Signedness is found by calibration (`signed` buffer), or forced
    with `finish_calibration(signed=True)` / `Supernet.calibrate(..., signed_activations=True)`: TensorRT runs
    only that signed grid (INT8, zero point 0), so post-ReLU tensors then trade one bit for an exact export.

The module is a FakeQuantizeBase so that torch.ao FX places, converts and serializes it like its own fake-quants.
The flags and the active cell live in buffers (DDP broadcasts them, state_dict round-trips them); a Python mirror
of them is what forward reads, so the forward pass never synchronizes with the device.
"""
from __future__ import annotations

import sys

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from .bn_fold import CONVERT_FX_ADVICE, ConvertFxError, convert_allowed
from .grid import Grid, int_range
from .primitives import EPS, fake_quantize, grid_search_cells, lsq_grad_factor
from .space import ElasticSpace

__all__ = ["ElasticFakeQuantize"]

_SAMPLES_PER_BATCH = 8192       # activation values kept from each calibration batch (random, seeded)
_SAMPLE_CAPACITY = 16384        # activation values kept in all (random subsample beyond that)
_WEIGHT_SAMPLES_PER_CHANNEL = 512
_CALIB_SEED = 20230816          # seeds the activation subsampling: calibration is deterministic


def _called_by_torch_convert(depth: int = 8) -> bool:
    """Is a torch.ao FX convert function among the callers (a few frames up)?"""
    f = sys._getframe(2)
    for _ in range(depth):
        if f is None:
            return False
        if f.f_globals.get("__name__", "") in ("torch.ao.quantization.fx.convert", "torch.ao.quantization.quantize_fx"):
            return True
        f = f.f_back
    return False


def _tag(symmetric: bool, per_channel: bool) -> str:
    return ("sym" if symmetric else "asym") + ("_channel" if per_channel else "_tensor")


def _cell(kind: str, tag: str, bits: int) -> str:
    """Parameter name of one cell: kind "scale" or "zero_point"."""
    return f"{kind}_{tag}_{bits}b"


def _strided(t: torch.Tensor, n: int) -> torch.Tensor:
    """At most about `n` values of the last dimension of `t`, evenly strided (deterministic, no RNG). Used for
    weights only: an activation's flattened (N, C, H, W) layout aliases with a stride (a stride that is a multiple
    of the feature-map width sees one image column), so activations are sampled at random (`_random_subset`)."""
    step = max(1, -(-t.shape[-1] // n))
    return t[..., ::step]


def _random_subset(flat: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most `n` values of the 1-D tensor `flat`, drawn uniformly at random (with replacement) from a CPU
    generator seeded with `seed`, so the sample is the same on every device and run."""
    if flat.numel() <= n:
        return flat
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(flat.numel(), (n,), generator=g)
    return flat[idx.to(flat.device)]


class ElasticFakeQuantize(FakeQuantizeBase):
    """Fake quantizer with independent learnable (scale, zero point) per (symmetry, granularity, bits) cell.

    Args:
        is_weight: True for a weight quantizer (signed grid, per-channel cells allowed), False for activations.
        space: the `ElasticSpace` whose cells this quantizer holds (default: the full paper space).
        ch_axis: channel axis of per-channel weight cells (0 for Conv/Linear weights).
        factory_kwargs: device/dtype for the parameters (torch.ao passes this to weight quantizers).

    Use through `elastic_qconfig_mapping()`; `Supernet` enumerates and drives these modules.
    """

    def __init__(self, is_weight: bool = False, space: ElasticSpace | None = None, ch_axis: int = 0,
                 factory_kwargs: dict | None = None) -> None:
        super().__init__()
        space = space if space is not None else ElasticSpace()
        if not isinstance(space, ElasticSpace):
            raise TypeError(f"space must be an ElasticSpace, got {type(space).__name__}")
        fk = dict(factory_kwargs or {})
        fk["dtype"] = torch.float32
        self.is_weight = bool(is_weight)
        self.space = space
        self.ch_axis = int(ch_axis) if is_weight else -1
        self.bit_choices = space.cell_bits(is_weight)
        self.sym_choices = space.weight_symmetric if is_weight else space.act_symmetric
        self.pc_choices = space.weight_per_channel if is_weight else (False,)
        for sym in self.sym_choices:
            for pc in self.pc_choices:
                tag = _tag(sym, pc)
                for b in self.bit_choices:
                    self.register_parameter(_cell("scale", tag, b), torch.nn.Parameter(torch.ones(1, **fk)))
                    if not sym:
                        self.register_parameter(_cell("zero_point", tag, b), torch.nn.Parameter(torch.zeros(1, **fk)))
        dev = fk.get("device")
        # Default active cell: the widest bits, the first symmetry/granularity of the space.
        self.register_buffer("active_bits", torch.tensor([max(self.bit_choices)], dtype=torch.long, device=dev))
        self.register_buffer("active_symmetric", torch.tensor([int(self.sym_choices[0])], dtype=torch.uint8,
                                                              device=dev))
        self.register_buffer("active_per_channel", torch.tensor([int(self.pc_choices[0])], dtype=torch.uint8,
                                                                device=dev))
        self.register_buffer("signed", torch.tensor([int(self.is_weight)], dtype=torch.uint8, device=dev))
        self.register_buffer("eps", torch.tensor([EPS], device=dev))
        self.observer_enabled.fill_(0)     # "observer" = collect calibration statistics; off until calibrate()
        self._calib_reset()
        self._sync_mirror()

    # --- FakeQuantizeBase contract -------------------------------------------------------------------------
    is_dynamic = False

    @property
    def activation_post_process(self):
        """torch.ao reads observer attributes (dtype, quant_min, ...) from here; we are our own observer."""
        return self

    @property
    def dtype(self) -> torch.dtype:
        return torch.qint8 if self.is_weight else torch.quint8

    @property
    def qscheme(self) -> torch.qscheme:
        if self._pc:
            return torch.per_channel_symmetric if self._sym else torch.per_channel_affine
        return torch.per_tensor_symmetric if self._sym else torch.per_tensor_affine

    @property
    def quant_min(self) -> int:
        return self._grid()[0]

    @property
    def quant_max(self) -> int:
        return self._grid()[1]

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._fq_on = bool(enabled)

    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self._observing = bool(enabled)

    @torch.no_grad()
    def calculate_qparams(self):
        """(scale, zero_point) of the active cell: float (C,) or (1,), and integer zero point of the same shape.

        Raises:
            ConvertFxError: called by torch.ao's ``convert_fx`` / ``convert_to_reference_fx`` directly on an elastic
                supernet, which cannot reproduce its subnets (fixed BN fold, sub-8-bit ranges); the message names
                the exact paths (`Supernet.to_reference`, `freeze` and the exporters).
        """
        if not convert_allowed() and _called_by_torch_convert():
            raise ConvertFxError("torch.ao convert_fx cannot convert an eqnet_plugin elastic supernet exactly (it "
                                 "re-folds BatchNorm with the running variance and lowers to 8-bit kernels); "
                                 + CONVERT_FX_ADVICE)
        scale, zp = self._active_qparams()
        return scale.detach().clone(), zp.detach().round().to(torch.int32)

    # --- the active cell -----------------------------------------------------------------------------------
    @property
    def cell(self) -> tuple[int, bool, bool]:
        """(bits, symmetric, per_channel) of the active cell."""
        return self._bits, self._sym, self._pc

    @property
    def grid(self) -> Grid:
        """The active cell's grid on this quantizer's integer container: signed for weights, unsigned for
        activations (whose symmetric cells hold signed data with zero point 2^(b-1))."""
        return Grid(self._bits, self._sym, self._pc, signed=self.is_weight)

    @property
    def export_grid(self) -> Grid:
        """The active cell's natural export grid: signed for weights and for symmetric cells of signed activations
        (zero point 0), unsigned otherwise."""
        return Grid(self._bits, self._sym, self._pc, signed=self.is_weight or (self._sym and self._signed))

    def set_cell(self, bits: int, symmetric: bool = True, per_channel: bool = False) -> None:
        """Make (bits, symmetric, per_channel) the active cell; raises ValueError naming the valid choices."""
        if bits not in self.bit_choices:
            raise ValueError(f"{bits}-bit is not in this quantizer's space {self.bit_choices}; pick one of them or "
                             "widen the ElasticSpace passed to elastic_qconfig_mapping")
        if symmetric not in self.sym_choices:
            raise ValueError(f"symmetric={symmetric} is not in this quantizer's space {self.sym_choices}")
        if per_channel not in self.pc_choices:
            what = "activations are per-tensor only" if not self.is_weight else f"space allows {self.pc_choices}"
            raise ValueError(f"per_channel={per_channel} is not allowed here: {what}")
        self.active_bits.fill_(int(bits))
        self.active_symmetric.fill_(int(symmetric))
        self.active_per_channel.fill_(int(per_channel))
        self._bits, self._sym, self._pc = int(bits), bool(symmetric), bool(per_channel)

    def _sync_mirror(self) -> None:
        """Refresh the Python copy of the buffers (after construction or load_state_dict; syncs once)."""
        self._bits = int(self.active_bits.item())
        self._sym = bool(self.active_symmetric.item())
        self._pc = bool(self.active_per_channel.item())
        self._signed = bool(self.signed.item())
        self._fq_on = bool(self.fake_quant_enabled.item())
        self._observing = bool(self.observer_enabled.item())

    def _grid(self) -> tuple[int, int]:
        """(qmin, qmax) of `grid`, without building a Grid (the forward pass reads it)."""
        return int_range(self._bits, self.is_weight)

    def _fixed_zero_point(self, bits: int) -> int:
        """Zero point of a symmetric cell: 0, except signed activations on the unsigned grid (2^(b-1))."""
        return (1 << (bits - 1)) if (not self.is_weight and self._signed) else 0

    def _active_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        tag = _tag(self._sym, self._pc)
        scale = getattr(self, _cell("scale", tag, self._bits)).abs().clamp(min=EPS)
        if self._sym:
            zp = torch.full_like(scale, float(self._fixed_zero_point(self._bits)))
        else:
            zp = getattr(self, _cell("zero_point", tag, self._bits))
        return scale, zp

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self._observe(x)
        if not self._fq_on:
            return x
        bits, tag = self._bits, _tag(self._sym, self._pc)
        scale = getattr(self, _cell("scale", tag, bits)).abs().clamp(min=EPS)               # (C,) or (1,)
        # Symmetric cells: a fixed integer zero point (no gradient, scalar clamp bounds in the kernel).
        zp = self._fixed_zero_point(bits) if self._sym else getattr(self, _cell("zero_point", tag, bits))
        qmin, qmax = self._grid()
        if self._pc:
            shape = [1] * x.dim()
            shape[self.ch_axis] = -1
            scale = scale.reshape(shape)                                                    # (C, 1, ..., 1)
            if not self._sym:
                zp = zp.reshape(shape)
            numel = x.numel() // max(x.shape[self.ch_axis], 1)
        else:
            numel = x.numel()
        qmax_pos = int_range(bits, self.is_weight or self._signed)[1]                   # LSQ's Qp: the data's grid
        return fake_quantize(x, scale, zp, qmin, qmax, lsq_grad_factor(numel, qmax_pos))

    # --- per-channel cells ---------------------------------------------------------------------------------
    def materialize(self, num_channels: int) -> None:
        """Size the per-channel cells for `num_channels` output channels (`Supernet` calls this)."""
        if not self.is_weight or True not in self.pc_choices:
            return
        for sym in self.sym_choices:
            for b in self.bit_choices:
                for kind in ("scale",) if sym else ("scale", "zero_point"):
                    p = getattr(self, _cell(kind, _tag(sym, True), b))
                    if p.shape[0] != num_channels:
                        p.data = p.data[:1].expand(num_channels).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Per-channel cells take the channel count of the checkpoint (a freshly prepared model has C = 1).
        for name, p in self.named_parameters(recurse=False):
            src = state_dict.get(prefix + name)
            if src is not None and src.dim() == 1 and src.shape[0] != p.shape[0]:
                p.data = torch.empty_like(src, device=p.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._sync_mirror()

    # --- calibration ---------------------------------------------------------------------------------------
    def _calib_reset(self) -> None:
        self._calib_samples: list[torch.Tensor] = []
        self._calib_count = 0
        self._calib_total = 0
        self._calib_min: torch.Tensor | None = None
        self._calib_max: torch.Tensor | None = None
        self._weight_seen: torch.Tensor | None = None

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self.is_weight:
            self._weight_seen = x.detach()
            return
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        mn, mx = flat.min(), flat.max()                      # exact extremes (device tensors, no host sync)
        self._calib_min = mn if self._calib_min is None else torch.minimum(self._calib_min, mn)
        self._calib_max = mx if self._calib_max is None else torch.maximum(self._calib_max, mx)
        self._calib_samples.append(_random_subset(flat, _SAMPLES_PER_BATCH, _CALIB_SEED + self._calib_count))
        self._calib_count += 1
        self._calib_total += flat.numel()

    @torch.no_grad()
    def finish_calibration(self, all_gather=None, signed: bool | None = None) -> None:
        """Initialize every cell from what was observed since the observer was enabled (paper grid search).

        Args:
            all_gather: optional callable mapping a 1-D tensor to the concatenation of that tensor over all
                ranks (data-parallel training: every rank then computes identical scales). `Supernet.calibrate`
                passes one when torch.distributed is initialized.
            signed: activations only (weights are always signed): None (default) interprets the data as signed
                when its minimum is negative; True uses the signed interpretation whatever the data (`signed`
                buffer 1: symmetric cells get zero point 2^(b-1) on the unsigned container, i.e. the signed grid
                [-2^(b-1), 2^(b-1)-1] with zero point 0, and are grid-searched on it; asymmetric cells are
                unchanged). This is what TensorRT runs exactly (INT8, zero point 0); on non-negative data it
                costs one bit of resolution. False forces the unsigned interpretation and is only valid for
                non-negative data.
        Raises:
            RuntimeError: nothing was observed.
            ValueError: `signed` is not None/True/False, or False on data with negative values.
        """
        if signed is not None and not isinstance(signed, bool):
            raise ValueError(f"signed must be None (from the data), True or False, got {signed!r}")
        if self.is_weight:
            if self._weight_seen is None:
                raise RuntimeError("calibration saw no weight: run forward passes with the observer enabled")
            self._init_weight_cells(self._weight_seen)
        else:
            if not self._calib_samples:
                raise RuntimeError("calibration saw no activation: this quantizer was never reached by the "
                                   "calibration batches (check the batches reach every branch of the model)")
            seen = torch.cat(self._calib_samples)
            sample = _random_subset(seen, _SAMPLE_CAPACITY, _CALIB_SEED - 1)
            extremes = torch.stack([self._calib_min, self._calib_max])
            if all_gather is not None:                       # every rank: the same sample and the global extremes
                sample = all_gather(sample)
                extremes = all_gather(extremes).reshape(-1, 2)
                extremes = torch.stack([extremes[:, 0].min(), extremes[:, 1].max()])
            # The range search runs on the random sample; the sign is decided by the exact minimum over all the data
            # (and ranks), so rare negative values off the sample still make the quantizer signed.
            self._init_act_cells(sample, signed, negative=bool(torch.minimum(extremes[0], sample.min()) < 0))
        self._calib_reset()

    def _init_weight_cells(self, w: torch.Tensor) -> None:
        w = w.detach().float().movedim(self.ch_axis, 0)
        for pc in self.pc_choices:
            x = _strided(w.reshape(w.shape[0], -1), _WEIGHT_SAMPLES_PER_CHANNEL) if pc else \
                _strided(w.reshape(1, -1), _SAMPLE_CAPACITY)
            if pc:
                self.materialize(w.shape[0])
            cells = [(sym, b) for sym in self.sym_choices for b in self.bit_choices]
            found = grid_search_cells(x, [Grid(b, sym, pc, signed=True) for sym, b in cells])
            for (sym, b), (s, z) in zip(cells, found):
                getattr(self, _cell("scale", _tag(sym, pc), b)).copy_(s)
                if not sym:
                    getattr(self, _cell("zero_point", _tag(sym, pc), b)).copy_(z)

    def _init_act_cells(self, x: torch.Tensor, signed: bool | None = None, negative: bool | None = None) -> None:
        if negative is None:
            negative = bool(x.numel()) and bool(x.min() < 0)
        if signed is False and negative:
            raise ValueError("signed=False: this activation has negative values, which the unsigned grid cannot "
                             "hold; pass signed=None (from the data) or True")
        signed = negative if signed is None else signed
        self.signed.fill_(int(signed))
        self._signed = signed
        # symmetric cells of a signed quantizer: signed grid (zero point fixed at 2^(b-1) on the unsigned
        # container); everything else: the unsigned grid.
        cells = [(sym, b) for sym in self.sym_choices for b in self.bit_choices]
        found = grid_search_cells(x, [Grid(b, sym, False, signed=sym and signed) for sym, b in cells])
        for (sym, b), (s, z) in zip(cells, found):
            getattr(self, _cell("scale", _tag(sym, False), b)).copy_(s.reshape(1))
            if not sym:
                getattr(self, _cell("zero_point", _tag(sym, False), b)).copy_(z.reshape(1))

    def extra_repr(self) -> str:
        kind = "weight" if self.is_weight else ("activation, signed" if self._signed else "activation, unsigned")
        return (f"{kind}, bits={self.bit_choices}, active=(bits={self._bits}, symmetric={self._sym}, "
                f"per_channel={self._pc})")
