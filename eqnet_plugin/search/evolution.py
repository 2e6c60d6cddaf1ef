"""Genetic search for the best subnet under cost constraints (paper section 3.5), and random search.

Each generation keeps the top `parents` fraction of the population, then breeds `population` children: a
`mutation_ratio` share by mutation (every searchable gene, including the global condition, is redrawn with
probability `mutation_prob`) and the rest by uniform crossover of two random parents. Children that break a
constraint are redrawn (at most `max_attempts` rounds, then parents fill the gaps), so every population is feasible.
The settings are an `EvolutionConfig` (the paper's by default); `random_search` takes a `RandomSearchConfig`.
Fitness is evaluated for the whole population in one batched predictor call.

The predictor is either an object with ``predict_arrays(group_names, bits, flags) -> (N,)`` (e.g. `CQAP`; fast), or
any callable ``fn(list[SubnetConfig]) -> sequence of accuracies`` (each distinct subnet is evaluated once).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..quant.space import SubnetConfig, atomic_write_text
from .cost import CostModel
from .encoding import SPREAD, SearchSpace
from .pareto import pareto_front, plot_pareto
from .profiles import BackendProfile

__all__ = ["Constraints", "Candidate", "SearchResult", "EvolutionConfig", "RandomSearchConfig", "evolution_search",
           "random_search", "sample_feasible", "RESULT_VERSION"]

RESULT_VERSION = 1
TOP_K = 32                  # best-predicted candidates kept in a SearchResult for `measure_top`
MAX_ATTEMPTS = 100          # rounds of redrawing infeasible random subnets (`random_search`, `sample_feasible`)
_COST_KEYS = {"max_bitops": "bitops", "max_size_bytes": "size_bytes", "max_avg_weight_bits": "avg_weight_bits",
              "max_avg_act_bits": "avg_act_bits"}


@dataclass(frozen=True)
class Constraints:
    """Upper limits on subnet costs (None: no limit). Units: BitOps, bytes, bits."""

    max_bitops: float | None = None
    max_size_bytes: float | None = None
    max_avg_weight_bits: float | None = None
    max_avg_act_bits: float | None = None

    def __post_init__(self) -> None:
        for k in _COST_KEYS:
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"Constraints.{k}={v!r} must be a positive number or None")

    @classmethod
    def coerce(cls, c: "Constraints | Mapping | None") -> "Constraints":
        if c is None:
            return cls()
        if isinstance(c, Constraints):
            return c
        if isinstance(c, Mapping):
            unknown = set(c) - set(_COST_KEYS)
            if unknown:
                raise ValueError(f"unknown constraint keys {sorted(unknown)}; valid keys are {sorted(_COST_KEYS)}")
            return cls(**c)
        raise TypeError(f"constraints must be Constraints, a dict or None, got {type(c).__name__}")

    def mask(self, costs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N,) bools: every limit is met (a tiny relative tolerance absorbs float rounding)."""
        ok = np.ones(len(costs["bitops"]), dtype=bool)
        for k, key in _COST_KEYS.items():
            v = getattr(self, k)
            if v is not None:
                ok &= costs[key] <= v * (1 + 1e-12)
        return ok

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """A subnet with its predicted accuracy and costs (`Costs.to_dict()` keys)."""

    config: SubnetConfig
    predicted_accuracy: float
    costs: dict
    measured_accuracy: float | None = None

    def to_dict(self) -> dict:
        d = {"config": self.config.to_dict(), "predicted_accuracy": self.predicted_accuracy, "costs": self.costs}
        if self.measured_accuracy is not None:
            d["measured_accuracy"] = self.measured_accuracy
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Candidate":
        m = d.get("measured_accuracy")
        return cls(SubnetConfig.from_dict(d["config"]), float(d["predicted_accuracy"]), dict(d["costs"]),
                   None if m is None else float(m))


