"""Backend profiles, SearchSpace encoding and the genetic / random search with fake predictors."""
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import eqnet_plugin as eq
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.search import (PROFILES, BackendProfile, Constraints, CostModel, EvolutionConfig, RandomSearchConfig,
                                 Record, RefineConfig, SearchResult, SearchSpace, evolution_search, get_profile,
                                 measure_top, pareto_front, random_search, refine_search, sample_feasible)
from eqnet_plugin.quant.space import QuantChoice


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    gm = prepare_qat_fx(TinyResNet(widths=(4, 8)).train(), eq.elastic_qconfig_mapping(), (torch.randn(2, 1, 8, 8),))
    sn = eq.Supernet(gm)
    return sn, CostModel.from_supernet(sn, torch.randn(1, 1, 8, 8))


class SumOfBits:
    """Fake vectorized predictor: more bits = more accuracy; a bonus for per-channel weights."""

    def predict_arrays(self, names, bits, flags):
        return bits.sum(1) + 0.5 * flags[:, 0]


def sum_of_bits_fn(configs):
    """The same fake predictor as a plain callable on SubnetConfigs."""
    return [sum(c.bits for c in cfg.groups.values()) + 0.5 * any(c.per_channel for c in cfg.groups.values())
            for cfg in configs]


def _assert_runs_on(cfg, sn, profile):
    sn.validate(cfg)
    p = get_profile(profile)
    if p is None:
        return
    for g, ch in cfg.groups.items():
        w = sn.groups[g].is_weight
        assert ch.bits in (p.space.weight_bits if w else p.space.act_bits)
        assert ch.symmetric in (p.space.weight_symmetric if w else p.space.act_symmetric)
        assert (ch.per_channel in p.space.weight_per_channel) if w else not ch.per_channel
    (wsym,), (pc,) = cfg.scheme(sn.weight_groups)
    (asym,), _ = cfg.scheme(sn.act_groups)                       # one global scheme per subnet


# --- profiles and the search space ------------------------------------------------------------------------------
def test_profiles_restrict_the_space(net):
    sn, _ = net
    trt = SearchSpace.from_supernet(sn, "tensorrt")
    assert {c.flags() for c in trt.conditions} == {(True, True, True)}
    for g, w, ch in zip(trt.group_names, trt.is_weight, trt.choices):
        assert ch == ((8,) if g in sn.fixed_groups or not w else (4, 8))
    qnn = SearchSpace.from_supernet(sn, "qnn")
    assert {c.flags() for c in qnn.conditions} == {(True, True, False), (False, True, False)}
    assert len(SearchSpace.from_supernet(sn, "brevitas").conditions) == 8
    custom = BackendProfile("npu", eq.ElasticSpace(weight_bits=(2, 4, 8), act_bits=(4, 8), weight_per_channel=(False,)))
    sp = SearchSpace.from_supernet(sn, custom)
    assert all(not c.per_channel for c in sp.conditions)
    with pytest.raises(ValueError, match="unknown backend profile"):
        get_profile("tpu")
    with pytest.raises(ValueError, match="fixed_bits"):                  # fixed groups at 8 bits, profile 2/4 only
        SearchSpace.from_supernet(sn, BackendProfile("w2", eq.ElasticSpace(weight_bits=(2, 4))))
    with pytest.raises(ValueError, match="space must be an ElasticSpace"):
        BackendProfile("bad", (1,))
    space = eq.ElasticSpace(weight_symmetric=(False,))
    gm = prepare_qat_fx(TinyResNet(widths=(4, 8)).train(), eq.elastic_qconfig_mapping(space),
                        (torch.randn(2, 1, 8, 8),))
    with pytest.raises(ValueError, match="weight_symmetric"):
        SearchSpace.from_supernet(eq.Supernet(gm, space), "tensorrt")
    assert set(PROFILES) == {"tensorrt", "qnn", "openvino", "brevitas"}


def test_encode_decode_round_trip_and_errors(net):
    sn, _ = net
    sp = SearchSpace.from_supernet(sn)
    bits, cond = sp.sample_around(50, np.random.default_rng(1))
    assert sp.contains(bits, cond).all()
    for b, c in zip(bits, cond):
        cfg = sp.decode(b, c)
        sn.validate(cfg)
        b2, c2 = sp.encode(cfg)
        assert (b2 == b).all() and c2 == c
    cfg = sp.decode(bits[0], cond[0])
    g = sn.weight_groups[1]
    mixed = cfg.replace(**{g: QuantChoice(cfg[g].bits, not cfg[g].symmetric, cfg[g].per_channel)})
    with pytest.raises(ValueError, match="mixes"):
        sp.encode(mixed)
    with pytest.raises(ValueError, match="outside this search space"):
        SearchSpace.from_supernet(sn, "tensorrt").encode(sn.uniform(2, 2, symmetric=True, per_channel=True))
    assert SearchSpace.from_dict(sp.to_dict()).to_dict() == sp.to_dict()


