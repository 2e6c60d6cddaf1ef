"""The data side of a supernet: batches as given by a loader, the model's device, statistics gathered over ranks."""
from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["batch_inputs", "device_of", "all_gather_fn"]


def batch_inputs(batch) -> torch.Tensor:
    """The input tensor of a batch that is either a tensor or an (inputs, targets, ...) tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a batch must be a tensor or an (inputs, targets) tuple, got {type(batch).__name__}")


def device_of(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer of `model` (CPU if it has none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def all_gather_fn():
    """A callable concatenating a 1-D tensor over all ranks, or None outside torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def gather(t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.numel()], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n)
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
    return gather
