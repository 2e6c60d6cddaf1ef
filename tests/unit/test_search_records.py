"""Accuracy records (JSON lines, resumable) and the CQAP predictor."""
import json

import numpy as np
import pytest
import scipy.stats
import torch
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import eqnet_plugin as eq
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.search import (CQAP, GBT_SHAPES, CostModel, SearchSpace, collect_records, kendall_tau, load_records,
                                 pearson, sample_config)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sn():
    gm = prepare_qat_fx(TinyResNet(widths=(4, 8)).train(), eq.elastic_qconfig_mapping(), (torch.randn(2, 1, 8, 8),))
    return eq.Supernet(gm)


def _fake_eval(calls):
    def evaluate(supernet, cfg, loader, bn_batches):
        calls.append(cfg)
        return sum(c.bits for c in cfg.groups.values()) / 1000
    return evaluate


def test_records_append_resume_and_truncated_last_line(sn, tmp_path):
    path = tmp_path / "rec.jsonl"
    loader = [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]
    calls = []
    recs = collect_records(sn, loader, None, 4, path, seed=3, evaluate_fn=_fake_eval(calls))
    assert len(recs) == len(calls) == 4 and len(path.read_text().splitlines()) == 4
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert recs[2].config == sample_config(SearchSpace.from_supernet(sn), 3, 2)
    cm = CostModel.from_supernet(sn, torch.randn(1, 1, 8, 8))
    assert recs[1].costs == cm(recs[1].config).to_dict()
    # resume: only the missing records are measured
    recs6 = collect_records(sn, loader, None, 6, path, seed=3, evaluate_fn=_fake_eval(calls))
    assert len(calls) == 6 and recs6[:4] == recs
    # an interrupted write leaves half a line: it is cut and re-measured
    with open(path, "a") as f:
        f.write('{"version": 1, "index": 6, "config": {"ver')
    assert len(load_records(path)) == 6
    recs8 = collect_records(sn, loader, None, 8, path, seed=3, evaluate_fn=_fake_eval(calls))
    assert len(calls) == 8 and len(recs8) == 8
    lines = path.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["version"] == 1 for line in lines)
    assert load_records(path) == recs8
    # asking for fewer returns the stored ones without measuring
    assert collect_records(sn, loader, None, 3, path, seed=3, evaluate_fn=_fake_eval(calls)) == recs8[:3]
    assert len(calls) == 8


def test_records_wrong_seed_or_corrupt_middle_line_raise(sn, tmp_path):
    path = tmp_path / "rec.jsonl"
    loader = [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]
    collect_records(sn, loader, None, 3, path, seed=0, evaluate_fn=_fake_eval([]))
    with pytest.raises(ValueError, match="seed=1"):
        collect_records(sn, loader, None, 5, path, seed=1, evaluate_fn=_fake_eval([]))
    with pytest.raises(ValueError, match="does not match"):
        collect_records(sn, loader, None, 5, path, seed=0, profile="tensorrt", evaluate_fn=_fake_eval([]))
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{garbage\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r"rec.jsonl:2 is corrupt"):
        load_records(path)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "none.jsonl")


def test_records_store_extra_metrics(sn, tmp_path):
    loader = [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]

    def evaluate(supernet, cfg, loader, bn_batches):
        return {"accuracy": 0.5, "loss": 1.25}
    recs = collect_records(sn, loader, None, 2, tmp_path / "m.jsonl", evaluate_fn=evaluate)
    assert recs[0].metrics == {"loss": 1.25} and load_records(tmp_path / "m.jsonl") == recs
    with pytest.raises(ValueError, match="'accuracy' key"):
        collect_records(sn, loader, None, 1, tmp_path / "x.jsonl", evaluate_fn=lambda *a: {"acc": 1.0})


