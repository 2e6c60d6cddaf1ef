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
           "grid_search_cells", "CALIBRATION_NORM", "EPS"]

EPS = 2.0 ** -20          # smallest scale a quantizer may use
CALIBRATION_NORM = 2.4    # the paper's |x - Q(x)|^p calibration loss
_CHUNK = 1 << 18          # values per grid-search block (1 MiB of float32: the temporaries stay in a core's L2)
_SPARSE_MIN_ZEROS = 0.25  # per-tensor data with at least this fraction of exact zeros skips them (ReLU outputs)


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
    `grid_search_cells` searches several grids of the same data (one quantizer's cells) with the same result.

    Raises:
        ValueError: `grid` is not bound (``signed`` None).
    """
    return grid_search_cells(x, [grid], num_candidates=num_candidates, refine=refine, min_ratio=min_ratio,
                             norm=norm)[0]


@torch.no_grad()
def grid_search_cells(x: torch.Tensor, grids: list[Grid], *, num_candidates: int = 24, refine: int = 12,
                      min_ratio: float = 0.1, norm: float = CALIBRATION_NORM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`grid_search_qparams` of each of `grids` (all per-channel or all per-tensor) on the same data `x`, which is
    prepared once (range, zero positions). Returns one (scale, zero_point) pair per grid, in order.

    Raises:
        ValueError: a grid is not bound, or the grids mix per-channel and per-tensor.
    """
    if len({g.per_channel for g in grids}) > 1:
        raise ValueError("grid_search_cells: the grids mix per-channel and per-tensor; search each granularity "
                         "separately")
    if not grids:
        return []
    data = _SearchData(x, grids[0].per_channel)
    return [data.search(g, num_candidates, refine, min_ratio, norm) for g in grids]


class _SearchData:
    """One quantizer's calibration data, prepared once for all its cells.

    `x` is (C, N), contiguous. Per-tensor data on the CPU with many exact zeros (post-ReLU activations) also keeps
    its nonzero values and their positions: a zero's error term is exactly 0 for every candidate (round(0) = 0, the
    zero point is added and subtracted, |0 - 0|^p = exp(p * log 0) = 0), so the terms are computed for the nonzero
    values only and put back in place among zeros before the mean: the same values in the same positions, so the
    same sums bit for bit (tests/unit/test_calibration.py checks both paths against a plain reference).
    """

    def __init__(self, x: torch.Tensor, per_channel: bool) -> None:
        x = x.detach().float()
        self.x = (x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)).contiguous()      # (C, N)
        self.lo = self.x.amin(dim=1).clamp(max=0.0)                                                # (C,)
        self.hi = self.x.amax(dim=1).clamp(min=0.0)
        self.absmax = torch.maximum(-self.lo, self.hi)
        self.width = self.hi - self.lo
        self.nonzero: torch.Tensor | None = None            # positions of the nonzero values (sparse path)
        if self.x.shape[0] == 1 and self.x.device.type == "cpu" and self.x.numel():
            idx = self.x[0].nonzero().reshape(-1)           # on the CPU: no device synchronization
            if idx.numel() <= (1.0 - _SPARSE_MIN_ZEROS) * self.x.shape[1]:
                self.nonzero = idx

    def candidates(self, ratios: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zero points) of the clipping `ratios` (K, C) on `grid`."""
        qmin, qmax = grid.int_range
        if grid.symmetric:
            s = (self.absmax * ratios / qmax).clamp(min=EPS)
            return s, torch.zeros_like(s)
        s = (self.width * ratios / (qmax - qmin)).clamp(min=EPS)
        return s, torch.clamp(torch.round(qmin - self.lo * ratios / s), qmin, qmax)

    def search(self, grid: Grid, num_candidates: int, refine: int, min_ratio: float, norm: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        dev, channels = self.x.device, self.x.shape[0]
        coarse = torch.linspace(min_ratio, 1.0, num_candidates, device=dev)[:, None].expand(-1, channels)
        s, z = self.candidates(coarse, grid)
        err = self.errors(s, z, grid, norm)
        best = err.argmin(dim=0, keepdim=True)
        r = coarse.gather(0, best)[0]
        step = (1.0 - min_ratio) / (num_candidates - 1)
        fine = (r[None] + torch.linspace(-step, step, refine, device=dev)[:, None]).clamp(min_ratio / 2, 1.0)
        fs, fz = self.candidates(fine, grid)
        # The best coarse candidate competes again (first, so it wins ties); its error is already known.
        s = torch.cat([s.gather(0, best), fs])
        z = torch.cat([z.gather(0, best), fz])
        err = torch.cat([err.gather(0, best), self.errors(fs, fz, grid, norm)])
        best = err.argmin(dim=0, keepdim=True)
        return s.gather(0, best)[0], z.gather(0, best)[0]

    def errors(self, s: torch.Tensor, z: torch.Tensor, grid: Grid, norm: float) -> torch.Tensor:
        """mean |x - Q(x)|^norm per candidate and channel, (K, C), for scales and zero points `s`, `z` (K, C).

        Blocks of candidates x channels of about _CHUNK values, each computed in one reused buffer in place.
        """
        qmin, qmax = grid.int_range
        x = self.x if self.nonzero is None else self.x[:, self.nonzero]                # (C, M)
        (num_k, channels), n = s.shape, x.shape[1]
        inv, s3, z3 = (1.0 / s)[..., None], s[..., None], z[..., None]
        err = torch.empty_like(s)
        rows = max(1, _CHUNK // max(x.numel(), 1))           # candidates per block
        cols = channels if rows > 1 else max(1, min(channels, _CHUNK // max(n, 1)))   # channels per block
        rows = min(rows, num_k)
        buf = torch.empty(rows * cols * n, device=x.device)
        full = None
        if self.nonzero is not None:                         # the terms in place among the zeros
            full = torch.zeros(rows, self.x.shape[1], device=x.device)
        for k in range(0, num_k, rows):
            kk = min(rows, num_k - k)
            for c in range(0, channels, cols):
                cc = min(cols, channels - c)
                xb = x[c:c + cc]
                t = torch.mul(xb, inv[k:k + kk, c:c + cc], out=buf[:kk * cc * n].view(kk, cc, n)).round_()
                if not grid.symmetric:
                    t.add_(z3[k:k + kk, c:c + cc])
                t.clamp_(qmin, qmax)
                if not grid.symmetric:
                    t.sub_(z3[k:k + kk, c:c + cc])
                # |e|^norm as exp(norm * log|e|), cheaper than pow on CPU; log 0 = -inf gives exp = 0.
                t.mul_(s3[k:k + kk, c:c + cc]).sub_(xb).abs_().log_().mul_(norm).exp_()
                if full is not None:
                    t = full[:kk].index_copy_(1, self.nonzero, t.view(kk, n))[:, None]
                err[k:k + kk, c:c + cc] = t.mean(dim=-1)
        return err
