"""Backend capability profiles: which quantization forms a deployment target runs.

A profile restricts the elastic space; `SearchSpace.from_supernet(supernet, profile)` intersects the two, so a
profile-constrained search never proposes a subnet its target cannot run.

Built-in profiles (within the library's 2..8-bit space):

* ``tensorrt``: symmetric weights and activations (zero point 0), weights per-channel int8 or int4, activations
  int8 per-tensor. TensorRT's int4 is weight-only; here the activations of an int4-weight layer stay int8 (W4A8),
  which the TensorRT adapter exports as int4 weight Q/DQ with int8 activation Q/DQ.
* ``qnn`` (Qualcomm HTP via QNN/AIMET): weights 4- or 8-bit symmetric, per-channel or per-tensor; activations 8-bit
  asymmetric per-tensor. HTP also runs 16-bit activations, which lie outside the 2..8-bit space.
* ``brevitas`` (Brevitas / FINN): anything in the space.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..quant.space import MAX_BITS, MIN_BITS

__all__ = ["BackendProfile", "PROFILES", "get_profile"]

_ALL_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))


def _bits(name: str, what: str, bits) -> tuple[int, ...]:
    bits = tuple(bits)
    bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS]
    if not bits or bad:
        raise ValueError(f"BackendProfile {name!r}: {what}={bits!r} must be a non-empty tuple of integers in "
                         f"[{MIN_BITS}, {MAX_BITS}], e.g. {what}=(4, 8)")
    return tuple(sorted(set(bits)))


def _flags(name: str, what: str, flags) -> tuple[bool, ...]:
    flags = tuple(flags)
    if not flags or any(not isinstance(f, bool) for f in flags):
        raise ValueError(f"BackendProfile {name!r}: {what}={flags!r} must be a non-empty tuple of bools, e.g. "
                         f"{what}=(True,)")
    return tuple(sorted(set(flags), reverse=True))


@dataclass(frozen=True)
class BackendProfile:
    """What one deployment target runs.

    Args:
        name: a label (stored in search results).
        weight_bits / act_bits: bit-widths the target runs for weights / activations.
        weight_symmetric / act_symmetric: allowed symmetries (True: zero point 0).
        weight_per_channel: allowed weight granularities (True: per output channel). Activations are per-tensor.

    Example:
        >>> BackendProfile("my_npu", weight_bits=(4, 8), act_bits=(8,), act_symmetric=(False,)).act_bits
        (8,)
    """

    name: str
    weight_bits: tuple[int, ...] = _ALL_BITS
    act_bits: tuple[int, ...] = _ALL_BITS
    weight_symmetric: tuple[bool, ...] = (True, False)
    act_symmetric: tuple[bool, ...] = (True, False)
    weight_per_channel: tuple[bool, ...] = (True, False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"BackendProfile name must be a non-empty string, got {self.name!r}")
        for what in ("weight_bits", "act_bits"):
            object.__setattr__(self, what, _bits(self.name, what, getattr(self, what)))
        for what in ("weight_symmetric", "act_symmetric", "weight_per_channel"):
            object.__setattr__(self, what, _flags(self.name, what, getattr(self, what)))

    def to_dict(self) -> dict:
        return {"name": self.name, "weight_bits": list(self.weight_bits), "act_bits": list(self.act_bits),
                "weight_symmetric": list(self.weight_symmetric), "act_symmetric": list(self.act_symmetric),
                "weight_per_channel": list(self.weight_per_channel)}


PROFILES: dict[str, BackendProfile] = {
    "tensorrt": BackendProfile("tensorrt", weight_bits=(4, 8), act_bits=(8,), weight_symmetric=(True,),
                               act_symmetric=(True,), weight_per_channel=(True,)),
    "qnn": BackendProfile("qnn", weight_bits=(4, 8), act_bits=(8,), weight_symmetric=(True,),
                          act_symmetric=(False,), weight_per_channel=(True, False)),
    "brevitas": BackendProfile("brevitas"),
}


def get_profile(profile: str | BackendProfile | None) -> BackendProfile | None:
    """A profile by name (``"tensorrt"``, ``"qnn"``, ``"brevitas"``), a `BackendProfile` as is, or None.

    Raises:
        ValueError: unknown name.
    """
    if profile is None or isinstance(profile, BackendProfile):
        return profile
    if isinstance(profile, str) and profile.lower() in PROFILES:
        return PROFILES[profile.lower()]
    raise ValueError(f"unknown backend profile {profile!r}; use one of {sorted(PROFILES)} or a "
                     "BackendProfile(name, weight_bits=..., act_bits=..., ...)")
