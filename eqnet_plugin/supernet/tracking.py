"""The two small objects a `Supernet` hands out: the forward pre-hook that tracks what the BatchNorm buffers hold,
and the context manager `Supernet.activate` returns."""
from __future__ import annotations

import warnings
import weakref

from ..quant.space import SubnetConfig

__all__ = ["BnTracker", "Activation"]


class BnTracker:
    """The Supernet's forward pre-hook on its model. Holds the Supernet weakly; copies (deepcopy, pickle) of the
    model carry an inert tracker, so frozen and converted copies never report to the original."""

    def __init__(self, supernet: "Supernet") -> None:
        self._ref = weakref.ref(supernet)

    def __call__(self, module, args):
        sn = self._ref() if self._ref is not None else None
        if sn is not None:
            sn._on_forward(module, args)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._ref = None


class Activation:
    """What `Supernet.activate` returns: a context manager that switches to a subnet for its block."""

    def __init__(self, supernet: "Supernet", cfg: SubnetConfig) -> None:
        self._sn, self.cfg, self._state, self._entered = supernet, cfg, None, False

    def __enter__(self) -> SubnetConfig:
        self._entered = True
        self._state = self._sn._enter(self.cfg)
        return self.cfg

    def __exit__(self, *exc) -> None:
        state, self._state = self._state, None
        self._sn._exit(self.cfg, state)

    def __del__(self) -> None:
        if not self._entered:
            warnings.warn("Supernet.activate(cfg) switched nothing: use it as `with sn.activate(cfg): ...`, or "
                          "call sn.apply(cfg) to switch for good", stacklevel=2)
