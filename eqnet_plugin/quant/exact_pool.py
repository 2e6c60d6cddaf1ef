"""Global average pooling whose result does not depend on the summation order (device, kernel, runtime).

torch.ao re-quantizes an average pool's output on its input's grid (one shared fake-quant). The pooled value of a
quantized tensor is ``s * (sum of n codes) / n``, which sits exactly on a rounding tie of that grid whenever the sum
of codes is an odd multiple of n/2 (about 1 pooled value in n for even n).
A float32 mean lands a few ulps on either side of such a tie depending on the summation order, so torch (CPU or
CUDA) and ONNX Runtime round it to different codes; at 4 bits one flipped pooled code moves the logits by many
output LSBs (docs/design.md, section 7, has the measured effect on ONNX Runtime parity).

Here the sum accumulates in float64. The inputs are fake-quantized float32 values (integer multiples of the
smallest one's ulp, at most 2^8 times apart), so the float64 sum is exact in any order for any realistic n
(< 2^20), and ``float32(sum / n)`` is the same number on every device and in the exported ONNX graph
(Cast -> ReduceSum -> Div -> Cast, which ONNX Runtime also sums exactly).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["exact_global_avg_pool", "ExactGlobalAvgPool", "use_exact_global_pools"]


def exact_global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim after the first two, keepdims: (N, C, *S) -> (N, C, 1, ..., 1), summed in float64.

    Devices without float64 (MPS) fall back to the plain mean. Differentiable (the gradient is the usual g / n).
    """
    dims = list(range(2, x.dim()))                        # written so that torch.jit.script accepts it
    if x.device.type == "mps":
        return x.mean(dims, keepdim=True)
    n = 1
    for size in x.shape[2:]:
        n *= size
    return torch.sum(x, dims, keepdim=True, dtype=torch.float64).div(n).to(x.dtype)


class ExactGlobalAvgPool(nn.Module):
    """Drop-in for ``nn.AdaptiveAvgPool{1,2,3}d(1)`` computing `exact_global_avg_pool`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exact_global_avg_pool(x)


def _is_global(output_size) -> bool:
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    return all(s == 1 for s in sizes)


_ADAPTIVE_FNS = (nn.functional.adaptive_avg_pool1d, nn.functional.adaptive_avg_pool2d,
                 nn.functional.adaptive_avg_pool3d, torch.adaptive_avg_pool1d)


def use_exact_global_pools(gm: torch.fx.GraphModule) -> list[str]:
    """Replace, in place, every global average pool of `gm` (``nn.AdaptiveAvgPool*d(1)`` modules and
    ``F.adaptive_avg_pool*d(x, 1)`` calls) by `ExactGlobalAvgPool`. Fake-quant placement is untouched.

    Returns the names of the replaced nodes (empty when there is nothing to do; calling it twice is a no-op).
    """
    replaced = []
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):          # bounded: one pass over a snapshot of the nodes
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.pooling._AdaptiveAvgPoolNd):
            if not _is_global(modules[node.target].output_size):
                continue
            parent, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, ExactGlobalAvgPool())
            replaced.append(node.name)
        elif node.op == "call_function" and node.target in _ADAPTIVE_FNS:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if _is_global(size):
                node.target, node.args, node.kwargs = exact_global_avg_pool, (node.args[0],), {}
                replaced.append(node.name)
    if replaced:
        gm.recompile()
    return replaced
