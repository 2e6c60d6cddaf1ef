"""The search stage on an `Experiment`: measure records, fit the CQAP predictor, search under constraints and a
backend profile, measure the chosen subnet."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ...search.evolution import EvolutionConfig
from ...search.refine import MEASURE_K, RefineConfig
from ...supernet import Supernet
from ...train import evaluate
from .stages import Experiment, _progress


@dataclass
class SearchOutcome:
    """Result of `search_experiment`: the search result, the measured accuracy of its best subnet, the predictor's
    held-out quality and the files written."""

    result: object
    measured_accuracy: float
    predictor: dict
    files: dict[str, str]
    reference: dict


def default_bitops_fraction(profile: str | None) -> float:
    """The BitOps limit (a fraction of the all-8-bit subnet's) of a search given no constraint: 0.7 under the
    ``tensorrt`` and ``qnn`` profiles (they run 4- and 8-bit cells only), 1.0 under ``openvino`` (8-bit cells only:
    every subnet has the BitOps of the all-8-bit one), 0.3 otherwise."""
    if profile == "openvino":
        return 1.0
    return 0.7 if profile in ("tensorrt", "qnn") else 0.3


def _constraints(cm, sn: Supernet, constraints: Mapping | None, bitops_fraction: float | None) -> dict:
    c = dict(constraints or {})
    if bitops_fraction is not None:
        ref = cm(sn.uniform(max(sn.space.weight_bits), max(sn.space.act_bits))).bitops
        c["max_bitops"] = min(c.get("max_bitops", float("inf")), bitops_fraction * ref)
    return c


def fit_predictor(exp: Experiment, records: list, *, holdout: float = 0.2, epochs: int = 300, seed: int = 0):
    """CQAP on `records` minus a held-out share; returns (cqap, {"kendall_tau", "pearson", "rmse", "n"})."""
    from ...search import CQAP, SearchSpace
    n_test = max(2, int(round(holdout * len(records)))) if len(records) >= 6 else 0
    train, test = records[: len(records) - n_test], records[len(records) - n_test:]
    cqap = CQAP(SearchSpace.from_supernet(exp.supernet), seed=seed)
    cqap.fit([r.config for r in train], [r.accuracy for r in train], epochs=epochs)
    quality = cqap.evaluate([r.config for r in test], [r.accuracy for r in test]) if n_test else {"n": 0}
    quality["n_train"] = len(train)
    return cqap, quality


def collect(exp: Experiment, path: str | os.PathLike, n: int, *, seed: int = 0, progress: bool = False,
            fingerprint: str | None = None) -> list:
    """`collect_records` on the validation split with a progress bar (resumes an existing file measured on the
    same supernet: `fingerprint`, default `supernet_fingerprint(exp.supernet)`).

    Raises:
        RecordsMismatchError: `path` holds records of another supernet, or records without a fingerprint.
    """
    from ...search import CostModel, RecordsConfig, collect_records
    from ...search.records import supernet_fingerprint
    fingerprint = fingerprint if fingerprint is not None else supernet_fingerprint(exp.supernet)
    cm = CostModel.from_supernet(exp.supernet, exp.example_inputs)
    done = 0
    if os.path.exists(path):
        from ...search import load_records
        done = min(n, len(load_records(path)))
    with _progress(progress, total=n, initial=done, desc="records") as bar:
        return collect_records(exp.supernet, lambda cfg: evaluate(exp.supernet, cfg, exp.val_loader, exp.bn_batches),
                               n, path, RecordsConfig(seed=seed, fingerprint=fingerprint), cost_model=cm,
                               progress=lambda i, r: bar.update(1))


@dataclass(frozen=True)
class SearchSettings:
    """What `search_experiment` does (validated).

    Attributes:
        profile: backend profile name (`eqnet_plugin.search.profiles.PROFILES`); None: the whole space.
        constraints: limits by name (``max_bitops``, ``max_size_bytes``, ``max_avg_weight_bits``,
            ``max_avg_act_bits``).
        bitops_fraction: a BitOps limit as a fraction of the all-8-bit subnet's (combined with ``max_bitops``).
        records: subnets measured on the validation split for the predictor (>= 2).
        records_path: where the records go (default ``<out_dir>/records.jsonl``); resumed when measured on the
            same supernet.
        population, generations: genetic search settings.
        cqap_epochs: training epochs of the CQAP's MLP.
        seed: sampling, predictor and search seed.
        measure_top_k: measure this many best-predicted subnets on the validation split and keep the best measured
            (0: keep the best predicted).
        refine_rounds: rounds of fit -> search -> measure top (needs measured records).
    """

    profile: str | None = None
    constraints: Mapping[str, float] | None = None
    bitops_fraction: float | None = None
    records: int = 200
    records_path: str | os.PathLike | None = None
    population: int = EvolutionConfig.population
    generations: int = EvolutionConfig.generations
    cqap_epochs: int = 300
    seed: int = 0
    measure_top_k: int = MEASURE_K
    refine_rounds: int = RefineConfig.rounds

    def __post_init__(self) -> None:
        if self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"SearchSettings.profile={self.profile!r}: give a profile name (tensorrt, qnn, "
                             "brevitas) or None")
        if self.bitops_fraction is not None and not (isinstance(self.bitops_fraction, (int, float))
                                                     and self.bitops_fraction > 0):
            raise ValueError(f"SearchSettings.bitops_fraction={self.bitops_fraction!r}: use a positive number (e.g. "
                             "0.3 = 30% of the all-8-bit subnet's BitOps) or None")
        for name, lo in (("records", 2), ("population", 2), ("generations", 0), ("cqap_epochs", 1), ("seed", 0),
                         ("measure_top_k", 0), ("refine_rounds", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"SearchSettings.{name}={v!r}: use an integer >= {lo}")


def search_experiment(exp: Experiment, out_dir: str | os.PathLike, settings: SearchSettings = SearchSettings(), *,
                      predictor=None, progress: bool = False) -> SearchOutcome:
    """Records -> CQAP -> genetic search under the constraints and profile of `settings` -> test accuracy of the
    chosen subnet.

    The choice is made on measured validation accuracy: `refine_search` runs ``refine_rounds`` rounds of (fit the
    CQAP on the records plus the subnets measured so far -> search -> measure its ``measure_top_k`` best-predicted
    subnets) and keeps the best measured. With a given `predictor` (no records to refit on) one search +
    `measure_top`. ``measure_top_k=0`` keeps the best predicted subnet.

    Writes into `out_dir`: ``search.json`` (result), ``best.json`` (SubnetConfig), ``pareto.png`` (plot) and, when
    no `predictor` is given, ``records.jsonl`` (or ``records_path``) and ``cqap.pt``.
    The constraints are checked for feasibility, and an existing records file for the supernet it was measured on
    (`supernet_fingerprint`), before any record is measured.

    Raises:
        ValueError: infeasible constraints, a profile the supernet's space cannot serve.
        RecordsMismatchError (a ValueError): the records file holds records of another supernet, or records
            without a fingerprint.
    """
    from ...search import (
        CQAP,
        CostModel,
        EvolutionConfig,
        RefineConfig,
        SearchSpace,
        evolution_search,
        measure_top,
        plot_pareto,
        refine_search,
        sample_feasible,
    )
    sn = exp.supernet
    out = Path(out_dir)
    cm = CostModel.from_supernet(sn, exp.example_inputs)
    st = settings
    seed = st.seed
    cons = _constraints(cm, sn, st.constraints, st.bitops_fraction)
    sample_feasible(SearchSpace.from_supernet(sn, st.profile), cm, cons, 1, seed=seed)     # fails fast if infeasible
    files: dict[str, str] = {}
    quality: dict = {}
    extra: dict = {}
    if predictor is None:
        rpath = os.fspath(st.records_path or out / "records.jsonl")
        recs = collect(exp, rpath, st.records, seed=seed, progress=progress)
        near = [r for r in recs if r.costs["bitops"] <= 1.2 * cons.get("max_bitops", float("inf"))]
        extra["measured subnets (val)"] = ([r.costs["bitops"] for r in near], [r.accuracy for r in near])
        predictor, quality = fit_predictor(exp, recs, epochs=st.cqap_epochs, seed=seed)
        predictor.save(out / "cqap.pt")
        files.update(records=rpath, predictor=os.fspath(out / "cqap.pt"))
    ga = EvolutionConfig(population=st.population, generations=st.generations, seed=seed)

    def val_accuracy(cfg):
        return evaluate(sn, cfg, exp.val_loader, exp.bn_batches)
    if st.measure_top_k and st.refine_rounds and "records" in files:
        template = CQAP(predictor.space, predictor.hidden, seed, predictor.regressor, predictor.gbt_params)
        result = refine_search(template, recs, val_accuracy, sn, cons,
                               RefineConfig(st.refine_rounds, st.measure_top_k, ga), cost_model=cm, profile=st.profile)
    else:
        result = evolution_search(predictor, sn, cons, ga, cost_model=cm, profile=st.profile)
        if st.measure_top_k:
            result = measure_top(result, val_accuracy, k=st.measure_top_k)
    best = result.best.config
    measured = evaluate(sn, best, exp.test_loader, exp.bn_batches)
    ref_cfg = sn.uniform(max(sn.space.weight_bits), max(sn.space.act_bits))
    reference = {"w8a8_bitops": cm(ref_cfg).bitops, "w8a8_size_bytes": cm(ref_cfg).size_bytes}
    result.save(out / "search.json")
    best.to_json(out / "best.json")
    extra["chosen, measured (test)"] = ([result.best.costs["bitops"]], [measured])
    plot_pareto(out / "pareto.png", result.points, ([c.costs["bitops"] for c in result.pareto],
                                                    [c.predicted_accuracy for c in result.pareto]),
                best=(result.best.costs["bitops"], result.best.predicted_accuracy),
                max_bitops=result.constraints.max_bitops, extra=extra, ylabel="accuracy (predicted unless marked)",
                title=f"search under profile {result.profile!r}: accuracy vs BitOps")
    files.update(result=os.fspath(out / "search.json"), best=os.fspath(out / "best.json"),
                 plot=os.fspath(out / "pareto.png"))
    return SearchOutcome(result, measured, quality, files, reference)