def test_sample_around_covers_low_and_high_targets(net):
    sn, _ = net
    sp = SearchSpace.from_supernet(sn)
    bits, _ = sp.sample_around(2000, np.random.default_rng(0))
    avg = bits[:, sp.searchable & sp.is_weight].mean(1)
    assert avg.min() < 3 and avg.max() > 7                         # uniform targets reach both ends
    assert np.histogram(avg, bins=4, range=(2, 8))[0].min() > 200  # and spread evenly in between


# --- genetic search ---------------------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=st.sampled_from([None, "tensorrt", "qnn", "brevitas"]), frac=st.floats(0.35, 1.0),
       which=st.sampled_from(["max_bitops", "max_size_bytes", "max_avg_weight_bits", "max_avg_act_bits"]),
       seed=st.integers(0, 2 ** 16))
def test_every_returned_config_meets_constraints_and_profile(net, profile, frac, which, seed):
    sn, cm = net
    sp = SearchSpace.from_supernet(sn, profile)
    c = len(sp.conditions)
    lo = cm.batch(np.tile(sp.min_bits(), (c, 1)), sp.cond_flags[:, :1], sp.cond_flags[:, 1:2])
    hi = cm.batch(np.tile(sp.max_bits(), (c, 1)), sp.cond_flags[:, :1], sp.cond_flags[:, 1:2])
    key = which[4:]
    limit = float(lo[key].min() + frac * (hi[key].max() - lo[key].min()))
    res = evolution_search(SumOfBits(), sn, {which: limit}, EvolutionConfig(population=20, generations=15, seed=seed),
                           cost_model=cm, profile=profile)
    for cand in (res.best, *res.pareto):
        _assert_runs_on(cand.config, sn, profile)
        assert getattr(cm(cand.config), key) <= limit * (1 + 1e-9)
        assert cand.costs == cm(cand.config).to_dict()
    assert res.best.predicted_accuracy == max(c.predicted_accuracy for c in res.pareto)
    rnd = random_search(SumOfBits(), sn, {which: limit}, RandomSearchConfig(n=50, seed=seed),
                        cost_model=cm, profile=profile)
    _assert_runs_on(rnd.best.config, sn, profile)
    assert getattr(cm(rnd.best.config), key) <= limit * (1 + 1e-9)


def test_same_seed_same_result_and_callable_predictor_agrees(net):
    sn, cm = net
    lim = {"max_bitops": 0.4 * cm(sn.max_config()).bitops}
    a = evolution_search(SumOfBits(), sn, lim, EvolutionConfig(population=30, generations=40, seed=7), cost_model=cm)
    b = evolution_search(SumOfBits(), sn, lim, EvolutionConfig(population=30, generations=40, seed=7), cost_model=cm)
    assert a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
    c = evolution_search(sum_of_bits_fn, sn, lim, EvolutionConfig(population=30, generations=40, seed=7), cost_model=cm)
    assert c.best == a.best and c.history == a.history
    d = evolution_search(SumOfBits(), sn, lim, EvolutionConfig(population=30, generations=40, seed=8), cost_model=cm)
    assert d.to_dict()["pareto"] != a.to_dict()["pareto"]


def test_finds_the_optimum_without_constraints_and_beats_random(net):
    sn, cm = net
    sp = SearchSpace.from_supernet(sn)
    res = evolution_search(SumOfBits(), sn, None, EvolutionConfig(population=50, generations=80, seed=0), cost_model=cm)
    assert res.best.predicted_accuracy == sp.max_bits().sum() + 0.5            # every group at 8 bits, per-channel
    assert list(res.history) == sorted(res.history)                           # elitism: never gets worse
    lim = {"max_bitops": 0.3 * cm(sn.max_config()).bitops}
    ga = evolution_search(SumOfBits(), sn, lim, EvolutionConfig(population=50, generations=100, seed=0), cost_model=cm)
    rnd = random_search(SumOfBits(), sn, lim, RandomSearchConfig(n=ga.evaluations, seed=0), cost_model=cm)
    assert ga.best.predicted_accuracy > rnd.best.predicted_accuracy


def test_impossible_constraint_raises_and_bad_settings(net):
    sn, cm = net
    tiny = 0.5 * cm(sn.min_config(symmetric=True, per_channel=False)).bitops
    with pytest.raises(ValueError, match="infeasible constraints.*max_bitops"):
        evolution_search(SumOfBits(), sn, {"max_bitops": tiny}, cost_model=cm)
    with pytest.raises(ValueError, match="infeasible"):
        random_search(SumOfBits(), sn, Constraints(max_avg_weight_bits=2.5), cost_model=cm, profile="tensorrt")
    with pytest.raises(ValueError, match="infeasible"):
        sample_feasible(SearchSpace.from_supernet(sn), cm, {"max_size_bytes": 10}, 5)
    with pytest.raises(ValueError, match="unknown constraint keys"):
        evolution_search(SumOfBits(), sn, {"max_flops": 1}, cost_model=cm)
    with pytest.raises(ValueError, match="positive"):
        Constraints(max_bitops=-1)
    with pytest.raises(ValueError, match="example_inputs"):
        evolution_search(SumOfBits(), sn, None)
    with pytest.raises(ValueError, match="population"):
        evolution_search(SumOfBits(), sn, None, EvolutionConfig(population=1), cost_model=cm)
    with pytest.raises(ValueError, match="finite"):
        evolution_search(lambda cfgs: [float("nan")] * len(cfgs), sn, None, EvolutionConfig(generations=1),
                         cost_model=cm)


