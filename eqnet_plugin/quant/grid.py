"""The integer grid of a quantizer, and the named uniform schemes.

`Grid` is the one description of a grid that the elastic space (`QuantChoice` is `Grid`), the quantizer
(`ElasticFakeQuantize.grid`, `grid_search_qparams`) and the export IR (`QParams.grid`) share: a bit-width, a
symmetry (zero point fixed), a granularity (per output channel or per tensor) and, once known, a signedness.

A subnet's choice for a quantizer group leaves ``signed`` unset (None): weights are always signed, and an
activation's signedness is found by calibration, so the quantizer binds it. A bound grid (``signed`` True or False)
has an integer range, `qmin` / `qmax`.

`Scheme` names the six uniform schemes of the command line (``"sym"``, ``"sym-pc"``, ...): parse a string once with
`Scheme.parse`, then use the enum.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Mapping

__all__ = ["Grid", "Scheme", "int_range", "MIN_BITS", "MAX_BITS"]

MIN_BITS, MAX_BITS = 2, 8


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid of a `bits`-wide quantizer: [-2^(b-1), 2^(b-1)-1] when signed, else [0, 2^b-1]."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


_KEYS = ("bits", "symmetric", "per_channel", "signed")


@dataclass(frozen=True)
class Grid:
    """An integer quantization grid.

    Args:
        bits: bit-width, an integer in [2, 8].
        symmetric: the zero point is fixed (0 on the signed grid); False: a learned zero point.
        per_channel: one scale (and zero point) per output channel; False: one per tensor.
        signed: the integer range is [-2^(b-1), 2^(b-1)-1] (True) or [0, 2^b-1] (False); None (a subnet's choice):
            not bound yet, the quantizer decides.

    Example:
        >>> Grid(4, symmetric=True, per_channel=True, signed=True).int_range
        (-8, 7)
    """

    bits: int
    symmetric: bool = True
    per_channel: bool = False
    signed: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits={self.bits!r} is invalid; use an integer in [{MIN_BITS}, {MAX_BITS}]")
        for name in ("symmetric", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool (true/false in JSON)")
        if self.signed is not None and not isinstance(self.signed, bool):
            raise ValueError(f"signed={self.signed!r} must be True, False or None (not bound yet)")

    # --- the integer range ----------------------------------------------------------------------------------
    @property
    def int_range(self) -> tuple[int, int]:
        """(qmin, qmax). Raises ValueError when `signed` is not bound."""
        if self.signed is None:
            raise ValueError(f"{self!r} has no integer range: signed is not bound; use grid.bind(signed=...) (the "
                             "quantizer binds it: weights signed, activations from calibration)")
        return int_range(self.bits, self.signed)

    @property
    def qmin(self) -> int:
        return self.int_range[0]

    @property
    def qmax(self) -> int:
        return self.int_range[1]

    def bind(self, signed: bool) -> "Grid":
        """This grid with its signedness set."""
        return dataclasses.replace(self, signed=signed)

    def replace(self, **changes) -> "Grid":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # --- serialization (a subnet's JSON: bits, symmetric, per_channel; signed only when bound) ---------------
    def to_dict(self) -> dict:
        d = {"bits": self.bits, "symmetric": self.symmetric, "per_channel": self.per_channel}
        if self.signed is not None:
            d["signed"] = self.signed
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> "Grid":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected an object like {{'bits': 4, 'symmetric': true, "
                             f"'per_channel': false}}, got {d!r}")
        unknown = set(d) - set(_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid keys are {', '.join(_KEYS)}")
        if "bits" not in d:
            raise ValueError(f"{where}: missing 'bits'")
        try:
            return cls(d["bits"], d.get("symmetric", True), d.get("per_channel", False), d.get("signed"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


class Scheme(enum.Enum):
    """A uniform quantization scheme: weight symmetry and granularity, activation symmetry (activations are
    per-tensor). The values are the command-line names.

    Example:
        >>> Scheme.parse("sym-pc").weight_grid(4)
        Grid(bits=4, symmetric=True, per_channel=True, signed=None)
    """

    SYM = "sym"
    SYM_PC = "sym-pc"
    ASYM = "asym"
    ASYM_PC = "asym-pc"
    WSYM_AASYM = "wsym-aasym"
    WSYM_PC_AASYM = "wsym-pc-aasym"

    @property
    def weight_symmetric(self) -> bool:
        return self in (Scheme.SYM, Scheme.SYM_PC, Scheme.WSYM_AASYM, Scheme.WSYM_PC_AASYM)

    @property
    def per_channel(self) -> bool:
        return self in (Scheme.SYM_PC, Scheme.ASYM_PC, Scheme.WSYM_PC_AASYM)

    @property
    def act_symmetric(self) -> bool:
        return self in (Scheme.SYM, Scheme.SYM_PC)

    def weight_grid(self, bits: int) -> Grid:
        """The (unbound) grid of a weight quantizer at `bits` under this scheme."""
        return Grid(bits, self.weight_symmetric, self.per_channel)

    def act_grid(self, bits: int) -> Grid:
        """The (unbound) grid of an activation quantizer at `bits` under this scheme (always per-tensor)."""
        return Grid(bits, self.act_symmetric, False)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The command-line names, in declaration order."""
        return tuple(s.value for s in cls)

    @classmethod
    def parse(cls, text: "str | Scheme") -> "Scheme":
        """A scheme from its name (case-insensitive); a `Scheme` is returned as is.

        Raises:
            ValueError: unknown name, naming the valid ones.
        """
        if isinstance(text, Scheme):
            return text
        if isinstance(text, str):
            try:
                return cls(text.strip().lower())
            except ValueError:
                pass
        raise ValueError(f"unknown scheme {text!r}; choose one of {', '.join(cls.names())}")

    def __str__(self) -> str:
        return self.value
