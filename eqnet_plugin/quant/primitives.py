"""Pure quantizer math: integer ranges, LSQ fake quantization with learnable scale and zero point, and the
calibration grid search. One source of truth for every range used by the modules and the exporters.

Conventions:
  q = clamp(round(x / s) + z, qmin, qmax),  x_hat = (q - z) * s
computed as ``x * (1 / s)`` so that it matches torch's fake-quant kernels and the decomposed reference ops bit for bit.
"""
from __future__ import annotations

import math

import torch

from .grid import Grid, int_range

__all__ = ["int_range", "lsq_grad_factor", "fake_quantize", "fake_quantize_reference", "grid_search_qparams",
           "CALIBRATION_NORM", "EPS"]

EPS = 2.0 ** -20          # smallest scale a quantizer may use
CALIBRATION_NORM = 2.4    # the paper's |x - Q(x)|^p calibration loss
_CHUNK = 1 << 20          # values per grid-search chunk (4 MiB of float32: cache-sized, few ops)


def lsq_grad_factor(numel: int, qmax_positive: int) -> float:
    """LSQ gradient scale 1/sqrt(N * Qp) for a scale that covers `numel` values."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax_positive, 1))


_XS_LIMIT = float(2 ** 24)   # |x / s| beyond this is outside every grid; clamping it keeps 0 * inf out of d/ds


class _LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with straight-through rounding and LSQ+ gradients for scale and zero point.

    See `_lsq_forward` for the forward pass. Saved for backward: the in-grid mask and, when a scale or zero-point
    gradient is wanted, the per-element d x_hat / d s (both float, so the backward pass is two multiplications and
    reductions, with no mixed-dtype ops).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        ctx.learn_z = isinstance(zero_point, torch.Tensor) and ctx.needs_input_grad[2]
        out, mask, ds = _lsq_forward(x, scale, zero_point, qmin, qmax, ctx.needs_input_grad[1])
        ctx.save_for_backward(mask, ds, scale)
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):
        mask, ds, scale = ctx.saved_tensors
        grad_x, grad_s, grad_z = _lsq_backward(grad, mask, ds, scale, ctx.needs_input_grad[0],
                                               ctx.needs_input_grad[1], ctx.learn_z, ctx.grad_factor)
        return grad_x, grad_s, grad_z, None, None, None


def _lsq_backward(grad, mask, ds, scale, need_x: bool, need_s: bool, learn_z: bool, grad_factor: float):
    """(grad_x, grad_scale, grad_zero_point) from the saved mask and d x_hat / d s; None where not wanted."""
    grad_x = grad * mask if need_x or learn_z else None
    grad_s = _reduce_product(grad, ds, scale.shape) * grad_factor if need_s else None
    grad_z = None
    if learn_z:
        # d x_hat / d z: 0 inside the grid, -s outside; grad - grad * mask is exactly grad outside, 0 inside.
        grad_z = -_reduce_to(grad - grad_x, scale.shape) * scale * grad_factor
    return (grad_x if need_x else None), grad_s, grad_z


def _lsq_forward(x: torch.Tensor, scale: torch.Tensor, zero_point, qmin: int, qmax: int, need_ds: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_hat, in-grid mask as 0./1., d x_hat / d s or None), elementwise exactly as `fake_quantize_reference`.

    With r = round(x/s) and the rounded zero point z, qc - z = clamp(r, qmin - z, qmax - z) exactly (integers in
    float), so x_hat = clamp(r, lo, hi) * s and d x_hat / d s = clamp(r, lo, hi) - (x/s) * mask: round(x/s) - x/s
    inside the grid, (qmin|qmax) - z outside. Seven vectorized passes (nine with a learned zero point) and three
    buffers (x_hat, mask, d/ds), all of them needed (torch's own fake-quant kernels are scalar loops on CPU;
    benchmarks/bench_step.py compares the two).
    """
    xs = (x * scale.reciprocal()).clamp_(-_XS_LIMIT, _XS_LIMIT)            # x * (1/s), as torch's kernels do
    r = torch.round(xs)                                                   # round half to even
    if isinstance(zero_point, torch.Tensor):
        z = torch.clamp(torch.round(zero_point), qmin, qmax)              # scale's shape (tiny)
        c = torch.add(r, z).clamp_(qmin, qmax).sub_(z)                    # qc - z (scalar clamp bounds: the fast kernel)
    else:
        z = min(max(round(float(zero_point or 0)), qmin), qmax)
        c = torch.clamp(r, qmin - z, qmax - z)                            # qc - z
    mask = torch.eq(c, r, out=r)                                          # r's buffer becomes the 0/1 mask
    ds = torch.addcmul(c, xs, mask, value=-1, out=xs) if need_ds else None
    return c.mul_(scale), mask, ds


