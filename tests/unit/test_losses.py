"""WDR and GPG losses against hand-computed values (scipy moments, KL written out in numpy)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from eqnet_plugin.train.losses import (WDRLoss, distill_kl, gpg_losses, gpg_term, kurtosis, skewness, wdr_penalty)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-_np_log_softmax(z)[np.arange(len(y)), y].mean())


def _np_kl(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    """t^2 * mean_b sum_k p_t (log p_t - log p_s) at temperature t, written out."""
    ls, lt = _np_log_softmax(student / t), _np_log_softmax(teacher / t)
    return float(t * t * (np.exp(lt) * (lt - ls)).sum(axis=1).mean())


@pytest.mark.parametrize("seed", range(4))
def test_moments_match_scipy(seed):
    rng = np.random.default_rng(seed)
    w = rng.gamma(2.0, size=(6, 5, 3)).astype(np.float64)          # skewed, heavy-ish tail
    t = torch.tensor(w, dtype=torch.float32)
    assert skewness(t).item() == pytest.approx(scipy.stats.skew(w.ravel()), rel=1e-4, abs=1e-5)
    assert kurtosis(t).item() == pytest.approx(scipy.stats.kurtosis(w.ravel(), fisher=False), rel=1e-4)


def test_uniform_has_kurtosis_near_1_8():
    u = torch.linspace(-1, 1, 100001)
    assert kurtosis(u).item() == pytest.approx(1.8, abs=1e-3)
    assert abs(skewness(u).item()) < 1e-5


def test_wdr_penalty_hand_computed():
    a = np.array([0.1, -0.4, 2.0, 0.3, -0.2, 0.05])
    b = np.array([[1.0, -1.0], [0.5, 3.0], [-2.0, 0.25]])
    want = np.mean([1.0 * scipy.stats.skew(x.ravel()) ** 2
                    + 0.015 * (scipy.stats.kurtosis(x.ravel(), fisher=False) - 1.8) ** 2 for x in (a, b)])
    got = wdr_penalty([torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)])
    assert got.item() == pytest.approx(want, rel=1e-4)
    got2 = wdr_penalty([torch.tensor(a, dtype=torch.float32)], skew_weight=0.5, kurt_weight=2.0,
                       target_kurtosis=3.0)
    want2 = 0.5 * scipy.stats.skew(a) ** 2 + 2.0 * (scipy.stats.kurtosis(a, fisher=False) - 3.0) ** 2
    assert got2.item() == pytest.approx(want2, rel=1e-4)


def test_wdr_penalty_empty_raises():
    with pytest.raises(ValueError, match="exclude_first"):
        wdr_penalty([])


@pytest.fixture(scope="module")
def supernet(tiny_digits_supernet):
    return tiny_digits_supernet(calibrate=False)


@pytest.mark.parametrize("exclude_first", [True, False])
def test_wdr_loss_over_supernet_layers(supernet, exclude_first):
    layers = supernet.layers[1:] if exclude_first else supernet.layers
    weights = [supernet.model.get_submodule(lay.name).weight.detach().double().numpy().ravel() for lay in layers]
    want = np.mean([scipy.stats.skew(w) ** 2 + 0.015 * (scipy.stats.kurtosis(w, fisher=False) - 1.8) ** 2
                    for w in weights])
    loss = WDRLoss(exclude_first=exclude_first)(supernet)
    assert loss.item() == pytest.approx(want, rel=1e-3)
    assert len(WDRLoss(exclude_first=exclude_first).layer_weights(supernet)) == len(layers)
    first = supernet.model.get_submodule(supernet.layers[0].name).weight
    second = supernet.model.get_submodule(supernet.layers[1].name).weight
    first.grad = second.grad = None
    loss.backward()
    assert second.grad is not None and second.grad.abs().sum() > 0
    assert (first.grad is None) == exclude_first


def test_wdr_rejects_negative_weight():
    with pytest.raises(ValueError, match="kurt_weight"):
        WDRLoss(kurt_weight=-1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distill_kl_hand_computed(temperature):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 2
    got = distill_kl(s, t, temperature)
    assert got.item() == pytest.approx(_np_kl(s.double().numpy(), t.double().numpy(), temperature), rel=1e-5)
    assert distill_kl(s, s, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_gpg_losses_hand_computed_and_teacher_detached():
    g = torch.Generator().manual_seed(0)
    zh, zr, zl = (torch.randn(6, 10, generator=g, requires_grad=True) for _ in range(3))
    y = torch.randint(10, (6,), generator=g)
    out = gpg_losses(zh, zr, zl, y, lam=0.5, temperature=1.0)
    nh, nr, nl, ny = (v.detach().double().numpy() for v in (zh, zr, zl, y))
    ny = ny.astype(np.int64)
    assert out["h"].item() == pytest.approx(_np_ce(nh, ny), rel=1e-5)
    assert out["r"].item() == pytest.approx(0.5 * _np_kl(nr, nh, 1.0) + 0.5 * _np_ce(nr, ny), rel=1e-5)
    assert out["l"].item() == pytest.approx(0.5 * _np_kl(nl, nr, 1.0) + 0.5 * _np_ce(nl, ny), rel=1e-5)
    # stop-gradient: R's loss does not reach H's logits, L's loss does not reach R's logits
    out["r"].backward(retain_graph=True)
    assert zh.grad is None and zr.grad is not None
    zr.grad = None
    out["l"].backward()
    assert zr.grad is None and zl.grad is not None
    # lam weighs distillation against CE
    assert gpg_term(zr, zh, y, lam=0.0).item() == pytest.approx(F.cross_entropy(zr, y).item(), rel=1e-6)
    assert gpg_term(zr, zh, y, lam=1.0).item() == pytest.approx(distill_kl(zr, zh).item(), rel=1e-6)


@pytest.mark.parametrize("kw, match", [({"lam": 1.5}, "lam"), ({"temperature": 0.0}, "temperature")])
def test_gpg_rejects_bad_arguments(kw, match):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        gpg_losses(z, z, z, torch.zeros(2, dtype=torch.long), **kw)