@dataclass(frozen=True)
class SearchResult:
    """What a search returns.

    Attributes:
        best: the subnet with the highest predicted accuracy among every feasible subnet evaluated (after
            `measure_top`: the best measured of the top candidates).
        pareto: the accuracy-vs-BitOps Pareto front of the evaluated feasible subnets, by increasing BitOps.
        history: best predicted accuracy after each generation.
        evaluations: distinct subnets scored. seconds: wall time.
        points: (bitops, predicted accuracy) arrays of every distinct evaluated subnet (for the plot).
        top: the `TOP_K` distinct feasible subnets with the highest predicted accuracy, best first (candidates for
            `measure_top`).
    """

    best: Candidate
    pareto: tuple[Candidate, ...]
    history: tuple[float, ...]
    evaluations: int
    seconds: float
    constraints: Constraints
    profile: str
    settings: dict
    points: tuple[np.ndarray, np.ndarray] = field(repr=False, compare=False, default=(np.zeros(0), np.zeros(0)))
    top: tuple[Candidate, ...] = ()

    def to_dict(self) -> dict:
        return {"version": RESULT_VERSION, "best": self.best.to_dict(), "pareto": [c.to_dict() for c in self.pareto],
                "top": [c.to_dict() for c in self.top],
                "history": list(self.history), "evaluations": self.evaluations, "seconds": self.seconds,
                "constraints": self.constraints.to_dict(), "profile": self.profile, "settings": self.settings}

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as JSON (atomic). The best config alone: ``result.best.config.to_json(path)``."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchResult":
        """Read a result written by `save` (the evaluated-points cloud is not stored).

        Raises:
            FileNotFoundError / ValueError: missing file, not JSON, other version or malformed content.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"search result {path!r} does not exist")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not JSON ({e}); search results are written by SearchResult.save") from None
        if not isinstance(d, dict) or d.get("version") != RESULT_VERSION:
            raise ValueError(f"{path!r}: search result version {d.get('version') if isinstance(d, dict) else None!r}"
                             f" is not supported (this release reads version {RESULT_VERSION})")
        try:
            cand = Candidate.from_dict
            return cls(cand(d["best"]), tuple(cand(c) for c in d["pareto"]), tuple(d["history"]),
                       int(d["evaluations"]), float(d["seconds"]), Constraints(**d["constraints"]), str(d["profile"]),
                       dict(d["settings"]), top=tuple(cand(c) for c in d["top"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path!r}: malformed search result ({type(e).__name__}: {e})") from None

    def plot(self, path: str | os.PathLike, extra: dict | None = None, title: str | None = None,
             ylabel: str = "predicted accuracy") -> None:
        """Draw the Pareto front (PNG): evaluated subnets, front, chosen subnet, BitOps limit, `extra` series
        (label -> (bitops, accuracy), e.g. measured accuracies)."""
        plot_pareto(path, self.points, ([c.costs["bitops"] for c in self.pareto],
                                        [c.predicted_accuracy for c in self.pareto]),
                    best=(self.best.costs["bitops"], self.best.predicted_accuracy),
                    max_bitops=self.constraints.max_bitops, extra=extra,
                    title=title or f"search ({self.profile}): predicted accuracy vs BitOps", ylabel=ylabel)


# --- the problem: space + costs + constraints + fitness ---------------------------------------------------------
class _Problem:
    def __init__(self, space: SearchSpace, cost_model: CostModel, constraints: Constraints, predictor) -> None:
        if cost_model.group_names != space.group_names:
            raise ValueError("cost_model and search space describe different groups; build both from one Supernet")
        self.space, self.cost_model, self.constraints = space, cost_model, constraints
        self.vectorized = hasattr(predictor, "predict_arrays")
        if not self.vectorized and not callable(predictor):
            raise TypeError("predictor must have predict_arrays(group_names, bits, flags) (e.g. CQAP) or be a "
                            "callable taking a list of SubnetConfig and returning accuracies")
        self.predictor = predictor
        self.memo: dict[bytes, float] = {}

    def costs(self, bits: np.ndarray, cond: np.ndarray) -> dict[str, np.ndarray]:
        f = self.space.flags(cond)                                                      # (N, 3)
        return self.cost_model.batch(bits, f[:, :1], f[:, 1:2])

    def feasible(self, bits: np.ndarray, cond: np.ndarray) -> np.ndarray:
        return self.constraints.mask(self.costs(bits, cond)) & self.space.contains(bits, cond)

    def fitness(self, bits: np.ndarray, cond: np.ndarray) -> np.ndarray:
        if self.vectorized:
            out = np.asarray(self.predictor.predict_arrays(self.space.group_names, bits, self.space.flags(cond)),
                             dtype=np.float64)
        else:
            keys = [_key(b, c) for b, c in zip(bits, cond)]
            todo = {k: i for i, k in enumerate(keys) if k not in self.memo}
            if todo:
                idx = list(todo.values())
                vals = np.asarray(self.predictor([self.space.decode(bits[i], cond[i]) for i in idx]),
                                  dtype=np.float64).reshape(-1)
                if len(vals) != len(idx):
                    raise ValueError(f"predictor returned {len(vals)} values for {len(idx)} configs")
                self.memo.update(zip(todo, vals.tolist()))
            out = np.array([self.memo[k] for k in keys], dtype=np.float64)
        if out.shape != (len(bits),) or not np.isfinite(out).all():
            raise ValueError(f"predictor must return {len(bits)} finite accuracies, got shape {out.shape}")
        return out

    def check_feasible(self) -> None:
        """Raise ValueError when even the cheapest subnet (narrowest bits, cheapest condition) breaks a limit."""
        c = len(self.space.conditions)
        bits, cond = np.tile(self.space.min_bits(), (c, 1)), np.arange(c)
        if self.feasible(bits, cond).any():
            return
        costs = self.costs(bits, cond)
        lows = {key: float(costs[key].min()) for key in _COST_KEYS.values()}
        broken = [f"{k}={getattr(self.constraints, k):.6g} (the cheapest subnet has {key}={lows[key]:.6g})"
                  for k, key in _COST_KEYS.items()
                  if getattr(self.constraints, k) is not None and lows[key] > getattr(self.constraints, k)]
        raise ValueError(f"infeasible constraints under profile {self.space.profile!r}: {'; '.join(broken) or lows}."
                         " Loosen the limits, widen the space (lower bits) or choose another profile")

    def candidate(self, bits_row: np.ndarray, cond: int, acc: float) -> Candidate:
        cfg = self.space.decode(bits_row, cond)
        return Candidate(cfg, float(acc), self.cost_model(cfg).to_dict())


def _key(bits_row: np.ndarray, cond) -> bytes:
    return np.asarray(bits_row, dtype=np.int8).tobytes() + bytes([int(cond)])


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed).__name__}")
    return np.random.default_rng(seed)


def _resolve(space, profile, cost_model, example_inputs) -> tuple[SearchSpace, CostModel]:
    if isinstance(space, SearchSpace):
        if profile is not None:
            raise ValueError("profile= applies when a Supernet is given; with a SearchSpace, build it with "
                             "SearchSpace.from_supernet(supernet, profile)")
        if cost_model is None:
            raise ValueError("with a SearchSpace, pass cost_model=CostModel.from_supernet(supernet, example_inputs)")
        return space, cost_model
    if not (hasattr(space, "groups") and hasattr(space, "fixed_groups")):
        raise TypeError(f"expected a Supernet or a SearchSpace, got {type(space).__name__}")
    if cost_model is None:
        if example_inputs is None:
            raise ValueError("pass cost_model=CostModel.from_supernet(supernet, x[:1]) (evolution_search and "
                             "random_search also take example_inputs=, one input batch of size 1) so the search can "
                             "compute BitOps and model size")
        cost_model = CostModel.from_supernet(space, example_inputs)
    return SearchSpace.from_supernet(space, profile), cost_model


def _draw_feasible(problem: _Problem, n: int, rng: np.random.Generator, max_attempts: int,
                   make: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Up to n feasible rows from `make(k)` batches, at most `max_attempts` batches."""
    bits, cond, have = [], [], 0
    for _ in range(max_attempts):
        if have >= n:
            break
        b, c = make(2 * (n - have) + 8)
        m = problem.feasible(b, c)
        b, c = b[m][: n - have], c[m][: n - have]
        bits.append(b)
        cond.append(c)
        have += len(b)
    g = len(problem.space.group_names)
    return (np.concatenate(bits) if bits else np.zeros((0, g), np.int64),
            np.concatenate(cond) if cond else np.zeros(0, np.int64))