def _reduce_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum(a * b) reduced to the broadcast-compatible `shape` (a dot product when `shape` has one element)."""
    if math.prod(shape) == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return _reduce_to(a * b, shape)


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `t` down to a broadcast-compatible `shape` (the reverse of broadcasting)."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t.reshape(shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float | None, qmin: int, qmax: int,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization of `x` (see module docstring).

    Args:
        x: input tensor.
        scale: positive scale, broadcastable to `x` (per-tensor: shape (1,); per-channel on axis 0: (C, 1, 1, 1)).
        zero_point: float zero point of the same shape as `scale`; rounded and clamped to [qmin, qmax]. A Python
            number (or ``None`` for 0) is a fixed zero point: no gradient, and a faster clamp.
        qmin, qmax: the integer grid, usually from `int_range`.
        grad_factor: multiplier of the scale and zero-point gradients (LSQ: `lsq_grad_factor`).
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad or
                                           (isinstance(zero_point, torch.Tensor) and zero_point.requires_grad)):
        return _fake_quantize_values(x, scale, zero_point, qmin, qmax)       # eval / BN re-estimation / search
    return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def _fake_quantize_values(x: torch.Tensor, scale: torch.Tensor, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """x_hat alone (no mask, no d/ds): the same bits as `_lsq_forward` in four or six in-place passes."""
    r = torch.mul(x, scale.reciprocal()).round_()
    if isinstance(zero_point, torch.Tensor):
        z = torch.clamp(torch.round(zero_point), qmin, qmax)
        return r.add_(z).clamp_(qmin, qmax).sub_(z).mul_(scale)
    z = min(max(round(float(zero_point or 0)), qmin), qmax)
    return r.clamp_(qmin - z, qmax - z).mul_(scale)


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
def grid_search_qparams(x: torch.Tensor, grid: Grid, *, num_candidates: int = 24, refine: int = 12,
                        min_ratio: float = 0.1, norm: float = CALIBRATION_NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (scale, zero_point) for one cell: the clipping ratio minimizing mean |x - Q(x)|^norm (the paper's
    calibration). `x` is (C, N) for a per-channel `grid` (one row a channel) and flattened otherwise.

    The ratio of the data range that the grid covers is searched coarse-to-fine: `num_candidates` ratios in
    [min_ratio, 1], then `refine` ratios around the best one per channel. The integer range is the bound `grid`'s
    [qmin, qmax]; symmetric grids fix the zero point at 0. Returns float tensors of shape (C,).

    Raises:
        ValueError: `grid` is not bound (``signed`` None).
    """
    qmin, qmax = grid.int_range
    symmetric = grid.symmetric
    x = x.detach().float()
    x = x.reshape(x.shape[0], -1) if grid.per_channel else x.reshape(1, -1)
    lo = x.amin(dim=1).clamp(max=0.0)                                   # (C,)
    hi = x.amax(dim=1).clamp(min=0.0)

    def evaluate(ratios: torch.Tensor):                                # ratios (K, C)
        if symmetric:
            s = (torch.maximum(-lo, hi) * ratios / qmax).clamp(min=EPS)
            z = torch.zeros_like(s)
        else:
            s = ((hi - lo) * ratios / (qmax - qmin)).clamp(min=EPS)
            z = torch.clamp(torch.round(qmin - lo * ratios / s), qmin, qmax)
        inv, s3, z3 = (1.0 / s)[..., None], s[..., None], z[..., None]
        err = torch.empty_like(s)                                      # (K, C)
        # Candidates in chunks of about _CHUNK values: the temporaries stay in cache, and each chunk is one buffer
        # updated in place (this loop is most of the calibration time).
        step = max(1, _CHUNK // max(x.numel(), 1))
        for k in range(0, s.shape[0], step):
            t = torch.round(x * inv[k:k + step])                      # (k, C, N)
            if not symmetric:
                t.add_(z3[k:k + step])
            t.clamp_(qmin, qmax)
            if not symmetric:
                t.sub_(z3[k:k + step])
            # |e|^norm as exp(norm * log|e|), cheaper than pow on CPU; log 0 = -inf gives exp = 0.
            err[k:k + step] = t.mul_(s3[k:k + step]).sub_(x).abs_().log_().mul_(norm).exp_().mean(dim=-1)
        best = err.argmin(dim=0, keepdim=True)
        return s.gather(0, best)[0], z.gather(0, best)[0], ratios.gather(0, best)[0]

    coarse = torch.linspace(min_ratio, 1.0, num_candidates, device=x.device)[:, None].expand(-1, x.shape[0])
    _, _, r = evaluate(coarse)
    step = (1.0 - min_ratio) / (num_candidates - 1)
    fine = (r[None] + torch.linspace(-step, step, refine, device=x.device)[:, None]).clamp(min_ratio / 2, 1.0)
    s, z, _ = evaluate(torch.cat([r[None], fine]))
    return s, z
