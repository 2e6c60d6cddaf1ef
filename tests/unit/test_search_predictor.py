"""The CQAP predictor (ensemble, GBT and MLP regressors over a config encoding) and the rank statistics it is
judged by."""
import numpy as np
import pytest
import scipy.stats
import torch
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import eqnet_plugin as eq
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.search import CQAP, GBT_SHAPES, Regressor, SearchSpace, kendall_tau, pearson

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sn():
    gm = prepare_qat_fx(TinyResNet(widths=(4, 8)).train(), eq.elastic_qconfig_mapping(), (torch.randn(2, 1, 8, 8),))
    return eq.Supernet(gm)


def test_kendall_and_pearson_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, 700).astype(float)           # many ties
    y = x + rng.normal(0, 5, 700)
    y[::7] = y[0]
    assert kendall_tau(x, y) == pytest.approx(scipy.stats.kendalltau(x, y)[0], abs=1e-12)
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    with pytest.raises(ValueError):
        kendall_tau([1.0], [2.0])


def _synthetic(sp, n, seed):
    """Configs with a known accuracy: saturating in each group's bits, group-dependent weights, a condition term."""
    rng = np.random.default_rng(seed)
    bits, cond = sp.sample_around(n, rng)
    w = np.random.default_rng(99).uniform(0.2, 1.0, len(sp.group_names))
    f = sp.flags(cond)
    acc = (w * (1 - np.exp(-(bits - 1) / 1.5))).sum(1) + 0.3 * f[:, 0] - 0.2 * (~f[:, 2])
    return [sp.decode(b, c) for b, c in zip(bits, cond)], acc


@pytest.mark.parametrize("regressor", list(Regressor))
def test_cqap_learns_synthetic_target_and_round_trips(sn, tmp_path, regressor):
    sp = SearchSpace.from_supernet(sn)
    tr_cfg, tr_acc = _synthetic(sp, 400, 0)
    te_cfg, te_acc = _synthetic(sp, 200, 1)

    def fit():
        return CQAP(sp, hidden=(128, 128), seed=0, regressor=regressor).fit(tr_cfg, tr_acc, epochs=60,
                                                                            batch_size=128)
    cqap = fit()
    m = cqap.evaluate(te_cfg, te_acc)
    assert m["kendall_tau"] > 0.8 and m["pearson"] > 0.93, m
    assert cqap.n_features == 3 + sum(len(c) for c, s in zip(sp.choices, sp.searchable) if s)
    assert np.array_equal(fit().predict(te_cfg), cqap.predict(te_cfg))          # deterministic on CPU
    cqap.save(tmp_path / "cqap.pt")
    loaded = CQAP.load(tmp_path / "cqap.pt")
    assert loaded.regressor == regressor
    assert np.array_equal(loaded.predict(te_cfg), cqap.predict(te_cfg))
    bits = np.stack([sp.encode(c)[0] for c in te_cfg[:5]])
    cond = np.array([sp.encode(c)[1] for c in te_cfg[:5]])
    assert np.array_equal(loaded.predict_arrays(sp.group_names, bits, sp.flags(cond)), cqap.predict(te_cfg[:5]))


def test_cqap_ensemble_is_the_mean_of_its_members(sn):
    """The default regressor averages the MLP and one tree model per GBT_SHAPES entry, each fitted on its own."""
    sp = SearchSpace.from_supernet(sn)
    tr_cfg, tr_acc = _synthetic(sp, 120, 0)
    te_cfg, _ = _synthetic(sp, 30, 1)
    kw = dict(epochs=5, batch_size=64)
    ens = CQAP(sp, hidden=(16,), seed=3).fit(tr_cfg, tr_acc, **kw)
    assert ens.regressor is Regressor.ENSEMBLE and "4 tree shapes" in repr(ens)
    members = [CQAP(sp, hidden=(16,), seed=3, regressor=Regressor.GBT, gbt_params=p).fit(tr_cfg, tr_acc)
               for p in GBT_SHAPES]
    members.append(CQAP(sp, hidden=(16,), seed=3, regressor=Regressor.MLP).fit(tr_cfg, tr_acc, **kw))
    want = np.mean([m.predict(te_cfg) for m in members], axis=0)
    np.testing.assert_allclose(ens.predict(te_cfg), want, rtol=0, atol=1e-12)
    assert len({m.predict(te_cfg[:10]).round(6).tobytes() for m in members}) == len(members)   # members differ


def test_cqap_errors(sn, tmp_path):
    sp = SearchSpace.from_supernet(sn)
    cfgs, acc = _synthetic(sp, 10, 0)
    with pytest.raises(RuntimeError, match="not fitted"):
        CQAP(sp).predict(cfgs)
    with pytest.raises(ValueError, match="accuracies"):
        CQAP(sp).fit(cfgs, acc[:5])
    cqap = CQAP(sp, hidden=(8,), regressor=Regressor.MLP).fit(cfgs, acc, epochs=1)
    with pytest.raises(ValueError, match="groups differ"):
        cqap.predict_arrays(sp.group_names[::-1], np.zeros((1, len(sp.group_names)), int), np.zeros((1, 3), bool))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a CQAP file"):
        CQAP.load(tmp_path / "bad.pt")
    torch.save({"version": 99}, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="version 99"):
        CQAP.load(tmp_path / "v99.pt")
    with pytest.raises(FileNotFoundError):
        CQAP.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown CQAP regressor"):
        Regressor("forest")
    with pytest.raises(TypeError, match=r"Regressor\('gbt'\)"):
        CQAP(sp, regressor="gbt")
    gbt = CQAP(sp).fit(cfgs, acc)
    gbt.save(tmp_path / "gbt.pt")
    state = torch.load(tmp_path / "gbt.pt", weights_only=True)
    state["train_x"] = state["train_x"][:, :-1]                       # an encoding that does not fit the space
    torch.save(state, tmp_path / "gbt_bad.pt")
    with pytest.raises(ValueError, match="corrupt CQAP file"):
        CQAP.load(tmp_path / "gbt_bad.pt")