def sample_feasible(space: SearchSpace, cost_model: CostModel, constraints: Constraints | Mapping | None, n: int,
                    seed: int | np.random.Generator = 0, max_attempts: int = MAX_ATTEMPTS, spread: float = SPREAD
                    ) -> list[SubnetConfig]:
    """Up to `n` random subnets (paper sampling, `SearchSpace.sample_around`) that meet `constraints`.

    Raises:
        ValueError: the constraints are infeasible.
    """
    problem = _Problem(space, cost_model, Constraints.coerce(constraints), lambda cfgs: [0.0] * len(cfgs))
    problem.check_feasible()
    rng = _rng(seed)
    bits, cond = _draw_feasible(problem, n, rng, max_attempts, lambda k: space.sample_around(k, rng, spread))
    return [space.decode(b, c) for b, c in zip(bits, cond)]


# --- GA operators ----------------------------------------------------------------------------------------------
def _mutate(space: SearchSpace, pb, pc, k, prob, rng):
    idx = rng.integers(len(pb), size=k)
    bits, cond = pb[idx].copy(), pc[idx].copy()                                        # (k, G), (k,)
    new_bits, new_cond = space.uniform_random(k, rng)
    m = (rng.random(bits.shape) < prob) & space.searchable[None, :]
    bits[m] = new_bits[m]
    mc = rng.random(k) < prob
    cond[mc] = new_cond[mc]
    return bits, cond


