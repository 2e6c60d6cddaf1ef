"""Cost model from the traced graph with real shapes.

One forward pass of the prepared GraphModule records each weighted layer's input and output shape
(`Supernet.layer_io`: forward hooks on the layers' modules in the FX flow; on a PT2E graph, where layers are
``aten.conv*d`` / ``aten.linear`` calls, an interpreter that records those calls). From them, per layer: MACs (per
sample), parameter count, output channels and input size. For any subnet:

* ``bitops = sum_l MACs_l * w_bits_l * a_bits_l`` where ``a_bits_l`` is the bit-width of the layer's input
  quantizer (32 when no quantizer feeds the layer: float input);
* ``size_bytes = sum_l [params_l * w_bits_l / 8 + qparams_l + bias_l]``: the packed integer weights; the weight
  quantization parameters, 4 bytes (float32) per scale plus 1 byte per zero point when asymmetric (symmetric zero
  points are 0 and not stored), one of each per output channel when per-channel, else one; and the bias in float32,
  4 bytes per output channel for every layer with a bias or a BatchNorm (BN folds into a bias at deployment).
  Activation quantization parameters (a few bytes per tensor) are not counted;
* ``avg_weight_bits``: weight bits averaged with parameter counts as weights;
* ``avg_act_bits``: input-activation bits averaged with the per-sample input sizes as weights, over the layers
  that have an input quantizer.

MACs are per sample: counts are divided by the batch size of the example input (pass a batch of 1).
Costs for many subnets at once come from `CostModel.batch` on per-group bit arrays (numpy), which is what the
genetic search uses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from ..quant.space import SubnetConfig

__all__ = ["LayerCost", "Costs", "CostModel", "cost_of", "FLOAT_BITS", "SCALE_BYTES", "ZERO_POINT_BYTES",
           "BIAS_BYTES"]

FLOAT_BITS = 32          # bit-width of an unquantized layer input
SCALE_BYTES = 4          # one float32 scale
ZERO_POINT_BYTES = 1     # one int8/uint8 zero point (asymmetric only)
BIAS_BYTES = 4           # one float32 bias element


@dataclass(frozen=True)
class LayerCost:
    """Shape-derived facts of one weighted layer.

    Attributes:
        name: module name in the GraphModule. kind: module type name.
        weight: its weight quantizer group; input: its input-activation group (None: float input).
        macs: multiply-accumulates per sample. params: weight elements. out_channels: weight.shape[0] (scales per
        channel). has_bias: a bias or BatchNorm (folded) exists. input_numel: input elements per sample.
    """

    name: str
    kind: str
    weight: str
    input: str | None
    macs: int
    params: int
    out_channels: int
    has_bias: bool
    input_numel: int


@dataclass(frozen=True)
class Costs:
    """Costs of one subnet (see the module docstring for the definitions)."""

    macs: int
    bitops: float
    size_bytes: float
    avg_weight_bits: float
    avg_act_bits: float
    params: int

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_macs(op: str | None, kind: str, weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                batch: int) -> int:
    """MACs per sample of one layer from its real input/output shapes (`op`: see `Supernet.layer_io`)."""
    if op == "conv_transpose":
        # weight (Cin, Cout/groups, k...): every input element meets Cout/groups * prod(k) weights.
        return x.numel() // batch * (weight.numel() // weight.shape[0])
    if op in ("conv", "linear"):
        # conv: Cout * H_out * W_out * (Cin/groups) * kh * kw; linear: out * in (per token).
        return y.numel() // batch * (weight.numel() // weight.shape[0])
    if op == "embedding":
        return 0                                        # a lookup: no multiply-accumulates
    raise TypeError(f"cost model: layer {kind} has no MAC rule; supported: Conv*d, ConvTranspose*d, "
                    "Linear, Embedding")


class CostModel:
    """Per-layer shapes of one supernet and fast (vectorized) costs of subnets.

    Args:
        group_names: every quantizer group of the supernet, in `Supernet.groups` order (the columns of the bit
            arrays given to `batch`).
        layers: one `LayerCost` per weighted layer.

    Build it with `CostModel.from_supernet(supernet, example_inputs)`.
    """

    def __init__(self, group_names: Sequence[str], layers: Sequence[LayerCost]) -> None:
        self.group_names = tuple(group_names)
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("CostModel needs at least one weighted layer")
        col = {g: i for i, g in enumerate(self.group_names)}
        for lay in self.layers:
            for g in (lay.weight, lay.input):
                if g is not None and g not in col:
                    raise ValueError(f"layer {lay.name!r} names group {g!r} that is not in group_names")
        self._col = col
        self.w_idx = np.array([col[lay.weight] for lay in self.layers])                        # (L,)
        # Layers without an input quantizer read column G: an extra column holding FLOAT_BITS.
        self.a_idx = np.array([col[lay.input] if lay.input is not None else len(col) for lay in self.layers])
        self.macs = np.array([lay.macs for lay in self.layers], dtype=np.float64)              # (L,)
        self.params = np.array([lay.params for lay in self.layers], dtype=np.float64)          # (L,)
        self.channels = np.array([lay.out_channels for lay in self.layers], dtype=np.float64)  # (L,)
        self.bias_bytes = float(sum(BIAS_BYTES * lay.out_channels for lay in self.layers if lay.has_bias))
        self.in_numel = np.array([lay.input_numel if lay.input is not None else 0 for lay in self.layers],
                                 dtype=np.float64)                                            # (L,)
        self.total_macs = int(sum(lay.macs for lay in self.layers))
        self.total_params = int(sum(lay.params for lay in self.layers))

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_supernet(cls, supernet, example_inputs) -> "CostModel":
        """Record real shapes with one eval-mode forward of `supernet.model` on `example_inputs`
        (`Supernet.layer_io`: module hooks in the FX flow, a graph interpreter on PT2E graphs).

        Args:
            supernet: a `Supernet`.
            example_inputs: an input tensor or a tuple of positional inputs (a batch of 1 is typical; counts are
                per sample: divided by the first dimension of the first input).
        Returns:
            a CostModel. The model's training flag and BatchNorm statistics are left unchanged.
        Raises:
            ValueError: a layer was not called during the forward pass (no shape recorded).
        """
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise TypeError("example_inputs must be a tensor or a tuple of tensors, e.g. torch.randn(1, 3, 224, 224)")
        batch = max(int(inputs[0].shape[0]), 1) if inputs[0].dim() else 1
        seen = supernet.layer_io(tuple(inputs))
        out = []
        for lay in supernet.layers:
            if lay.name not in seen:
                raise ValueError(f"cost model: layer {lay.name!r} was not called by the forward pass on "
                                 "example_inputs; pass inputs that run the whole model")
            io = seen[lay.name]
            x, y, w = io["input"], io["output"], io["weight"]
            out.append(LayerCost(lay.name, lay.kind, lay.weight, lay.input,
                                 _layer_macs(io["op"], lay.kind, w, x, y, batch), int(w.numel()), int(w.shape[0]),
                                 bool(io["has_bias"]), int(x.numel() // batch)))
        return cls(list(supernet.groups), out)

    # --- costs ----------------------------------------------------------------------------------------------
    def batch(self, bits: np.ndarray, per_channel: np.ndarray, symmetric: np.ndarray) -> dict[str, np.ndarray]:
        """Costs of N subnets at once.

        Args:
            bits: (N, G) integer bit-widths, columns in `group_names` order.
            per_channel: (N, G) or (N, 1) bools: weight granularity (read on weight columns only).
            symmetric: (N, G) or (N, 1) bools: weight symmetry (read on weight columns only).
        Returns:
            dict of (N,) float64 arrays: bitops, size_bytes, avg_weight_bits, avg_act_bits.
        """
        bits = np.asarray(bits)
        if bits.ndim != 2 or bits.shape[1] != len(self.group_names):
            raise ValueError(f"bits must have shape (N, {len(self.group_names)}), got {bits.shape}")
        n = bits.shape[0]
        ext = np.concatenate([bits, np.full((n, 1), FLOAT_BITS, dtype=bits.dtype)], axis=1).astype(np.float64)
        wb, ab = ext[:, self.w_idx], ext[:, self.a_idx]                                   # (N, L)
        sym = self._per_layer(symmetric, n)
        pc = self._per_layer(per_channel, n)
        n_qparams = np.where(pc, self.channels, 1.0)                                      # (N, L)
        qparam_bytes = n_qparams * (SCALE_BYTES + np.where(sym, 0, ZERO_POINT_BYTES))
        act_w = self.in_numel.sum()
        return {
            "bitops": (self.macs * wb * ab).sum(1),
            "size_bytes": (self.params * wb / 8 + qparam_bytes).sum(1) + self.bias_bytes,
            "avg_weight_bits": (self.params * wb).sum(1) / self.params.sum(),
            "avg_act_bits": (self.in_numel * ab).sum(1) / act_w if act_w > 0 else np.full(n, float(FLOAT_BITS)),
        }

    def _per_layer(self, flags, n: int) -> np.ndarray:
        """(N, G) or (N, 1) group flags -> (N, L) flags of each layer's weight group."""
        f = np.asarray(flags, dtype=bool)
        if f.ndim == 1:
            f = f.reshape(n, 1)
        if f.shape[1] == 1:
            return np.broadcast_to(f, (n, len(self.layers)))
        if f.shape != (n, len(self.group_names)):
            raise ValueError(f"flags must have shape ({n}, 1) or ({n}, {len(self.group_names)}), got {f.shape}")
        return f[:, self.w_idx]

    def arrays_of(self, cfg: SubnetConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bits, per_channel, symmetric), each (1, G), of one SubnetConfig."""
        missing = [g for g in self.group_names if g not in cfg.groups]
        if missing:
            raise ValueError(f"SubnetConfig misses groups {missing[:4]}; the cost model needs every group")
        ch = [cfg.groups[g] for g in self.group_names]
        return (np.array([[c.bits for c in ch]]), np.array([[c.per_channel for c in ch]]),
                np.array([[c.symmetric for c in ch]]))

    def __call__(self, cfg: SubnetConfig) -> Costs:
        """Costs of one subnet (per-group symmetry and granularity are honoured)."""
        r = self.batch(*self.arrays_of(cfg))
        return Costs(self.total_macs, float(r["bitops"][0]), float(r["size_bytes"][0]),
                     float(r["avg_weight_bits"][0]), float(r["avg_act_bits"][0]), self.total_params)

    def per_layer(self, cfg: SubnetConfig) -> list[dict]:
        """One row per layer: name, kind, macs, params, w_bits, a_bits, bitops (for tables and debugging)."""
        bits = self.arrays_of(cfg)[0][0].tolist() + [FLOAT_BITS]
        return [{"name": lay.name, "kind": lay.kind, "macs": lay.macs, "params": lay.params,
                 "w_bits": bits[int(w)], "a_bits": bits[int(a)], "bitops": lay.macs * bits[int(w)] * bits[int(a)]}
                for lay, w, a in zip(self.layers, self.w_idx, self.a_idx)]

    def __repr__(self) -> str:
        return f"CostModel({len(self.layers)} layers, {self.total_macs / 1e6:.2f} MMACs, {self.total_params} params)"


def cost_of(supernet, cfg: SubnetConfig, example_inputs) -> Costs:
    """Costs of one subnet of `supernet` (builds a CostModel; reuse `CostModel` when costing many subnets)."""
    return CostModel.from_supernet(supernet, example_inputs)(cfg)
