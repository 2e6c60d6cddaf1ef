"""Accuracy records (JSON lines, resumable)."""
import json

import pytest
import torch
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import eqnet_plugin as eq
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.search import (CostModel, RecordsConfig, SearchSpace, SubnetMeasurer, collect_records, load_records,
                                 sample_config)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sn():
    gm = prepare_qat_fx(TinyResNet(widths=(4, 8)).train(), eq.elastic_qconfig_mapping(), (torch.randn(2, 1, 8, 8),))
    return eq.Supernet(gm)


@pytest.fixture(scope="module")
def cm(sn):
    return CostModel.from_supernet(sn, torch.randn(1, 1, 8, 8))


def _fake_eval(calls):
    def evaluate(cfg):
        calls.append(cfg)
        return sum(c.bits for c in cfg.groups.values()) / 1000
    return evaluate


def test_records_append_resume_and_truncated_last_line(sn, cm, tmp_path):
    path = tmp_path / "rec.jsonl"
    calls = []
    recs = collect_records(sn, _fake_eval(calls), 4, path, RecordsConfig(seed=3), cost_model=cm)
    assert len(recs) == len(calls) == 4 and len(path.read_text().splitlines()) == 4
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert recs[2].config == sample_config(SearchSpace.from_supernet(sn), 3, 2)
    assert recs[1].costs == cm(recs[1].config).to_dict()
    # resume: only the missing records are measured
    recs6 = collect_records(sn, _fake_eval(calls), 6, path, RecordsConfig(seed=3), cost_model=cm)
    assert len(calls) == 6 and recs6[:4] == recs
    # an interrupted write leaves half a line: it is cut and re-measured
    with open(path, "a") as f:
        f.write('{"version": 1, "index": 6, "config": {"ver')
    assert len(load_records(path)) == 6
    recs8 = collect_records(sn, _fake_eval(calls), 8, path, RecordsConfig(seed=3), cost_model=cm)
    assert len(calls) == 8 and len(recs8) == 8
    lines = path.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["version"] == 1 for line in lines)
    assert load_records(path) == recs8
    # asking for fewer returns the stored ones without measuring
    assert collect_records(sn, _fake_eval(calls), 3, path, RecordsConfig(seed=3), cost_model=cm) == recs8[:3]
    assert len(calls) == 8


def test_records_wrong_seed_or_corrupt_middle_line_raise(sn, cm, tmp_path):
    path = tmp_path / "rec.jsonl"
    collect_records(sn, _fake_eval([]), 3, path, RecordsConfig(seed=0), cost_model=cm)
    with pytest.raises(ValueError, match="seed=1"):
        collect_records(sn, _fake_eval([]), 5, path, RecordsConfig(seed=1), cost_model=cm)
    with pytest.raises(ValueError, match="does not match"):
        collect_records(sn, _fake_eval([]), 5, path, RecordsConfig(seed=0, profile="tensorrt"), cost_model=cm)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{garbage\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r"rec.jsonl:2 is corrupt"):
        load_records(path)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "none.jsonl")


def test_records_store_extra_metrics(sn, cm, tmp_path):
    def evaluate(cfg):
        return {"accuracy": 0.5, "loss": 1.25}
    recs = collect_records(sn, evaluate, 2, tmp_path / "m.jsonl", cost_model=cm)
    assert recs[0].metrics == {"loss": 1.25} and load_records(tmp_path / "m.jsonl") == recs
    with pytest.raises(ValueError, match="'accuracy' key"):
        collect_records(sn, lambda *a: {"acc": 1.0}, 1, tmp_path / "x.jsonl", cost_model=cm)