def _crossover(pb, pc, k, rng):
    i, j = rng.integers(len(pb), size=k), rng.integers(len(pb), size=k)
    m = rng.random((k, pb.shape[1])) < 0.5
    return np.where(m, pb[i], pb[j]), np.where(rng.random(k) < 0.5, pc[i], pc[j])


def _finish(problem, arch_bits, arch_cond, arch_fit, history, evaluations, t0, settings) -> SearchResult:
    bits, cond, fit = np.concatenate(arch_bits), np.concatenate(arch_cond), np.concatenate(arch_fit)
    keys = np.concatenate([bits, cond[:, None]], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    first = np.sort(first)
    bits, cond, fit = bits[first], cond[first], fit[first]
    ops = problem.costs(bits, cond)["bitops"]
    order = np.lexsort((np.arange(len(fit)), ops, -fit))             # best accuracy, then fewer BitOps, then first
    b = int(order[0])
    front = pareto_front(fit, ops)
    return SearchResult(
        top=tuple(problem.candidate(bits[i], int(cond[i]), fit[i]) for i in order[:TOP_K]),
        best=problem.candidate(bits[b], int(cond[b]), fit[b]),
        pareto=tuple(problem.candidate(bits[i], int(cond[i]), fit[i]) for i in front),
        history=tuple(float(h) for h in history), evaluations=int(len(fit) if evaluations is None else evaluations),
        seconds=time.perf_counter() - t0, constraints=problem.constraints, profile=problem.space.profile,
        settings=settings, points=(ops, fit))


def _check_seed(owner: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.random.Generator)):
        raise TypeError(f"{owner}.seed must be an int or a numpy Generator, got {type(seed).__name__}")


