"""`SubnetOptimizer`: one optimizer state per sandwich subnet, so that each subnet's gradient takes its own step.

`sandwich_step` runs three subnets per step (H: the widest, R: a random one, L: the narrowest) and sums their
gradients. With one Adam over that sum, Adam's per-coordinate normalization is shared: the subnet with the largest
gradient sets every weight's step size, and the others move the weights by a fraction of the learning rate. When
L's gradient is larger than H's, the widest subnet, which needs the least change from the float start, is trained
with a smaller effective learning rate than the recipe's, while the narrow subnets pull the shared weights their
way. (Plain SGD has no such coupling: the summed step is the sum of each subnet's step.)

`SubnetOptimizer` keeps one inner optimizer (and so one Adam state) per subnet. `sandwich_step` hands it each
subnet's gradient separately (`stash`, no copy: the gradient tensors change hands), then each inner optimizer takes
its step with its own moments, at the learning rate the outer optimizer's param groups hold (LR schedulers drive
the outer one, as with any optimizer). Gradient clipping and DDP's all-reduce apply per subnet.

Cost: the inner optimizers' states (Adam: two tensors per parameter each, so three Adams hold 6x the parameters'
memory instead of 2x) and three optimizer steps per training step instead of one.

Outside a sandwich step (e.g. `qat_step`, or a plain ``loss.backward(); opt.step()``) it is an ordinary optimizer:
the whole gradient goes to the first inner optimizer.

Example:
    >>> opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=1e-3)       # doctest: +SKIP
    >>> train_supernet(sn, loader, opt, TrainConfig(epochs), scheduler=cosine_scheduler(opt, steps))  # doctest: +SKIP
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch

__all__ = ["SubnetOptimizer"]


class SubnetOptimizer(torch.optim.Optimizer):
    """One inner optimizer per sandwich subnet (H, R, L), stepped on that subnet's gradient only.

    Args:
        params: parameters or param groups, as for any `torch.optim.Optimizer`.
        optimizer_class: the inner optimizer (default `torch.optim.Adam`); it must accept ``(param_groups,
            **kwargs)``.
        subnets: number of inner optimizers (3: the sandwich's H, R and L).
        **kwargs: the inner optimizer's defaults (``lr=1e-3``, ``betas=``, ``weight_decay=`` ...).

    The outer param groups hold the hyperparameters: an LR scheduler (or the user) changes ``param_groups[i]["lr"]``
    here, and every inner optimizer takes the value at its next step.
    """

    def __init__(self, params, optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
                 subnets: int = 3, **kwargs) -> None:
        if not isinstance(subnets, int) or subnets < 1:
            raise ValueError(f"subnets={subnets!r}: give the number of subnets per step (3 for the sandwich)")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer class (e.g. torch.optim.Adam), got "
                            f"{optimizer_class!r}")
        if optimizer_class is SubnetOptimizer:
            raise TypeError("optimizer_class cannot be SubnetOptimizer itself; pass the inner class, e.g. "
                            "torch.optim.Adam")
        self._inner: list[torch.optim.Optimizer] = []
        super().__init__(params, dict(kwargs))
        groups = [self._inner_group(g) for g in self.param_groups]
        self._inner = [optimizer_class([dict(g) for g in groups], **kwargs) for _ in range(subnets)]
        self._stash: dict[int, dict[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _inner_group(group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params"} | {"params": group["params"]}

    @property
    def subnets(self) -> int:
        return len(self._inner)

    @property
    def inner(self) -> tuple[torch.optim.Optimizer, ...]:
        """The inner optimizers, one per subnet (read-only view; their states are the ones checkpoints save)."""
        return tuple(self._inner)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for o in self._inner:                    # empty while __init__ builds the outer groups
            o.add_param_group(self._inner_group(self.param_groups[-1]))

    def _params(self) -> Iterator[torch.Tensor]:
        for g in self.param_groups:
            yield from g["params"]

    # --- the sandwich step's protocol ------------------------------------------------------------------------
    def stash(self, subnet: int) -> None:
        """Take the gradients accumulated so far as `subnet`'s and clear ``.grad`` for the next subnet's backward
        (no copy). A subnet stashed twice in one step accumulates."""
        if not 0 <= subnet < self.subnets:
            raise IndexError(f"subnet {subnet} out of range for {self.subnets} subnets")
        mine = self._stash.setdefault(subnet, {})
        for p in self._params():
            if p.grad is not None:
                mine[p] = mine[p] + p.grad if p in mine else p.grad
                p.grad = None

    def stashed(self) -> bool:
        return bool(self._stash)

    def _load(self, grads: dict) -> None:
        for p in self._params():
            p.grad = grads.get(p)

    def step_subnet(self, subnet: int) -> None:
        """One step of `subnet`'s inner optimizer on the current ``.grad``, with the outer groups' hyperparameters."""
        inner = self._inner[subnet]
        for og, ig in zip(self.param_groups, inner.param_groups):
            for k, v in og.items():
                if k != "params":
                    ig[k] = v
        inner.step()

    # --- torch.optim.Optimizer ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, prepare: Callable[[], None] | None = None):
        """Outside a sandwich step: the whole gradient to the first inner optimizer. After `stash`: every stashed
        subnet's step, each on its own gradient. `prepare()` runs once per subnet with that subnet's gradient in
        ``.grad`` before any parameter moves (`sandwich_step` all-reduces and clips there), so an error raised in
        it leaves every parameter and optimizer state as it was."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._stash:
            if prepare is not None:
                prepare()
            self.step_subnet(0)
            return loss
        if any(p.grad is not None for p in self._params()):
            raise RuntimeError("SubnetOptimizer.step: gradients were stashed and new ones accumulated since; "
                               "stash them to a subnet first (optimizer.stash(i))")
        stash, self._stash = self._stash, {}
        ready = {}
        try:
            for i in sorted(stash):
                self._load(stash[i])
                if prepare is not None:
                    prepare()
                ready[i] = {p: p.grad for p in self._params() if p.grad is not None}
            for i in sorted(ready):
                self._load(ready[i])
                self.step_subnet(i)
        finally:
            self._load({})
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._stash = {}
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"outer": super().state_dict(), "subnets": [o.state_dict() for o in self._inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A SubnetOptimizer's state, or a plain optimizer's of the inner type (e.g. a checkpoint of a run with one
        shared Adam): then every subnet's state starts from that one."""
        if isinstance(state_dict, dict) and set(state_dict) == {"outer", "subnets"}:
            if len(state_dict["subnets"]) != self.subnets:
                raise ValueError(f"the state holds {len(state_dict['subnets'])} subnets' optimizers, this one has "
                                 f"{self.subnets}")
            outer, inner = state_dict["outer"], state_dict["subnets"]
        elif isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict):
            outer = {"state": {}, "param_groups": state_dict["param_groups"]}
            inner = [copy.deepcopy(state_dict) for _ in range(self.subnets)]    # torch keeps the tensors it loads
        else:
            raise ValueError("not an optimizer state_dict (expected SubnetOptimizer's 'outer' and 'subnets', or "
                             "a torch optimizer's 'state' and 'param_groups')")
        super().load_state_dict(outer)
        for o, s in zip(self._inner, inner):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return f"SubnetOptimizer({self.subnets} x {self._inner[0]!r})" if self._inner else "SubnetOptimizer()"
