"""Small option types of the adapters, importable without onnx (the target registry reads them at import)."""
from __future__ import annotations

import enum


class UnsignedActivations(enum.Enum):
    """What a TensorRT export does with activations on the unsigned grid (see the module docstring)."""
    REFUSE = "refuse"        # raise: the exact route is a supernet calibrated on the signed grid
    RESCALE = "rescale"      # INT8 at scale 2 s: one bit less resolution, not bit-exact