@dataclass(frozen=True)
class EvolutionConfig:
    """Settings of `evolution_search` (defaults: the paper's).

    Attributes:
        population: subnets per generation (>= 2). parents: fraction of the population kept as parents.
        mutation_ratio: share of children bred by mutation (the rest by crossover).
        mutation_prob: probability that a mutation redraws a gene (a group's bits or the condition).
        generations: generations after the initial population (>= 0).
        seed: int or numpy Generator; the same seed gives the same result.
        max_attempts: rounds of redrawing per batch of infeasible children (bounds every loop).
        spread: spread of the initial population's per-group bits around its random targets.
    """

    population: int = 100
    parents: float = 0.25
    mutation_ratio: float = 0.5
    mutation_prob: float = 0.1
    generations: int = 500
    seed: int | np.random.Generator = 0
    max_attempts: int = 50
    spread: float = SPREAD

    def __post_init__(self) -> None:
        if not (isinstance(self.population, int) and self.population >= 2 and isinstance(self.generations, int)
                and self.generations >= 0):
            raise ValueError(f"EvolutionConfig: population must be an int >= 2 and generations an int >= 0; got "
                             f"{self.population}, {self.generations}")
        if not (0 < self.parents <= 1 and 0 <= self.mutation_ratio <= 1 and 0 <= self.mutation_prob <= 1
                and isinstance(self.max_attempts, int) and self.max_attempts >= 1 and self.spread > 0):
            raise ValueError("EvolutionConfig: need 0 < parents <= 1, 0 <= mutation_ratio <= 1, "
                             "0 <= mutation_prob <= 1, an int max_attempts >= 1 and spread > 0")
        _check_seed("EvolutionConfig", self.seed)

    def settings(self) -> dict:
        """The settings as stored in `SearchResult.settings` (a Generator seed is stored as None)."""
        return {"population": self.population, "parents": self.parents, "mutation_ratio": self.mutation_ratio,
                "mutation_prob": self.mutation_prob, "generations": self.generations,
                "max_attempts": self.max_attempts, "seed": self.seed if isinstance(self.seed, int) else None}


@dataclass(frozen=True)
class RandomSearchConfig:
    """Settings of `random_search`: `n` random feasible subnets (paper sampling) from `seed`, at most
    `max_attempts` rounds of redrawing, per-group bits drawn with `spread`."""

    n: int = 1000
    seed: int | np.random.Generator = 0
    max_attempts: int = MAX_ATTEMPTS
    spread: float = SPREAD

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"RandomSearchConfig.n must be a positive integer, got {self.n!r}")
        if not (isinstance(self.max_attempts, int) and self.max_attempts >= 1 and self.spread > 0):
            raise ValueError("RandomSearchConfig: need an int max_attempts >= 1 and spread > 0")
        _check_seed("RandomSearchConfig", self.seed)


def _config(owner: str, config, cls):
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"{owner}: config must be a {cls.__name__}, got {type(config).__name__}")
    return config