def test_records_of_another_supernet_are_refused(sn, cm, tmp_path):
    """Records carry the fingerprint of the supernet they were measured on: a file of another supernet, or one
    written without a fingerprint, is refused before anything is measured or written."""
    from eqnet_plugin.search.records import RecordsMismatchError, supernet_fingerprint
    path = tmp_path / "rec.jsonl"
    fp = supernet_fingerprint(sn)
    assert fp == supernet_fingerprint(eq.Supernet(sn.model, sn.space)) and len(fp) == 64
    calls = []
    recs = collect_records(sn, _fake_eval(calls), 3, path, RecordsConfig(fingerprint=fp), cost_model=cm)
    assert all(r.supernet == fp for r in recs) and load_records(path) == recs
    assert all(json.loads(line)["supernet"] == fp for line in path.read_text().splitlines())
    assert collect_records(sn, _fake_eval(calls), 4, path, RecordsConfig(fingerprint=fp), cost_model=cm)[:3] == recs
    before = path.read_bytes()
    with pytest.raises(RecordsMismatchError, match=r"rec\.jsonl holds records of another supernet.*new --out.*delete"):
        collect_records(sn, _fake_eval(calls), 6, path, RecordsConfig(fingerprint="0" * 64), cost_model=cm)
    assert path.read_bytes() == before and len(calls) == 4
    old = tmp_path / "old.jsonl"                       # written without a fingerprint
    collect_records(sn, _fake_eval([]), 2, old, cost_model=cm)
    assert "supernet" not in old.read_text()
    with pytest.raises(RecordsMismatchError, match="without a supernet fingerprint.*delete"):
        collect_records(sn, _fake_eval([]), 3, old, RecordsConfig(fingerprint=fp), cost_model=cm)
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


def test_records_with_real_evaluate(sn, cm, tmp_path):
    from eqnet_plugin.train import evaluate
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    sn.calibrate(data)
    recs = collect_records(sn, lambda c: evaluate(sn, c, data[:1], data[1:]), 2, tmp_path / "r.jsonl", cost_model=cm)
    assert recs[0].config != recs[1].config
    assert [r.accuracy for r in recs] == [evaluate(sn, r.config, data[:1], data[1:]) for r in recs]


def _bits_accuracy(cfg):
    """A picklable evaluation function for worker processes."""
    return {"accuracy": sum(c.bits for c in cfg.groups.values()) / 1000, "groups": float(len(cfg.groups))}


def test_measurer_measures_each_subnet_once_caches_on_disk_and_feeds_records(sn, cm, tmp_path):
    """One measurer: records and later measurements share it, each subnet is measured once, the cache file makes a
    new measurer repeat nothing, and worker processes give the plain loop's results in order."""
    space = SearchSpace.from_supernet(sn)
    cfgs = [sample_config(space, 5, i) for i in range(6)]
    calls = []
    with SubnetMeasurer(_fake_eval(calls), cache_path=tmp_path / "m.jsonl") as ms:
        recs = collect_records(sn, ms, 3, tmp_path / "r.jsonl", RecordsConfig(seed=5), cost_model=cm)
        assert [r.config for r in recs] == cfgs[:3] and ms.count == 3
        assert ms.accuracies(cfgs + cfgs[:2]) == [sum(c.bits for c in x.groups.values()) / 1000
                                                  for x in cfgs + cfgs[:2]]
        assert calls == cfgs and ms(cfgs[4]) == ms.many([cfgs[4]])[0]["accuracy"] and len(calls) == 6
    again = SubnetMeasurer(_fake_eval(calls), cache_path=tmp_path / "m.jsonl")
    assert again.many(cfgs) == ms.many(cfgs) and len(calls) == 6 and again.count == 0
    fresh = SubnetMeasurer(_fake_eval(calls))                  # the records teach a measurer their accuracies
    collect_records(sn, fresh, 3, tmp_path / "r.jsonl", RecordsConfig(seed=5), cost_model=cm)
    fresh.many(cfgs[:3])
    assert len(calls) == 6 and fresh.count == 0
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"key": "x", "metr')                          # an interrupted last line is measured again
    assert len(SubnetMeasurer(_fake_eval([]), cache_path=tmp_path / "m.jsonl").cache) == 6
    (tmp_path / "bad.jsonl").write_text('{"key": "x"}\n{"key": "y", "metrics": {"accuracy": 1}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1.*delete it"):
        SubnetMeasurer(_fake_eval([]), cache_path=tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="jobs"):
        SubnetMeasurer(_fake_eval([]), jobs=0)
    with pytest.raises(ValueError, match="cannot be pickled.*worker_evaluate"), \
            SubnetMeasurer(lambda c: 1.0, jobs=2) as par:
        par.many(cfgs)
    with SubnetMeasurer(_bits_accuracy, jobs=2) as par:
        assert par.many(cfgs) == [_bits_accuracy(c) for c in cfgs] and par.count == 6
