"""Search: cost model, backend profiles, subnet measurer, accuracy predictor (CQAP) and genetic search.

    cm = CostModel.from_supernet(sn, x[:1])                          # real shapes -> MACs, BitOps, size
    measure = SubnetMeasurer(lambda c: evaluate(sn, c, val_loader, bn_batches))   # each subnet measured once
    recs = collect_records(sn, measure, 1000, "runs/records.jsonl", cost_model=cm)   # measured subnets
    cqap = CQAP(SearchSpace.from_supernet(sn)).fit([r.config for r in recs], [r.accuracy for r in recs])
    res = evolution_search(cqap, sn, {"max_bitops": 0.3 * cm(sn.max_config()).bitops}, cost_model=cm,
                           profile="tensorrt")
    res = refine_search(CQAP(cqap.space), recs, measure, sn, {"max_bitops": ...}, cost_model=cm)  # on measurements
    res.best.config; res.save("runs/search.json"); res.plot("runs/pareto.png")
"""
from .cost import CostModel, Costs, LayerCost, cost_of
from .encoding import Condition, SearchSpace
from .evolution import (Candidate, Constraints, EvolutionConfig, RandomSearchConfig, SearchResult, evolution_search,
                        random_search, sample_feasible)
from .measure import Evaluate, SubnetMeasurer
from .pareto import pareto_front, plot_pareto
from .predictor import CQAP, GBT_SHAPES, Regressor, kendall_tau, pearson
from .profiles import PROFILES, BackendProfile, get_profile
from .records import Record, RecordsConfig, collect_records, load_records, sample_config, supernet_fingerprint
from .refine import RefineConfig, measure_top, refine_search

__all__ = ["CostModel", "Costs", "LayerCost", "cost_of", "Condition", "SearchSpace", "Constraints", "Candidate",
           "SearchResult", "EvolutionConfig", "RandomSearchConfig", "evolution_search", "random_search",
           "sample_feasible", "Evaluate", "SubnetMeasurer", "RefineConfig", "measure_top", "refine_search",
           "pareto_front", "plot_pareto", "CQAP", "Regressor", "GBT_SHAPES", "kendall_tau", "pearson",
           "BackendProfile", "PROFILES", "get_profile", "Record", "RecordsConfig", "collect_records", "load_records",
           "sample_config", "supernet_fingerprint"]
