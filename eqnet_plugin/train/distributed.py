"""torch.distributed helpers for supernet training: one subnet per step on every rank, averaged
gradients, rank-0 writes. Every function is a no-op (or the trivial answer) outside an initialized process group,
so the same training code runs with and without `torchrun`.

Why gradients are averaged here and not by DDP's reducer: a sandwich step runs three forward/backward passes
(H, R, L, each freed by its own backward) and one optimizer step, and the cells no subnet used get no gradient.
DDP's reducer synchronizes once per backward and expects every parameter to become ready exactly once per
forward, unless `find_unused_parameters` walks the graph each step. `sandwich_step` therefore runs the passes under
`ddp.no_sync()` and then calls `all_reduce_gradients` once: every rank sampled the same subnets, so the same
parameters have gradients everywhere (checked); the parameters without one keep `grad=None` and the optimizer
leaves them alone. The result equals DDP's average of the summed gradients, with one all-reduce per step. With a
`SubnetOptimizer` each subnet's gradient is averaged on its own (three all-reduces per step), before any
parameter moves.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "shared_generator", "all_reduce_gradients",
           "broadcast_buffers", "RankMismatchError"]


class RankMismatchError(RuntimeError):
    """Ranks disagree about which parameters have gradients: they trained different subnets."""


def is_distributed(group=None) -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and outside torch.distributed): the process that writes checkpoints and reports."""
    return rank() == 0


def _comm_device(group=None) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def shared_generator(seed: int = 0, group=None) -> torch.Generator:
    """A CPU `torch.Generator` seeded identically on every rank (rank 0's `seed` is broadcast), for sampling the
    same subnets everywhere: ``sandwich_step(..., generator=shared_generator(seed))``."""
    seed = int(seed)
    if is_distributed(group):
        t = torch.tensor([seed], dtype=torch.int64, device=_comm_device(group))
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        seed = int(t.item())
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def all_reduce_gradients(params: Iterable[nn.Parameter], group=None, check: bool = True) -> None:
    """Average `.grad` over the ranks, in place, for the parameters that have one (one flat all-reduce per dtype).

    Parameters whose grad is None on every rank keep None. With `check`, a first small all-reduce verifies that
    all ranks have gradients for the same parameters (one host synchronization).

    Raises:
        RankMismatchError: a parameter has a gradient on some ranks and not on others (the ranks sampled
            different subnets: seed the sampling generator identically, e.g. with `shared_generator`).
    """
    if not is_distributed(group):
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    n = dist.get_world_size(group)
    if check:
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(present, group=group)
        bad = [i for i, c in enumerate(present.tolist()) if c not in (0, n)]
        if bad:
            raise RankMismatchError(f"{len(bad)} parameters have gradients on only some ranks: the ranks trained "
                                    "different subnets. Pass the same generator seed on every rank "
                                    "(eqnet_plugin.train.distributed.shared_generator) to sandwich_step")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(n)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, group=None, src: int = 0, skip: tuple[type, ...] = ()) -> None:
    """Copy rank `src`'s buffers (BatchNorm statistics, ...) to every rank, as DDP's `broadcast_buffers` does,
    skipping the buffers of submodules of the types in `skip`."""
    if not is_distributed(group):
        return
    skipped = {id(b) for m in module.modules() if isinstance(m, skip) for b in m.buffers(recurse=False)}
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        if id(b) not in skipped:
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()