def test_records_of_another_supernet_are_refused(sn, tmp_path):
    """Records carry the fingerprint of the supernet they were measured on: a file of another supernet, or of an
    earlier release (no fingerprint), is refused before anything is measured or written."""
    from eqnet_plugin.search.records import RecordsMismatchError, supernet_fingerprint
    path = tmp_path / "rec.jsonl"
    loader = [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]
    fp = supernet_fingerprint(sn)
    assert fp == supernet_fingerprint(eq.Supernet(sn.model, sn.space)) and len(fp) == 64
    calls = []
    recs = collect_records(sn, loader, None, 3, path, evaluate_fn=_fake_eval(calls), fingerprint=fp)
    assert all(r.supernet == fp for r in recs) and load_records(path) == recs
    assert all(json.loads(line)["supernet"] == fp for line in path.read_text().splitlines())
    assert collect_records(sn, loader, None, 4, path, evaluate_fn=_fake_eval(calls), fingerprint=fp)[:3] == recs
    before = path.read_bytes()
    with pytest.raises(RecordsMismatchError, match=r"rec\.jsonl holds records of another supernet.*new --out.*delete"):
        collect_records(sn, loader, None, 6, path, evaluate_fn=_fake_eval(calls), fingerprint="0" * 64)
    assert path.read_bytes() == before and len(calls) == 4
    old = tmp_path / "old.jsonl"                       # an earlier release's file: no fingerprint
    collect_records(sn, loader, None, 2, old, evaluate_fn=_fake_eval([]))
    assert "supernet" not in old.read_text()
    with pytest.raises(RecordsMismatchError, match="without a supernet fingerprint.*delete"):
        collect_records(sn, loader, None, 3, old, evaluate_fn=_fake_eval([]), fingerprint=fp)
    # any training step changes the fingerprint
    param = next(sn.model.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
    try:
        assert supernet_fingerprint(sn) != fp
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert supernet_fingerprint(sn) == fp


def test_records_with_real_evaluate(sn, tmp_path):
    from eqnet_plugin.train import evaluate
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    sn.calibrate(data)
    recs = collect_records(sn, data[:1], data[1:], 2, tmp_path / "r.jsonl", seed=0)
    assert all(0.0 <= r.accuracy <= 1.0 for r in recs)
    assert recs[0].accuracy == evaluate(sn, recs[0].config, data[:1], data[1:])


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


@pytest.mark.parametrize("regressor", ["ensemble", "gbt", "mlp"])
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
    assert ens.regressor == "ensemble" and "4 tree shapes" in repr(ens)
    members = [CQAP(sp, hidden=(16,), seed=3, regressor="gbt", gbt_params=p).fit(tr_cfg, tr_acc)
               for p in GBT_SHAPES]
    members.append(CQAP(sp, hidden=(16,), seed=3, regressor="mlp").fit(tr_cfg, tr_acc, **kw))
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
    cqap = CQAP(sp, hidden=(8,), regressor="mlp").fit(cfgs, acc, epochs=1)
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
        CQAP(sp, regressor="forest")
    gbt = CQAP(sp).fit(cfgs, acc)
    gbt.save(tmp_path / "gbt.pt")
    state = torch.load(tmp_path / "gbt.pt", weights_only=True)
    state["train_x"] = state["train_x"][:, :-1]                       # an encoding that does not fit the space
    torch.save(state, tmp_path / "gbt_bad.pt")
    with pytest.raises(ValueError, match="corrupt CQAP file"):
        CQAP.load(tmp_path / "gbt_bad.pt")


def test_cqap_reads_version_1_files(sn, tmp_path):
    """Files of the first release (MLP only, no "regressor" key) still load and predict the same."""
    sp = SearchSpace.from_supernet(sn)
    cfgs, acc = _synthetic(sp, 20, 0)
    mlp = CQAP(sp, hidden=(8,), regressor="mlp").fit(cfgs, acc, epochs=2)
    mlp.save(tmp_path / "v2.pt")
    state = torch.load(tmp_path / "v2.pt", weights_only=True)
    state["version"] = 1
    del state["regressor"]
    torch.save(state, tmp_path / "v1.pt")
    old = CQAP.load(tmp_path / "v1.pt")
    assert old.regressor == "mlp" and np.array_equal(old.predict(cfgs), mlp.predict(cfgs))
    gbt = CQAP(sp, regressor="gbt").fit(cfgs, acc)                    # version 2 wrote "gbt" files the same way
    gbt.save(tmp_path / "gbt.pt")
    state = torch.load(tmp_path / "gbt.pt", weights_only=True)
    state["version"] = 2
    torch.save(state, tmp_path / "gbt_v2.pt")
    assert np.array_equal(CQAP.load(tmp_path / "gbt_v2.pt").predict(cfgs), gbt.predict(cfgs))
