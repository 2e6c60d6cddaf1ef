"""Pure quantizer math: integer ranges, LSQ fake quantization with learnable scale and zero point, and the
calibration grid search. One source of truth for every range used by the modules and the exporters.

Conventions (DESIGN section 4):
  q = clamp(round(x / s) + z, qmin, qmax),  x_hat = (q - z) * s
computed as ``x * (1 / s)`` so that it matches torch's fake-quant kernels and the decomposed reference ops bit for bit.
"""
from __future__ import annotations

import math

import torch

__all__ = ["int_range", "lsq_grad_factor", "fake_quantize", "fake_quantize_reference", "grid_search_qparams",
           "CALIBRATION_NORM", "EPS"]

EPS = 2.0 ** -20          # smallest scale a quantizer may use
CALIBRATION_NORM = 2.4    # the paper's |x - Q(x)|^p calibration loss


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid of a `bits`-wide quantizer: [-2^(b-1), 2^(b-1)-1] when signed, else [0, 2^b-1]."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def lsq_grad_factor(numel: int, qmax_positive: int) -> float:
    """LSQ gradient scale 1/sqrt(N * Qp) for a scale that covers `numel` values."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax_positive, 1))


class _LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with straight-through rounding and LSQ+ gradients for scale and zero point.

    scale and zero_point broadcast against x (shape (1,) per-tensor, (C, 1, ...) per-channel). The zero point is
    rounded (and clamped into the grid) in the forward pass; its gradient is the straight-through one.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        z = torch.clamp(torch.round(zero_point), qmin, qmax)
        xs = x * (1.0 / scale)
        r = torch.round(xs)
        q = r + z
        mask = (q >= qmin) & (q <= qmax)
        qc = torch.clamp(q, qmin, qmax)
        out = (qc - z) * scale
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # d x_hat / d s: round(x/s) - x/s inside the grid, (qmin|qmax) - z outside (LSQ+).
            ds = torch.where(mask, r - xs, qc - z)
            ctx.save_for_backward(mask, ds, scale)
        else:
            ctx.save_for_backward(mask, None, scale)
        ctx.grad_factor = grad_factor
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        mask, ds, scale = ctx.saved_tensors
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if ds is not None:
            gx = grad * mask if grad_x is None else grad_x
            if ctx.needs_input_grad[1]:
                grad_s = _reduce_to(grad * ds, scale.shape) * ctx.grad_factor
            if ctx.needs_input_grad[2]:
                # d x_hat / d z: 0 inside the grid, -s outside.
                grad_z = -_reduce_to(grad - gx, scale.shape) * scale * ctx.grad_factor
        return grad_x, grad_s, grad_z, None, None, None


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `t` down to a broadcast-compatible `shape` (the reverse of broadcasting)."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t.reshape(shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization of `x` (see module docstring).

    Args:
        x: input tensor.
        scale: positive scale, broadcastable to `x` (per-tensor: shape (1,); per-channel on axis 0: (C, 1, 1, 1)).
        zero_point: float zero point of the same shape as `scale`; rounded and clamped to [qmin, qmax].
        qmin, qmax: the integer grid, usually from `int_range`.
        grad_factor: multiplier of the scale and zero-point gradients (LSQ: `lsq_grad_factor`).
    """
    return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def fake_quantize_reference(x: float, scale: float, zero_point: float, qmin: int, qmax: int
                            ) -> tuple[float, float, float, float]:
    """Scalar pure-Python reference: (x_hat, d x_hat/dx, d x_hat/ds, d x_hat/dz), in float32 arithmetic order.

    Used by the property tests; slow by design.
    """
    import numpy as np

    f32 = np.float32
    x, s = f32(x), f32(scale)
    z = min(max(float(np.round(f32(zero_point))), qmin), qmax)
    xs = f32(x * f32(f32(1.0) / s))
    r = float(np.round(xs))  # numpy rounds half to even, like torch
    q = r + z
    inside = qmin <= q <= qmax
    qc = min(max(q, qmin), qmax)
    out = float(f32(f32(qc - z) * s))
    if inside:
        return out, 1.0, float(f32(r - xs)), 0.0
    return out, 0.0, float(qc - z), -float(s)


@torch.no_grad()
def grid_search_qparams(x: torch.Tensor, bits: int, signed: bool, symmetric: bool, per_channel: bool,
                        num_candidates: int = 24, refine: int = 12, min_ratio: float = 0.1,
                        norm: float = CALIBRATION_NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (scale, zero_point) for one cell: the clipping ratio minimizing mean |x - Q(x)|^norm (the paper's
    calibration). `x` is (C, N) for per-channel (one row a channel) and flattened otherwise.

    The ratio of the data range that the grid covers is searched coarse-to-fine: `num_candidates` ratios in
    [min_ratio, 1], then `refine` ratios around the best one per channel. The grid is [qmin, qmax] =
    `int_range(bits, signed)`; symmetric cells fix the zero point at 0. Returns float tensors of shape (C,).
    """
    x = x.detach().float()
    x = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    qmin, qmax = int_range(bits, signed)
    lo = x.amin(dim=1).clamp(max=0.0)                                   # (C,)
    hi = x.amax(dim=1).clamp(min=0.0)

    def evaluate(ratios: torch.Tensor):                                # ratios (K, C)
        if symmetric:
            s = (torch.maximum(-lo, hi) * ratios / qmax).clamp(min=EPS)
            z = torch.zeros_like(s)
        else:
            s = ((hi - lo) * ratios / (qmax - qmin)).clamp(min=EPS)
            z = torch.clamp(torch.round(qmin - lo * ratios / s), qmin, qmax)
        q = torch.clamp(torch.round(x * (1.0 / s)[..., None]) + z[..., None], qmin, qmax)   # (K, C, N)
        err = ((q - z[..., None]) * s[..., None] - x).abs_().pow_(norm).mean(dim=-1)      # (K, C)
        best = err.argmin(dim=0, keepdim=True)
        return s.gather(0, best)[0], z.gather(0, best)[0], ratios.gather(0, best)[0]

    coarse = torch.linspace(min_ratio, 1.0, num_candidates, device=x.device)[:, None].expand(-1, x.shape[0])
    _, _, r = evaluate(coarse)
    step = (1.0 - min_ratio) / (num_candidates - 1)
    fine = (r[None] + torch.linspace(-step, step, refine, device=x.device)[:, None]).clamp(min_ratio / 2, 1.0)
    s, z, _ = evaluate(torch.cat([r[None], fine]))
    return s, z