def test_result_json_and_png(net, tmp_path):
    sn, cm = net
    res = evolution_search(SumOfBits(), sn, {"max_bitops": 0.5 * cm(sn.max_config()).bitops},
                           EvolutionConfig(population=20, generations=10, seed=0), cost_model=cm, example_inputs=None)
    res.save(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["version"] == 1 and eq.SubnetConfig.from_dict(d["best"]["config"]) == res.best.config
    ops = [p["costs"]["bitops"] for p in d["pareto"]]
    accs = [p["predicted_accuracy"] for p in d["pareto"]]
    assert ops == sorted(ops) and accs == sorted(accs)
    loaded = SearchResult.load(tmp_path / "r.json")
    assert loaded.to_dict() == res.to_dict() and loaded.best == res.best
    (tmp_path / "bad.json").write_text('{"version": 7}')
    with pytest.raises(ValueError, match="version 7"):
        SearchResult.load(tmp_path / "bad.json")
    res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_top_picks_the_best_measured_candidate(net, tmp_path):
    """The predictor (sum of bits) and the "measurement" disagree: the measured best of the top candidates wins, each
    candidate is measured once, and the result keeps its constraints and round-trips through JSON."""
    sn, cm = net
    lim = {"max_bitops": 0.4 * cm(sn.max_config()).bitops}
    res = evolution_search(SumOfBits(), sn, lim, EvolutionConfig(population=30, generations=30, seed=0), cost_model=cm)
    preds = [c.predicted_accuracy for c in res.top]
    assert len(res.top) == 32 and res.top[0] == res.best and preds == sorted(preds, reverse=True)
    assert len({c.config for c in res.top}) == len(res.top)                  # distinct subnets
    calls = []

    def measure(cfg):                                                       # prefers fewer activation bits
        calls.append(cfg)
        return -sum(cfg.groups[g].bits for g in sn.act_groups)
    out = measure_top(res, measure, k=8)
    assert calls == [c.config for c in res.top[:8]]
    best = max(res.top[:8], key=lambda c: measure(c.config))
    assert out.best.config == best.config and out.best.measured_accuracy == measure(best.config)
    assert [c.measured_accuracy for c in out.top] == sorted((c.measured_accuracy for c in out.top), reverse=True)
    assert out.constraints == res.constraints and out.pareto == res.pareto
    out.save(tmp_path / "m.json")
    assert SearchResult.load(tmp_path / "m.json").best == out.best
    with pytest.raises(ValueError, match="positive"):
        measure_top(res, measure, k=0)
    with pytest.raises(ValueError, match="finite"):
        measure_top(res, lambda c: float("nan"))


class RefittedSumOfBits(SumOfBits):
    """Fake CQAP for refine_search: predicts the sum of bits and remembers how many records each fit saw."""

    def __init__(self):
        self.fits = []

    def fit(self, configs, accuracies):
        self.fits.append(len(configs))
        return self


def test_refine_search_measures_each_subnet_once_and_keeps_the_best(net):
    sn, cm = net
    lim = {"max_bitops": 0.4 * cm(sn.max_config()).bitops}
    records = [Record(0, sn.max_config(), 0.0, {}), Record(1, sn.min_config(), 1.0, {})]
    calls = []

    def measure(cfg):
        calls.append(cfg)
        return -sum(cfg.groups[g].bits for g in sn.act_groups)
    fake = RefittedSumOfBits()
    res = refine_search(fake, records, measure, sn, lim,
                        RefineConfig(rounds=3, k=5, search=EvolutionConfig(population=20, generations=10)),
                        cost_model=cm)
    assert len(calls) == len(set(calls)) <= 15                               # each subnet measured once
    assert fake.fits[0] == 2 and fake.fits == sorted(fake.fits) and fake.fits[-1] > 2   # records grow per round
    assert res.best.measured_accuracy == max(-sum(c.groups[g].bits for g in sn.act_groups) for c in calls)
    assert {c.config for c in res.top} == set(calls)
    assert [c.measured_accuracy for c in res.top] == sorted((c.measured_accuracy for c in res.top), reverse=True)
    for c in res.top:
        _assert_runs_on(c.config, sn, None)
        assert c.costs["bitops"] <= lim["max_bitops"]
    with pytest.raises(ValueError, match="rounds"):
        RefineConfig(rounds=0)


def test_pareto_front_small_case():
    acc = [0.5, 0.6, 0.55, 0.7, 0.7, 0.4]
    ops = [1.0, 2.0, 3.0, 3.0, 4.0, 0.5]
    assert pareto_front(acc, ops).tolist() == [5, 0, 1, 3]
