"""Small option types of the adapters, importable without onnx (the target registry reads them at import)."""
from __future__ import annotations

import enum


class UnsignedActivations(enum.Enum):
    """What a TensorRT export does with activations on the unsigned grid (see the module docstring)."""
    REFUSE = "refuse"        # raise: the exact route is a supernet calibrated on the signed grid
    RESCALE = "rescale"      # INT8 at scale 2 s: one bit less resolution, not bit-exact


class LowBit(enum.Enum):
    """How `export_onnx` stores sub-8-bit weights (activations keep 8-bit containers either way)."""
    CLIP = "clip"            # int8 codes (sub-8-bit activations get a Clip between Q and DQ); any opset >= 13
    INT4 = "int4"            # in addition, weights of <= 4 bits as INT4 initializers (opset >= 21)
