"""Choosing on measurements: `measure_top` (measure a search's best-predicted subnets, keep the best measured) and
`refine_search` (rounds of refit -> search -> measure).

A genetic search exploits its predictor's errors: its best-predicted subnets are the ones the predictor overrates
most. Measuring them (on held-out training data, never the test set) makes the final choice on measured accuracy,
and refitting on the measurements corrects the predictor exactly there. Both measure through a `SubnetMeasurer`
(or a plain accuracy function, wrapped in a one-process one), so each distinct subnet is measured once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from ..quant.space import SubnetConfig
from .cost import CostModel
from .evolution import Candidate, Constraints, EvolutionConfig, SearchResult, evolution_search
from .measure import Evaluate, SubnetMeasurer, as_measurer
from .profiles import BackendProfile

__all__ = ["RefineConfig", "measure_top", "refine_search"]

MEASURE_K = 10              # best-predicted subnets measured per search


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


@dataclass(frozen=True)
class RefineConfig:
    """Settings of `refine_search`.

    Attributes:
        rounds: search rounds (1 = one search + `measure_top`).
        k: subnets measured per round (the round's `k` best predicted).
        search: the `EvolutionConfig` of every round; round r searches with seed ``search.seed + r`` (an int).
    """

    rounds: int = 3
    k: int = MEASURE_K
    search: EvolutionConfig = field(default_factory=EvolutionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"RefineConfig.rounds must be a positive integer, got {self.rounds!r}")
        _check_k(self.k)
        if not isinstance(self.search, EvolutionConfig) or not isinstance(self.search.seed, int):
            raise TypeError("RefineConfig.search must be an EvolutionConfig with an int seed")


def measure_top(result: SearchResult, measure: SubnetMeasurer | Evaluate, k: int = MEASURE_K) -> SearchResult:
    """Measure the `k` best-predicted subnets of a search and return the result with the best MEASURED one as
    `best` (ties: the better predicted). `top` then holds the measured candidates, by measured accuracy.

    `measure` is a `SubnetMeasurer` (its workers measure the `k` subnets in parallel) or an accuracy function
    ``cfg -> accuracy``, e.g. ``lambda c: evaluate(sn, c, val_loader, bn_batches)``.

    Raises:
        ValueError: `k` < 1, the result holds no `top` candidates, or a measurement is not finite.
    """
    _check_k(k)
    if not result.top:
        raise ValueError("this SearchResult holds no top candidates; rerun the search")
    top = result.top[:k]
    accs = as_measurer(measure).accuracies([c.config for c in top])
    measured = [replace(c, measured_accuracy=a) for c, a in zip(top, accs)]
    ranked = sorted(measured, key=lambda c: -c.measured_accuracy)          # stable: ties keep the predicted order
    return replace(result, best=ranked[0], top=tuple(ranked))


def refine_search(cqap, records: Sequence, measure: SubnetMeasurer | Evaluate, space,
                  constraints: Constraints | Mapping | None = None, config: RefineConfig | None = None, *,
                  cost_model: CostModel | None = None, profile: str | BackendProfile | None = None) -> SearchResult:
    """Search with re-measurement: ``config.rounds`` times (fit `cqap` on the records plus every subnet measured so
    far -> `evolution_search` -> `measure_top`), then return the last round's result with the best MEASURED subnet
    of all rounds as `best` and every measured candidate in `top` (by measured accuracy).

    BENCHMARKS.md (bench_search) has the measured curve of validation accuracy against rounds. Measure on held-out
    training data, never the test set. Each distinct subnet is measured once.

    Args:
        cqap: a `CQAP` (refit from scratch each round; its settings are kept).
        records: the measured records (`Record`s from `collect_records`, or anything with ``.config`` and
            ``.accuracy``).
        measure: a `SubnetMeasurer` (e.g. the one that measured the records) or an accuracy function
            ``cfg -> accuracy``.
        space, constraints, cost_model, profile: as for `evolution_search` (with a Supernet, pass `cost_model`).
        config: `RefineConfig` (rounds, k, the search's `EvolutionConfig`); default ``RefineConfig()``.
    Raises:
        whatever `evolution_search` and `measure_top` raise.
    """
    config = RefineConfig() if config is None else config
    if not isinstance(config, RefineConfig):
        raise TypeError(f"refine_search: config must be a RefineConfig, got {type(config).__name__}")
    measurer = as_measurer(measure)
    try:
        xs, ys = [r.config for r in records], [float(r.accuracy) for r in records]
    except AttributeError:
        raise TypeError("refine_search: records must have .config and .accuracy (Records from collect_records)"
                        ) from None
    measured: dict[SubnetConfig, Candidate] = {}
    for r in range(config.rounds):
        search = replace(config.search, seed=config.search.seed + r)
        res = measure_top(evolution_search(cqap.fit(xs, ys), space, constraints, search, cost_model=cost_model,
                                           profile=profile), measurer, k=config.k)
        for c in res.top:
            if c.config not in measured:
                measured[c.config] = c
                xs.append(c.config)
                ys.append(c.measured_accuracy)
    ranked = sorted(measured.values(), key=lambda c: -c.measured_accuracy)    # stable: earlier rounds win ties
    return replace(res, best=ranked[0], top=tuple(ranked))
