"""Property tests of the quantizer math against the scalar pure-Python reference, and of the calibration search.

Exactness: the forward output and the per-element derivatives (d/dx, d/ds, d/dz) must equal
`fake_quantize_reference` bit for bit. The per-element derivatives are observed exactly by giving every element its
own channel (x, scale and zero point all of shape (N,)), so each scale/zero-point gradient is one term, not a sum.
Per-tensor and per-channel layouts reduce many terms in float32; those are compared with a float64 sum of the exact
reference terms within the standard bound of float32 summation, (n + 2) * 2^-24 * sum |term| (the order of a
float32 reduction is the library's choice, so no bitwise claim is made there).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqnet_plugin.quant.grid import Grid
from eqnet_plugin.quant.primitives import (EPS, fake_quantize, fake_quantize_reference, grid_search_qparams, int_range,
                                     lsq_grad_factor)

F32 = dict(width=32, allow_nan=False, allow_infinity=False)
SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def grids(draw):
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    return bits, signed, *int_range(bits, signed)


@st.composite
def elements(draw, qmin: int, qmax: int, n: int):
    """n (x, scale, zero_point) triples: x spread over the grid and beyond, with exact ties (k + 1/2) * s."""
    out = []
    for _ in range(n):
        s = draw(st.floats(2.0 ** -10, 4.0, **F32))
        z = draw(st.floats(qmin - 3.0, qmax + 3.0, **F32) | st.integers(qmin - 2, qmax + 2).map(lambda k: k + 0.5))
        kind = draw(st.sampled_from(["free", "tie", "grid"]))
        k = draw(st.integers(qmin - qmax - 4, qmax - qmin + 4))
        if kind == "free":
            span = float(np.float32((qmax - qmin + 4) * s))
            x = draw(st.floats(-span, span, **F32))
        else:
            x = float(np.float32((k + (0.5 if kind == "tie" else 0.0)) * s))
        out.append((x, s, z))
    return out


def _grads(x, s, z, qmin, qmax, factor=1.0, grad_out=None):
    x = x.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    zz = z.clone().requires_grad_(True) if isinstance(z, torch.Tensor) else z
    y = fake_quantize(x, s, zz, qmin, qmax, factor)
    y.backward(torch.ones_like(y) if grad_out is None else grad_out)
    return y.detach(), x.grad, s.grad, (zz.grad if isinstance(zz, torch.Tensor) else None)


@SETTINGS
@given(data=st.data(), grid=grids(), n=st.integers(1, 24))
def test_elementwise_forward_and_gradients_equal_reference(data, grid, n):
    """Asymmetric (learnable zero point): output and d/dx, d/ds, d/dz per element, bit for bit."""
    _, _, qmin, qmax = grid
    el = data.draw(elements(qmin, qmax, n))
    x, s, z = (torch.tensor([e[i] for e in el], dtype=torch.float32) for i in range(3))
    y, gx, gs, gz = _grads(x, s, z, qmin, qmax)
    with torch.no_grad():                                                    # the values-only path, same bits
        assert torch.equal(fake_quantize(x, s, z, qmin, qmax), y)
    for i, (xi, si, zi) in enumerate(el):
        ref = fake_quantize_reference(xi, si, zi, qmin, qmax)
        assert (y[i].item(), gx[i].item(), gs[i].item(), gz[i].item()) == ref, (xi, si, zi, qmin, qmax)


@SETTINGS
@given(data=st.data(), grid=grids(), n=st.integers(1, 24), fixed=st.sampled_from(["none", "zero", "half"]))
def test_elementwise_fixed_zero_point_equals_reference(data, grid, n, fixed):
    """Symmetric cells: a fixed zero point (None = 0, or an int such as 2^(b-1)); no zero-point gradient."""
    bits, _, qmin, qmax = grid
    zp = {"none": None, "zero": 0, "half": min(max(1 << (bits - 1), qmin), qmax)}[fixed]
    el = data.draw(elements(qmin, qmax, n))
    x, s = (torch.tensor([e[i] for e in el], dtype=torch.float32) for i in range(2))
    y, gx, gs, _ = _grads(x, s, zp, qmin, qmax)
    assert torch.equal(fake_quantize(x, s, zp, qmin, qmax), y)               # nothing requires grad: values only
    for i, (xi, si, _) in enumerate(el):
        ref = fake_quantize_reference(xi, si, zp or 0, qmin, qmax)
        assert (y[i].item(), gx[i].item(), gs[i].item()) == ref[:3], (xi, si, zp, qmin, qmax)


def _sum_bound(terms: np.ndarray, n: int) -> float:
    return (n + 2) * 2.0 ** -24 * float(np.abs(terms).sum()) + 1e-30


@SETTINGS
@given(grid=grids(), per_channel=st.booleans(), symmetric=st.booleans(), seed=st.integers(0, 2 ** 31 - 1),
       channels=st.integers(1, 4), k=st.integers(1, 40), factor=st.sampled_from([1.0, 0.125, 0.0371]))
def test_per_tensor_and_per_channel_reductions(grid, per_channel, symmetric, seed, channels, k, factor):
    """(C, K) tensors with per-tensor (1,) or per-channel (C, 1) qparams and random output gradients."""
    _, _, qmin, qmax = grid
    g = torch.Generator().manual_seed(seed)
    shape = (channels, 1) if per_channel else (1,)
    s = torch.rand(shape, generator=g) * 0.3 + 0.01
    z = torch.rand(shape, generator=g) * (qmax - qmin + 4) + qmin - 2
    x = torch.randn(channels, k, generator=g) * (qmax - qmin) * s.mean() * 0.4
    go = torch.randn(channels, k, generator=g)
    y, gx, gs, gz = _grads(x, s, None if symmetric else z, qmin, qmax, factor, go)
    sb = s.expand(channels, 1)[:, 0]
    zb = torch.zeros(channels) if symmetric else z.expand(channels, 1)[:, 0]
    ref = np.array([[fake_quantize_reference(x[c, j].item(), sb[c].item(), zb[c].item(), qmin, qmax)
                     for j in range(k)] for c in range(channels)])                       # (C, K, 4)
    assert torch.equal(y, torch.tensor(ref[..., 0], dtype=torch.float32))
    assert torch.equal(gx, go * torch.tensor(ref[..., 1], dtype=torch.float32))
    gon = go.double().numpy()
    for got, col in ((gs, 2), (gz, 3)):
        if got is None:
            continue
        terms = gon * ref[..., col]
        want = terms.sum(axis=1) if per_channel else terms.sum()[None]
        bounds = [_sum_bound(t, t.size) for t in (terms if per_channel else [terms])]
        diff = np.abs(got.double().numpy().reshape(-1) / factor - np.asarray(want).reshape(-1))
        assert np.all(diff <= np.array(bounds) * 1.01), (got, want)


@SETTINGS
@given(grid=grids(), seed=st.integers(0, 2 ** 31 - 1), zp=st.integers(-3, 260), per_channel=st.booleans())
def test_forward_and_input_gradient_equal_torch_fake_quantize(grid, seed, zp, per_channel):
    """Same bits as torch.fake_quantize_per_{tensor,channel}_affine, every grid of 2..8 bits."""
    _, _, qmin, qmax = grid
    zp = min(max(zp, qmin), qmax)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 4, generator=g) * 3
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    if per_channel:
        s = torch.rand(3, generator=g) * 0.5 + 1e-3
        ref = torch.fake_quantize_per_channel_affine(xr, s, torch.full((3,), zp, dtype=torch.int32), 0, qmin, qmax)
        ours = fake_quantize(xo, s[:, None, None], torch.full((3, 1, 1), float(zp)), qmin, qmax)
    else:
        s = torch.rand(1, generator=g) * 0.5 + 1e-3
        ref = torch.fake_quantize_per_tensor_affine(xr, s.item(), zp, qmin, qmax)
        ours = fake_quantize(xo, s, torch.tensor([float(zp)]), qmin, qmax)
    assert torch.equal(ours, ref)
    go = torch.randn(x.shape, generator=g)
    ref.backward(go)
    ours.backward(go)
    assert torch.equal(xo.grad, xr.grad)


def test_extreme_inputs_stay_finite():
    """inf and huge |x / s| are outside the grid: x_hat at the bound, zero input gradient, finite qparam grads."""
    x = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 0.3])
    y, gx, gs, gz = _grads(x, torch.full((5,), 1e-3), torch.full((5,), 3.0), -8, 7)
    for i, xi in enumerate(x.tolist()):
        with np.errstate(over="ignore"):
            ref = fake_quantize_reference(xi, 1e-3, 3.0, -8, 7)
        assert (y[i].item(), gx[i].item(), gs[i].item(), gz[i].item()) == ref
    assert torch.isfinite(gs).all() and torch.isfinite(gz).all()


def test_lsq_gradient_scale():
    assert lsq_grad_factor(100, 127) == 1.0 / math.sqrt(100 * 127)
    assert lsq_grad_factor(0, 0) == 1.0                       # guarded, never a division by zero
    x = torch.randn(4, 50)
    s, z = torch.tensor([0.02]), torch.tensor([1.0])
    _, gx1, gs1, gz1 = _grads(x, s, z, -8, 7, 1.0)
    f = lsq_grad_factor(x.numel(), 7)
    _, gxf, gsf, gzf = _grads(x, s, z, -8, 7, f)
    assert torch.equal(gx1, gxf)                              # the input gradient is not scaled
    assert torch.equal(gsf, gs1 * f) and torch.equal(gzf, gz1 * f)


def test_no_qparam_gradient_work_when_frozen():
    """With scale/zero point not requiring grad, only the input gradient is produced (and it is the STE mask)."""
    x = torch.randn(2, 30, requires_grad=True)
    y = fake_quantize(x, torch.tensor([0.05]), torch.tensor([2.0]), 0, 15)
    y.sum().backward()
    inside = ((torch.round(x.detach() * (1 / torch.tensor([0.05]))) + 2 >= 0)
              & (torch.round(x.detach() * (1 / torch.tensor([0.05]))) + 2 <= 15))
    assert torch.equal(x.grad, inside.float())


# --- calibration grid search -----------------------------------------------------------------------------------
def _err64(x: np.ndarray, s: float, z: float, qmin: int, qmax: int, norm: float = 2.4) -> float:
    q = np.clip(np.round(x / s) + z, qmin, qmax)
    return float(np.mean(np.abs((q - z) * s - x) ** norm))


def _candidate(x: np.ndarray, ratio: float, bits: int, signed: bool, symmetric: bool):
    qmin, qmax = int_range(bits, signed)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    if symmetric:
        return max(max(-lo, hi) * ratio / qmax, EPS), 0.0
    s = max((hi - lo) * ratio / (qmax - qmin), EPS)
    return s, float(np.clip(np.round(qmin - lo * ratio / s), qmin, qmax))


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "relu"])
@pytest.mark.parametrize("bits, signed, symmetric", [(2, True, True), (4, True, False), (8, True, True),
                                                     (3, False, False), (8, False, True), (5, False, False)])
def test_grid_search_beats_every_coarse_candidate(dist, bits, signed, symmetric):
    """Brute force over the coarse candidates (in float64): the search result is at least as good as each."""
    rng = np.random.default_rng(bits * 7 + symmetric)
    x = {"normal": rng.normal(size=3000), "laplace": rng.laplace(size=3000), "uniform": rng.uniform(-1, 2, 3000),
         "relu": np.maximum(rng.normal(size=3000), 0)}[dist].astype(np.float32)
    s, z = grid_search_qparams(torch.from_numpy(x), Grid(bits, symmetric, False, signed))
    assert s.shape == z.shape == (1,)
    qmin, qmax = int_range(bits, signed)
    got = _err64(x.astype(np.float64), s.item(), z.item(), qmin, qmax)
    coarse = [_candidate(x.astype(np.float64), r, bits, signed, symmetric) for r in np.linspace(0.1, 1.0, 24)]
    best = min(_err64(x.astype(np.float64), cs, cz, qmin, qmax) for cs, cz in coarse)
    assert got <= best * (1 + 1e-4)
    if symmetric:
        assert z.item() == 0.0
    assert qmin <= z.item() <= qmax and float(z.item()).is_integer()


@pytest.mark.parametrize("signed, symmetric", [(True, True), (True, False), (False, False)])
def test_grid_search_finds_known_optimum(signed, symmetric):
    """Data exactly on a grid: the search recovers that grid (zero error)."""
    bits, s0 = 4, 0.0625
    qmin, qmax = int_range(bits, signed)
    z0 = 0 if symmetric else qmin + 3
    ks = torch.arange(-qmax if symmetric else qmin, qmax + 1, dtype=torch.float32)
    x = (ks - z0) * s0
    s, z = grid_search_qparams(x, Grid(bits, symmetric, False, signed))
    assert s.item() == pytest.approx(s0, rel=1e-6) and z.item() == z0
    assert torch.equal(fake_quantize(x, s, z, qmin, qmax), x)


def test_grid_search_per_channel_equals_rowwise_per_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 200, generator=g) * torch.linspace(0.1, 3, 6)[:, None]
    x[2] = 0.0                                              # an all-zero channel gets the smallest scale
    for symmetric in (True, False):
        s, z = grid_search_qparams(x, Grid(4, symmetric, True, signed=True))
        assert s.shape == z.shape == (6,)
        for c in range(6):
            sc, zc = grid_search_qparams(x[c], Grid(4, symmetric, False, signed=True))
            assert torch.equal(s[c:c + 1], sc) and torch.equal(z[c:c + 1], zc)
        assert s[2].item() == EPS and (s >= EPS).all()