def evolution_search(predictor, space, constraints: Constraints | Mapping | None = None,
                     config: EvolutionConfig | None = None, *, cost_model: CostModel | None = None,
                     example_inputs=None, profile: str | BackendProfile | None = None) -> SearchResult:
    """Genetic search for the subnet with the best predicted accuracy under `constraints`.

    Args:
        predictor: a fitted `CQAP` (or any object with ``predict_arrays``) or a callable on a list of SubnetConfig.
        space: a `Supernet` (then `profile` restricts it and `example_inputs` builds the cost model) or a
            `SearchSpace` (with `cost_model`).
        constraints: `Constraints` or a dict such as ``{"max_bitops": 2e8}``.
        config: `EvolutionConfig` (population, generations, seed, ...); default ``EvolutionConfig()``.
        cost_model / example_inputs: see `space`.
        profile: backend profile name or `BackendProfile`: only subnets the target runs are proposed.
    Returns:
        `SearchResult` (best, Pareto front, history).
    Raises:
        ValueError: infeasible constraints (checked first on the cheapest subnet), a space/predictor mismatch.
    """
    cfg = _config("evolution_search", config, EvolutionConfig)
    population, generations, max_attempts = cfg.population, cfg.generations, cfg.max_attempts
    mutation_prob, spread = cfg.mutation_prob, cfg.spread
    t0 = time.perf_counter()
    sp, cm = _resolve(space, profile, cost_model, example_inputs)
    problem = _Problem(sp, cm, Constraints.coerce(constraints), predictor)
    problem.check_feasible()
    rng = _rng(cfg.seed)
    n_par = max(1, int(round(cfg.parents * population)))
    n_mut = int(round(cfg.mutation_ratio * population))
    settings = cfg.settings()

    pb, pc = _draw_feasible(problem, population, rng, max_attempts, lambda k: sp.sample_around(k, rng, spread))
    c = len(sp.conditions)
    mins, mc = np.tile(sp.min_bits(), (c, 1)), np.arange(c)
    ok = problem.feasible(mins, mc)
    pb, pc = np.concatenate([pb, mins[ok]])[:population], np.concatenate([pc, mc[ok]])[:population]
    pf = problem.fitness(pb, pc)
    arch_b, arch_c, arch_f, history = [pb], [pc], [pf], []
    for _ in range(generations):
        order = np.lexsort((np.arange(len(pf)), -pf))[:n_par]
        par_b, par_c, par_f = pb[order], pc[order], pf[order]
        mb, mcnd = _draw_feasible(problem, n_mut, rng, max_attempts,
                                  lambda k: _mutate(sp, par_b, par_c, k, mutation_prob, rng))
        xb, xc = _draw_feasible(problem, population - n_mut, rng, max_attempts,
                                lambda k: _crossover(par_b, par_c, k, rng))
        cb, cc = np.concatenate([mb, xb]), np.concatenate([mcnd, xc])
        short = population - len(cb)
        if short > 0:                         # redraws ran out: fill with copies of (feasible) parents
            fill = np.arange(short) % n_par
            cb, cc = np.concatenate([cb, par_b[fill]]), np.concatenate([cc, par_c[fill]])
        cf = problem.fitness(cb, cc)
        arch_b.append(cb)
        arch_c.append(cc)
        arch_f.append(cf)
        pb, pc, pf = np.concatenate([par_b, cb]), np.concatenate([par_c, cc]), np.concatenate([par_f, cf])
        history.append(float(pf.max()))
    return _finish(problem, arch_b, arch_c, arch_f, history or [float(pf.max())], None, t0, settings)


def random_search(predictor, space, constraints: Constraints | Mapping | None = None,
                  config: RandomSearchConfig | None = None, *, cost_model: CostModel | None = None,
                  example_inputs=None, profile: str | BackendProfile | None = None) -> SearchResult:
    """Baseline: score ``config.n`` random feasible subnets (paper sampling) and keep the best. Same arguments and
    result as `evolution_search`, with a `RandomSearchConfig`; fewer than ``n`` subnets are scored when feasible
    ones are rare (``max_attempts`` rounds)."""
    cfg = _config("random_search", config, RandomSearchConfig)
    n, max_attempts, spread, seed = cfg.n, cfg.max_attempts, cfg.spread, cfg.seed
    t0 = time.perf_counter()
    sp, cm = _resolve(space, profile, cost_model, example_inputs)
    problem = _Problem(sp, cm, Constraints.coerce(constraints), predictor)
    problem.check_feasible()
    rng = _rng(seed)
    bits, cond = _draw_feasible(problem, n, rng, max_attempts, lambda k: sp.sample_around(k, rng, spread))
    if not len(bits):
        c = len(sp.conditions)
        mins, mc = np.tile(sp.min_bits(), (c, 1)), np.arange(c)
        ok = problem.feasible(mins, mc)
        bits, cond = mins[ok], mc[ok]
    fit = problem.fitness(bits, cond)
    settings = {"n": n, "max_attempts": max_attempts, "seed": seed if isinstance(seed, int) else None}
    return _finish(problem, [bits], [cond], [fit], [float(fit.max())], len(bits), t0, settings)
