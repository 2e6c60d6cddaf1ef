"""Backend profiles: a deployment target's named restriction of the elastic space.

A profile is an `ElasticSpace` with a name: the cells its target runs. `SearchSpace.from_supernet(supernet,
profile)` intersects it with the supernet's space, so a profile-constrained search never proposes a subnet its
target cannot run. The profile's ``fixed_bits`` is not used: the supernet's space decides which groups are fixed,
and their bit-width must be one the profile runs.

Built-in profiles (within the library's 2..8-bit space):

* ``tensorrt``: symmetric weights and activations (zero point 0), weights per-channel int8 or int4, activations
  int8 per-tensor. TensorRT's int4 is weight-only; here the activations of an int4-weight layer stay int8 (W4A8),
  which the TensorRT adapter exports as int4 weight Q/DQ with int8 activation Q/DQ.
* ``qnn`` (Qualcomm HTP via QNN/AIMET): weights 4- or 8-bit symmetric, per-channel or per-tensor; activations 8-bit
  asymmetric per-tensor. HTP also runs 16-bit activations, which lie outside the 2..8-bit space.
* ``openvino`` (OpenVINO CPU plugin, INT8 kernels): weights 8-bit symmetric, per-channel or per-tensor; activations
  8-bit per-tensor, unsigned with any zero point or symmetric (`eqnet_plugin.adapters.openvino`).
* ``brevitas`` (Brevitas / FINN): the whole space, ``ElasticSpace()``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..quant.space import ElasticSpace

__all__ = ["BackendProfile", "PROFILES", "get_profile"]


@dataclass(frozen=True)
class BackendProfile:
    """What one deployment target runs: a name and the `ElasticSpace` of the cells it runs.

    Args:
        name: a label (stored in search results).
        space: the bit-widths, symmetries and granularities the target runs (its ``fixed_bits`` is not used).

    Example:
        >>> BackendProfile("my_npu", ElasticSpace(weight_bits=(4, 8), act_bits=(8,), act_symmetric=(False,))).name
        'my_npu'
    """

    name: str
    space: ElasticSpace

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"BackendProfile name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.space, ElasticSpace):
            raise ValueError(f"BackendProfile {self.name!r}: space must be an ElasticSpace, e.g. "
                             f"ElasticSpace(weight_bits=(4, 8), act_bits=(8,)); got {self.space!r}")

    def to_dict(self) -> dict:
        space = self.space.to_dict()
        del space["fixed_bits"]
        return {"name": self.name, **space}


PROFILES: dict[str, BackendProfile] = {
    "tensorrt": BackendProfile("tensorrt", ElasticSpace(weight_bits=(4, 8), act_bits=(8,), weight_symmetric=(True,),
                                                        act_symmetric=(True,), weight_per_channel=(True,),
                                                        fixed_bits=None)),
    "qnn": BackendProfile("qnn", ElasticSpace(weight_bits=(4, 8), act_bits=(8,), weight_symmetric=(True,),
                                              act_symmetric=(False,), weight_per_channel=(True, False),
                                              fixed_bits=None)),
    "openvino": BackendProfile("openvino", ElasticSpace(weight_bits=(8,), act_bits=(8,), weight_symmetric=(True,),
                                                        act_symmetric=(True, False), weight_per_channel=(True, False),
                                                        fixed_bits=None)),
    "brevitas": BackendProfile("brevitas", ElasticSpace(fixed_bits=None)),
}


def get_profile(profile: str | BackendProfile | None) -> BackendProfile | None:
    """A profile by name (``"tensorrt"``, ``"qnn"``, ``"openvino"``, ``"brevitas"``), a `BackendProfile` as is,
    or None.

    Raises:
        ValueError: unknown name.
    """
    if profile is None or isinstance(profile, BackendProfile):
        return profile
    if isinstance(profile, str) and profile.lower() in PROFILES:
        return PROFILES[profile.lower()]
    raise ValueError(f"unknown backend profile {profile!r}; use one of {sorted(PROFILES)} or a "
                     "BackendProfile(name, ElasticSpace(weight_bits=..., act_bits=..., ...))")
