"""Search: cost model, backend profiles, accuracy predictor (CQAP) and genetic search.

    cm = CostModel.from_supernet(sn, x[:1])                          # real shapes -> MACs, BitOps, size
    recs = collect_records(sn, val_loader, bn_batches, 1000, "runs/records.jsonl")   # measured subnets
    cqap = CQAP(SearchSpace.from_supernet(sn)).fit([r.config for r in recs], [r.accuracy for r in recs])
    res = evolution_search(cqap, sn, {"max_bitops": 0.3 * cm(sn.max_config()).bitops}, cost_model=cm,
                           profile="tensorrt")
    res.best.config; res.save("runs/search.json"); res.plot("runs/pareto.png")
"""
from .cost import CostModel, Costs, LayerCost, cost_of
from .encoding import Condition, SearchSpace
from .evolution import (Candidate, Constraints, SearchResult, evolution_search, measure_top, random_search,
                        refine_search, sample_feasible)
from .pareto import pareto_front, plot_pareto
from .predictor import CQAP, GBT_SHAPES, kendall_tau, pearson
from .profiles import PROFILES, BackendProfile, get_profile
from .records import Record, collect_records, load_records, sample_config

__all__ = ["CostModel", "Costs", "LayerCost", "cost_of", "Condition", "SearchSpace", "Constraints", "Candidate",
           "SearchResult", "evolution_search", "measure_top", "random_search", "refine_search", "sample_feasible",
           "pareto_front", "plot_pareto", "CQAP", "GBT_SHAPES", "kendall_tau", "pearson", "BackendProfile", "PROFILES",
           "get_profile", "Record", "collect_records", "load_records", "sample_config"]
