"""`Supernet.calibrate` gives exactly the cells of a plain reference grid search (one cell, one candidate block at a
time, every value computed densely), on the compact models and on raw data: the blocked, zero-skipping search of
`eqnet_plugin.quant.primitives` must not change a single calibrated value."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from eqnet_plugin.quant import primitives
from eqnet_plugin.quant.fake_quant import ElasticFakeQuantize, _strided, _tag, _cell, _SAMPLE_CAPACITY, \
    _WEIGHT_SAMPLES_PER_CHANNEL
from eqnet_plugin.quant.grid import Grid
from eqnet_plugin.quant.primitives import EPS, grid_search_cells, grid_search_qparams


def reference_grid_search(x: torch.Tensor, grid: Grid, num_candidates: int = 24, refine: int = 12,
                          min_ratio: float = 0.1, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration search written plainly: every candidate's mean |x - Q(x)|^norm over all values."""
    qmin, qmax = grid.int_range
    x = x.detach().float()
    x = x.reshape(x.shape[0], -1) if grid.per_channel else x.reshape(1, -1)
    lo, hi = x.amin(dim=1).clamp(max=0.0), x.amax(dim=1).clamp(min=0.0)

    def evaluate(ratios):                                              # (K, C)
        if grid.symmetric:
            s = (torch.maximum(-lo, hi) * ratios / qmax).clamp(min=EPS)
            z = torch.zeros_like(s)
        else:
            s = ((hi - lo) * ratios / (qmax - qmin)).clamp(min=EPS)
            z = torch.clamp(torch.round(qmin - lo * ratios / s), qmin, qmax)
        err = torch.empty_like(s)
        for k in range(s.shape[0]):
            t = torch.round(x * (1.0 / s[k])[:, None])
            if not grid.symmetric:
                t.add_(z[k][:, None])
            t.clamp_(qmin, qmax)
            if not grid.symmetric:
                t.sub_(z[k][:, None])
            err[k] = t.mul_(s[k][:, None]).sub_(x).abs_().log_().mul_(norm).exp_().mean(dim=-1)
        best = err.argmin(dim=0, keepdim=True)
        return s.gather(0, best)[0], z.gather(0, best)[0], ratios.gather(0, best)[0]

    coarse = torch.linspace(min_ratio, 1.0, num_candidates)[:, None].expand(-1, x.shape[0])
    _, _, r = evaluate(coarse)
    step = (1.0 - min_ratio) / (num_candidates - 1)
    fine = (r[None] + torch.linspace(-step, step, refine)[:, None]).clamp(min_ratio / 2, 1.0)
    s, z, _ = evaluate(torch.cat([r[None], fine]))
    return s, z


