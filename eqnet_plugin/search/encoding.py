"""Array form of deployable subnets: `SearchSpace` (per-group bit choices + global conditions).

A deployable subnet uses ONE quantization condition: weight granularity, weight symmetry and
activation symmetry are global; bit-widths are per group. The search works on two arrays:

* ``bits``: (N, G) integers, one column per quantizer group (every group of the supernet, `Supernet.groups` order;
  fixed groups hold their fixed bit-width);
* ``cond``: (N,) integers indexing `SearchSpace.conditions`.

`SearchSpace.decode` turns a row into a `SubnetConfig`; `encode` does the reverse (and rejects mixed schemes).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..quant.space import MAX_BITS, QuantChoice, SubnetConfig
from .profiles import BackendProfile, get_profile

__all__ = ["Condition", "SearchSpace", "SPREAD"]

SPREAD = 1.0            # default spread of sampled per-group bits around their target (`SearchSpace.sample_around`)


@dataclass(frozen=True)
class Condition:
    """The global quantization scheme of a deployable subnet (the CQAP's condition bits)."""

    per_channel: bool
    weight_symmetric: bool
    act_symmetric: bool

    def flags(self) -> tuple[bool, bool, bool]:
        return self.per_channel, self.weight_symmetric, self.act_symmetric


class SearchSpace:
    """Per-group bit choices and allowed conditions of one supernet (optionally under a backend profile).

    Args:
        group_names: every quantizer group (columns of ``bits``).
        is_weight: per group, True for weight quantizers.
        choices: per group, the allowed bit-widths (one value: a fixed group).
        conditions: the allowed global conditions.
        profile: the profile's name, for the record.

    Build it with `SearchSpace.from_supernet(supernet, profile)`.
    """

    def __init__(self, group_names: Sequence[str], is_weight: Sequence[bool], choices: Sequence[Sequence[int]],
                 conditions: Sequence[Condition], profile: str = "none") -> None:
        self.group_names = tuple(group_names)
        self.is_weight = np.asarray(is_weight, dtype=bool)                              # (G,)
        self.choices = tuple(tuple(sorted(set(int(b) for b in c))) for c in choices)
        self.conditions = tuple(conditions)
        self.profile = profile
        g = len(self.group_names)
        if not g or len(self.is_weight) != g or len(self.choices) != g:
            raise ValueError("group_names, is_weight and choices must be non-empty and of equal length")
        empty = [n for n, c in zip(self.group_names, self.choices) if not c]
        if empty or not self.conditions:
            raise ValueError(f"empty choices for groups {empty[:4]} or no condition")
        k = max(len(c) for c in self.choices)
        self.table = np.array([c + (c[-1],) * (k - len(c)) for c in self.choices], dtype=np.int64)  # (G, K)
        self.count = np.array([len(c) for c in self.choices], dtype=np.int64)                     # (G,)
        self.allowed = np.zeros((g, MAX_BITS + 1), dtype=bool)                                   # (G, 9)
        for i, c in enumerate(self.choices):
            self.allowed[i, list(c)] = True
        self.searchable = self.count > 1                                                         # (G,)
        self.cond_flags = np.array([c.flags() for c in self.conditions], dtype=bool)             # (C, 3)
        self._cond_index = {c: i for i, c in enumerate(self.conditions)}

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_supernet(cls, supernet, profile: str | BackendProfile | None = None) -> "SearchSpace":
        """The supernet's space intersected with `profile`'s space (None: the whole supernet space).

        Raises:
            ValueError: the intersection is empty for some group or condition (e.g. the space's fixed_bits is not a
                bit-width the profile runs), naming the group and the fix.
        """
        prof = get_profile(profile)
        space = supernet.space
        choices, is_weight = [], []
        for g, fq in supernet.groups.items():
            w = fq.is_weight
            bits = (space.fixed_bits,) if g in supernet.fixed_groups else (space.weight_bits if w else space.act_bits)
            if prof is not None:
                allowed = prof.space.weight_bits if w else prof.space.act_bits
                kept = tuple(b for b in bits if b in allowed)
                if not kept:
                    why = (f"it is fixed at fixed_bits={space.fixed_bits} (first/last layer or model output); build "
                           f"the space with ElasticSpace(fixed_bits={max(allowed)})") if g in supernet.fixed_groups \
                        else "change the ElasticSpace or the profile"
                    raise ValueError(f"backend profile {prof.name!r} allows {'weight' if w else 'activation'} bits "
                                     f"{allowed} but group {g!r} may only take {bits}: {why}")
                bits = kept
            choices.append(bits)
            is_weight.append(w)

        def both(what, ours):
            theirs = getattr(prof.space, what) if prof is not None else ours
            kept = tuple(f for f in ours if f in theirs)
            if not kept:
                raise ValueError(f"backend profile {prof.name!r} allows {what}={theirs} but the supernet's space has "
                                 f"{what}={ours}; train the supernet with a space that includes {theirs}")
            return kept
        conds = [Condition(pc, ws, as_) for pc, ws, as_ in itertools.product(
            both("weight_per_channel", space.weight_per_channel), both("weight_symmetric", space.weight_symmetric),
            both("act_symmetric", space.act_symmetric))]
        return cls(list(supernet.groups), is_weight, choices, conds, prof.name if prof is not None else "none")

    # --- arrays <-> configs ---------------------------------------------------------------------------------
    def flags(self, cond: np.ndarray) -> np.ndarray:
        """(N,) condition indices -> (N, 3) bools (per_channel, weight_symmetric, act_symmetric)."""
        return self.cond_flags[np.asarray(cond, dtype=np.int64)]

    def decode(self, bits_row: Sequence[int], cond: int) -> SubnetConfig:
        """One row of ``bits`` and its condition index -> SubnetConfig."""
        c = self.conditions[int(cond)]
        return SubnetConfig({
            g: QuantChoice(int(b), c.weight_symmetric, c.per_channel) if w else
            QuantChoice(int(b), c.act_symmetric, False)
            for g, w, b in zip(self.group_names, self.is_weight, bits_row)})

    def condition_of(self, cfg: SubnetConfig) -> Condition:
        """The global condition of `cfg`. Raises ValueError when its groups mix schemes."""
        w = [cfg.groups[g] for g, iw in zip(self.group_names, self.is_weight) if iw]
        a = [cfg.groups[g] for g, iw in zip(self.group_names, self.is_weight) if not iw]
        pcs, wsyms, asyms = {c.per_channel for c in w}, {c.symmetric for c in w}, {c.symmetric for c in a}
        if len(pcs) > 1 or len(wsyms) > 1 or len(asyms) > 1:
            raise ValueError("SubnetConfig mixes symmetry/granularity across groups; a deployable subnet uses one "
                             "scheme (build it with Supernet.uniform(...) or SearchSpace.decode)")
        default = self.conditions[0]
        return Condition(pcs.pop() if pcs else default.per_channel, wsyms.pop() if wsyms else default.weight_symmetric,
                         asyms.pop() if asyms else default.act_symmetric)

    def encode(self, cfg: SubnetConfig) -> tuple[np.ndarray, int]:
        """SubnetConfig -> ((G,) bits, condition index).

        Raises:
            ValueError: missing groups, a mixed scheme, or bits/condition outside this space (e.g. the profile).
        """
        missing = [g for g in self.group_names if g not in cfg.groups]
        if missing:
            raise ValueError(f"SubnetConfig misses groups {missing[:4]}; it belongs to another supernet")
        bits = np.array([cfg.groups[g].bits for g in self.group_names], dtype=np.int64)
        cond = self.condition_of(cfg)
        if cond not in self._cond_index:
            raise ValueError(f"condition {cond} is outside this search space (profile {self.profile!r}); allowed: "
                             f"{list(self.conditions)}")
        bad = [(g, int(b), c) for g, b, c in zip(self.group_names, bits, self.choices) if b not in c]
        if bad:
            g, b, c = bad[0]
            raise ValueError(f"group {g!r}: {b}-bit is outside this search space (profile {self.profile!r}); "
                             f"allowed: {c}")
        return bits, self._cond_index[cond]

    def contains(self, bits: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """(N,) bools: each row's bits are allowed for every group and its condition index is valid."""
        bits = np.asarray(bits, dtype=np.int64)
        cond = np.asarray(cond, dtype=np.int64)
        inside = (bits >= 0) & (bits <= MAX_BITS)
        if bits.ndim != 2 or bits.shape[1] != len(self.group_names):
            raise ValueError(f"bits must have shape (N, {len(self.group_names)}), got {bits.shape}")
        ok = self.allowed[np.arange(bits.shape[1])[None, :], np.clip(bits, 0, MAX_BITS)]      # (N, G)
        return (ok & inside).all(1) & (cond >= 0) & (cond < len(self.conditions))

    # --- sampling -------------------------------------------------------------------------------------------
    def min_bits(self) -> np.ndarray:
        """(G,) the narrowest allowed bits of every group."""
        return self.table[:, 0].copy()

    def max_bits(self) -> np.ndarray:
        """(G,) the widest allowed bits of every group."""
        return self.table[np.arange(len(self.count)), self.count - 1].copy()

    def uniform_random(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n subnets with every group's bits and the condition drawn uniformly: ((n, G) bits, (n,) cond)."""
        idx = (rng.random((n, len(self.count))) * self.count).astype(np.int64)          # (n, G)
        bits = self.table[np.arange(len(self.count))[None, :], idx]
        return bits, rng.integers(len(self.conditions), size=n)

    def sample_around(self, n: int, rng: np.random.Generator, spread: float = SPREAD) -> tuple[np.ndarray, np.ndarray]:
        """n subnets the paper's way: a target average bit-width is drawn uniformly (one for weights, one for
        activations), then each group's bits around it (probability ~ exp(-(b - target)^2 / (2 spread^2))).

        Returns:
            ((n, G) bits, (n,) condition indices drawn uniformly).
        """
        if spread <= 0:
            raise ValueError(f"spread must be > 0, got {spread}")
        lo_w, hi_w = self._range(True)
        lo_a, hi_a = self._range(False)
        t_w = rng.uniform(lo_w, hi_w, size=(n, 1))                                      # (n, 1)
        t_a = rng.uniform(lo_a, hi_a, size=(n, 1))
        target = np.where(self.is_weight[None, :], t_w, t_a)                            # (n, G)
        k = self.table.shape[1]
        valid = np.arange(k)[None, :] < self.count[:, None]                             # (G, K)
        logits = -((self.table[None] - target[..., None]) ** 2) / (2 * spread ** 2)    # (n, G, K)
        p = np.where(valid[None], np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
        cdf = np.cumsum(p, -1) / p.sum(-1, keepdims=True)
        idx = (rng.random((n, len(self.count), 1)) > cdf).sum(-1)                        # (n, G)
        idx = np.minimum(idx, self.count[None, :] - 1)
        bits = self.table[np.arange(len(self.count))[None, :], idx]
        return bits, rng.integers(len(self.conditions), size=n)

    def _range(self, weight: bool) -> tuple[float, float]:
        sel = self.is_weight == weight
        if not sel.any():
            return 8.0, 8.0
        return float(self.table[sel, 0].min()), float(self.max_bits()[sel].max())

    def to_dict(self) -> dict:
        return {"groups": list(self.group_names), "is_weight": self.is_weight.tolist(),
                "choices": [list(c) for c in self.choices], "profile": self.profile,
                "conditions": [list(c.flags()) for c in self.conditions]}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        return cls(d["groups"], d["is_weight"], d["choices"], [Condition(*map(bool, c)) for c in d["conditions"]],
                   d["profile"])

    def __repr__(self) -> str:
        return (f"SearchSpace({len(self.group_names)} groups, {int(self.searchable.sum())} searchable, "
                f"{len(self.conditions)} conditions, profile={self.profile!r})")
