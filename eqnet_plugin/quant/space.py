"""The elastic search space and one policy drawn from it.

`ElasticSpace` says which bit-widths, symmetries and granularities a supernet may use; `QuantChoice` (an unbound
`Grid`) is one quantizer group's setting; `SubnetConfig` maps every group of a supernet to its `QuantChoice` and
serializes to versioned JSON. Strings are parsed once here (JSON, CLI); everything inside the library uses these
typed values.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..files import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from .grid import MAX_BITS, MIN_BITS, Grid, Scheme

__all__ = ["ElasticSpace", "QuantChoice", "SubnetConfig", "Grid", "Scheme", "CONFIG_VERSION", "MIN_BITS",
           "MAX_BITS"]

CONFIG_VERSION = 1


def _check_bits(name: str, bits: Iterable[int]) -> tuple[int, ...]:
    bits = tuple(bits)
    if not bits:
        raise ValueError(f"ElasticSpace.{name} is empty; give at least one bit-width, e.g. {name}=(4, 8)")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(
                f"ElasticSpace.{name} holds {b!r}; bit-widths must be integers in [{MIN_BITS}, {MAX_BITS}]")
    return tuple(sorted(set(bits)))


def _check_flags(name: str, flags: Iterable[bool]) -> tuple[bool, ...]:
    flags = tuple(flags)
    if not flags or any(not isinstance(f, bool) for f in flags):
        raise ValueError(f"ElasticSpace.{name} must be a non-empty tuple of bools, e.g. (True, False); got {flags!r}")
    return tuple(sorted(set(flags), reverse=True))


@dataclass(frozen=True)
class ElasticSpace:
    """Which subnets a supernet contains.

    Args:
        weight_bits: bit-widths a weight quantizer may take (2..8).
        act_bits: bit-widths an activation quantizer may take (2..8).
        weight_symmetric: allowed weight symmetries (True = symmetric, zero point 0).
        act_symmetric: allowed activation symmetries.
        weight_per_channel: allowed weight granularities (True = per output channel). Activations are per-tensor.
        fixed_bits: bit-width kept for the first and last layers (weights and input activations) and for
            activation quantizers that feed no layer (the model output). ``None`` makes them elastic too.

    Example:
        >>> ElasticSpace(weight_bits=(4, 8), act_bits=(8,)).weight_bits
        (4, 8)
    """

    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    act_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    weight_symmetric: tuple[bool, ...] = (True, False)
    act_symmetric: tuple[bool, ...] = (True, False)
    weight_per_channel: tuple[bool, ...] = (True, False)
    fixed_bits: int | None = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_bits", _check_bits("weight_bits", self.weight_bits))
        object.__setattr__(self, "act_bits", _check_bits("act_bits", self.act_bits))
        for name in ("weight_symmetric", "act_symmetric", "weight_per_channel"):
            object.__setattr__(self, name, _check_flags(name, getattr(self, name)))
        if self.fixed_bits is not None:
            _check_bits("fixed_bits", (self.fixed_bits,))

    def cell_bits(self, is_weight: bool) -> tuple[int, ...]:
        """Bit-widths a quantizer must hold a cell for: the space's plus `fixed_bits`."""
        bits = set(self.weight_bits if is_weight else self.act_bits)
        if self.fixed_bits is not None:
            bits.add(self.fixed_bits)
        return tuple(sorted(bits))

    def to_dict(self) -> dict:
        return {
            "weight_bits": list(self.weight_bits), "act_bits": list(self.act_bits),
            "weight_symmetric": list(self.weight_symmetric), "act_symmetric": list(self.act_symmetric),
            "weight_per_channel": list(self.weight_per_channel), "fixed_bits": self.fixed_bits,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ElasticSpace":
        known = {"weight_bits", "act_bits", "weight_symmetric", "act_symmetric", "weight_per_channel", "fixed_bits"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ElasticSpace keys {sorted(unknown)}; valid keys are {sorted(known)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


QuantChoice = Grid
"""One quantizer group's setting: bit-width, symmetry and (weights only) per-channel granularity, i.e. an unbound
`Grid` (``signed`` None: the quantizer binds it)."""


@dataclass(frozen=True)
class SubnetConfig:
    """A mixed-precision policy: one `QuantChoice` per quantizer group, keyed by the group's name.

    Serializes as ``{"version": 1, "groups": {name: {"bits": .., "symmetric": .., "per_channel": ..}}}``.
    Checking it against a particular model (missing/extra groups, bits outside the space) is
    `Supernet.validate`'s job; this class checks only the format.
    """

    groups: Mapping[str, QuantChoice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = dict(self.groups)
        for k, v in groups.items():
            if not isinstance(k, str):
                raise ValueError(f"group names must be strings, got {k!r}")
            if not isinstance(v, QuantChoice):
                raise ValueError(f"group {k!r} maps to {v!r}; expected a QuantChoice")
            if v.signed is not None:
                raise ValueError(f"group {k!r} maps to {v!r}, a bound grid; a SubnetConfig holds choices with "
                                 "signed=None (the quantizer binds it): use grid.replace(signed=None)")
        object.__setattr__(self, "groups", dict(sorted(groups.items())))

    def __getitem__(self, name: str) -> QuantChoice:
        return self.groups[name]

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __hash__(self) -> int:
        return hash(tuple(self.groups.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, SubnetConfig) and self.groups == other.groups

    def replace(self, **changes: QuantChoice) -> "SubnetConfig":
        """A copy with some groups changed: ``cfg.replace(**{"fc.weight_fake_quant": QuantChoice(8)})``."""
        return SubnetConfig({**self.groups, **changes})

    # --- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": CONFIG_VERSION, "groups": {k: v.to_dict() for k, v in self.groups.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SubnetConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"a SubnetConfig must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != CONFIG_VERSION:
            raise ValueError(f"SubnetConfig version {version!r} is not supported; this eqnet_plugin reads version "
                             f"{CONFIG_VERSION} (write the file with SubnetConfig.to_json of a matching release)")
        unknown = set(d) - {"version", "groups", "meta"}
        if unknown:
            raise ValueError(f"unknown SubnetConfig keys {sorted(unknown)}; valid keys are version, groups, meta")
        groups = d.get("groups")
        if not isinstance(groups, Mapping):
            raise ValueError("SubnetConfig 'groups' must be an object mapping group name -> {bits, symmetric, "
                             "per_channel}")
        return cls({k: QuantChoice.from_dict(v, where=f"groups[{k!r}]") for k, v in groups.items()})

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        """Return the JSON text; when `path` is given also write it atomically (temp file + rename)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "SubnetConfig":
        """Load from a file path or a JSON string."""
        s = os.fspath(path_or_text)
        if s.lstrip().startswith("{"):
            text, where = s, "<string>"
        else:
            if not os.path.exists(s):
                raise FileNotFoundError(f"SubnetConfig file {s!r} does not exist")
            with open(s) as f:
                text, where = f.read(), s
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e}); a SubnetConfig file is written by "
                             "SubnetConfig.to_json") from None
        return cls.from_dict(d)

    # --- summaries ------------------------------------------------------------------------------------------
    def scheme(self, names: Iterable[str] | None = None) -> tuple[set, set]:
        """The sets of symmetry and per-channel flags used (by `names`, default all groups)."""
        names = self.groups if names is None else names
        return ({self.groups[n].symmetric for n in names}, {self.groups[n].per_channel for n in names})