def _data(kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "relu":                                                  # many exact zeros: the sparse path
        return torch.randn(5000, generator=g).relu() * 2
    if kind == "signed":
        return torch.randn(4096, generator=g) * 3 - 1
    if kind == "weights":                                               # (C, N) per-channel rows
        return torch.randn(37, 151, generator=g) * torch.linspace(0.01, 2, 37)[:, None]
    return torch.zeros(300)                                             # all zero: every scale is EPS


@pytest.mark.parametrize("kind", ["relu", "signed", "weights", "zeros"])
def test_search_equals_reference_bit_for_bit(kind, monkeypatch):
    g = torch.Generator().manual_seed(len(kind))
    x = _data(kind, g)
    pcs = (True, False) if kind == "weights" else (False,)
    for chunk in (1 << 18, 1000):                                       # one block, and many small blocks
        monkeypatch.setattr(primitives, "_CHUNK", chunk)
        for pc in pcs:
            grids = [Grid(b, sym, pc, signed) for sym, b, signed in itertools.product((True, False), range(2, 9),
                                                                                      (True, False))]
            for grid, (s, z) in zip(grids, grid_search_cells(x, grids)):
                rs, rz = reference_grid_search(x, grid)
                assert torch.equal(s, rs) and torch.equal(z, rz), (kind, chunk, grid)


def test_sparse_and_dense_paths_agree(monkeypatch):
    x = torch.randn(8000, generator=torch.Generator().manual_seed(3)).relu()
    grids = [Grid(b, sym, False, False) for sym in (True, False) for b in (2, 4, 8)]
    sparse = grid_search_cells(x, grids)
    monkeypatch.setattr(primitives, "_SPARSE_MIN_ZEROS", 1.1)            # never skip zeros
    dense = grid_search_cells(x, grids)
    for (a, b), (c, d) in zip(sparse, dense):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_grid_search_cells_rejects_mixed_granularity():
    with pytest.raises(ValueError, match="mix per-channel and per-tensor"):
        grid_search_cells(torch.randn(4, 8), [Grid(4, True, True, True), Grid(4, True, False, True)])
    assert grid_search_qparams(torch.randn(4, 8), Grid(4, True, True, True))[0].shape == (4,)


def _reference_cells(fq: ElasticFakeQuantize, weight: torch.Tensor | None, sample: torch.Tensor | None) -> dict:
    """Every cell of `fq` from the reference search (the quantizer's own sampling of its data)."""
    out = {}
    if fq.is_weight:
        w = weight.detach().float().movedim(fq.ch_axis, 0)
        for sym, pc, b in itertools.product(fq.sym_choices, fq.pc_choices, fq.bit_choices):
            x = _strided(w.reshape(w.shape[0], -1), _WEIGHT_SAMPLES_PER_CHANNEL) if pc else \
                _strided(w.reshape(1, -1), _SAMPLE_CAPACITY)
            out[(sym, pc, b)] = reference_grid_search(x, Grid(b, sym, pc, signed=True))
    else:
        signed = bool(fq.signed.item())
        for sym, b in itertools.product(fq.sym_choices, fq.bit_choices):
            out[(sym, False, b)] = reference_grid_search(sample, Grid(b, sym, False, signed=sym and signed))
    return out


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet_v2"])
def test_calibrated_model_equals_reference(name, monkeypatch):
    """Calibrate a compact model; every cell of every quantizer equals the reference search on the same data."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    import eqnet_plugin as eq
    from eqnet_plugin.app.models import build_model
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 1, 12, 12, generator=g) for _ in range(2)]
    bc = eq.elastic_backend_config() if "mobilenet" in name else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sn = eq.Supernet(prepare_qat_fx(build_model(name, 10).train(), eq.elastic_qconfig_mapping(),
                                        (batches[0][:1],), backend_config=bc))
    seen: dict = {}                                   # what each quantizer searched: its weight, its act sample
    orig_w, orig_a = ElasticFakeQuantize._init_weight_cells, ElasticFakeQuantize._init_act_cells

    def spy_w(self, w):
        seen[id(self)] = (w.clone(), None)
        return orig_w(self, w)

    def spy_a(self, x, signed=None, negative=None):
        seen[id(self)] = (None, x.clone())
        return orig_a(self, x, signed, negative)

    monkeypatch.setattr(ElasticFakeQuantize, "_init_weight_cells", spy_w)
    monkeypatch.setattr(ElasticFakeQuantize, "_init_act_cells", spy_a)
    sn.calibrate(batches)
    assert len(seen) == len(sn.groups)
    checked = 0
    for fq in list(sn.groups.values())[::3]:                          # every third quantizer: a few seconds
        for (sym, pc, b), (rs, rz) in _reference_cells(fq, *seen[id(fq)]).items():
            assert torch.equal(getattr(fq, _cell("scale", _tag(sym, pc), b)).detach(), rs.reshape(-1))
            if not sym:
                assert torch.equal(getattr(fq, _cell("zero_point", _tag(sym, pc), b)).detach(), rz.reshape(-1))
            checked += 1
    assert checked >= 14 * len(list(sn.groups)[::3])
