"""`SubnetMeasurer`: measure subnets once each, optionally in parallel worker processes and cached on disk.

`collect_records`, `measure_top` and `refine_search` measure subnets through a measurer, so one measurer shared by
them measures every subnet once:

    measure = SubnetMeasurer(lambda cfg: evaluate(sn, cfg, val_loader, bn_batches))   # eqnet_plugin.evaluate
    records = collect_records(sn, measure, 1000, "runs/records.jsonl", cost_model=cm)
    result = refine_search(CQAP(space), records, measure, sn, {"max_bitops": limit}, cost_model=cm)

The evaluation function takes one `SubnetConfig` and returns its accuracy, or a mapping with an ``"accuracy"`` key
and any other metrics (floats). Measure on held-out training data, never the test set.

Workers: with ``jobs=1`` (the default) every subnet is measured in this process, one after the other, on whatever
device the evaluation function uses. With ``jobs > 1``, ``jobs`` worker processes (started with ``spawn``, so CUDA
works in them; each runs torch with one thread) measure the missing subnets in parallel, ahead of the consumer.
Each worker calls ``worker_evaluate()`` once to build its own evaluation function (e.g. loads the supernet from a
checkpoint); without ``worker_evaluate`` the evaluation function itself is pickled to every worker. Either must be
picklable (a module-level function or a `functools.partial` of one; not a lambda). Results come back in the order
asked, whatever the number of workers.

Cache: every measurement is kept in memory, and with ``cache_path`` appended to a JSON-lines file (one flushed line
``{"key": ..., "metrics": {...}}`` per subnet) that a later measurer with the same path reads back, so an
interrupted run repeats no measurement. A cache file belongs to one supernet and one evaluation: use a new path for
another (e.g. name it after `supernet_fingerprint`).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from ..quant.space import SubnetConfig

__all__ = ["Evaluate", "SubnetMeasurer", "as_measurer", "config_key"]


class Evaluate(Protocol):
    """Measures one subnet: its accuracy, or a mapping with an ``"accuracy"`` key and other float metrics."""

    def __call__(self, cfg: SubnetConfig) -> float | Mapping[str, float]: ...


def config_key(cfg: SubnetConfig) -> str:
    """The cache key of a subnet: its canonical JSON."""
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))


def _metrics(out) -> dict[str, float]:
    """An evaluation's result as a dict of floats with an ``"accuracy"`` key."""
    if isinstance(out, Mapping):
        if "accuracy" not in out:
            raise ValueError(f"the evaluation function returned a mapping without an 'accuracy' key ({sorted(out)}); "
                             "return the accuracy, or a mapping with 'accuracy' and other metrics")
        return {"accuracy": float(out["accuracy"]), **{str(k): float(v) for k, v in out.items() if k != "accuracy"}}
    return {"accuracy": float(out)}


# --- worker processes ------------------------------------------------------------------------------------------
_WORKER_EVALUATE: Callable | None = None


def _worker_init(fn: Callable, is_factory: bool) -> None:
    global _WORKER_EVALUATE
    import torch
    torch.set_num_threads(1)
    _WORKER_EVALUATE = fn() if is_factory else fn


def _worker_measure(cfg: SubnetConfig) -> dict[str, float]:
    return _metrics(_WORKER_EVALUATE(cfg))


class SubnetMeasurer:
    """Measures subnets through `evaluate`, each distinct subnet once (see the module docstring).

    Args:
        evaluate: ``evaluate(cfg) -> accuracy or {"accuracy": ..., other metrics}`` (`Evaluate`).
        jobs: worker processes (1: measure in this process, a plain loop).
        cache_path: JSON-lines file that keeps every measurement across runs (None: memory only).
        worker_evaluate: with ``jobs > 1``, a picklable zero-argument factory each worker calls once to build its
            evaluation function (None: `evaluate` is pickled to the workers).

    Calling the measurer, ``measure(cfg)``, returns the accuracy, so it serves wherever an accuracy function is
    wanted. Close it (or use it in a ``with`` block) to stop the workers.

    Attributes:
        count: subnets measured by this measurer (not read from the cache). seconds: wall time spent measuring.
    """

    def __init__(self, evaluate: Evaluate, *, jobs: int = 1, cache_path: str | os.PathLike | None = None,
                 worker_evaluate: Callable[[], Evaluate] | None = None) -> None:
        if not callable(evaluate):
            raise TypeError(f"SubnetMeasurer needs an evaluation function cfg -> accuracy, got "
                            f"{type(evaluate).__name__}")
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive integer (1: measure in this process), got {jobs!r}")
        if worker_evaluate is not None and not callable(worker_evaluate):
            raise TypeError("worker_evaluate must be a zero-argument callable that returns an evaluation function")
        self.evaluate, self.jobs, self.worker_evaluate = evaluate, jobs, worker_evaluate
        self.cache_path = None if cache_path is None else os.fspath(cache_path)
        self.cache: dict[str, dict[str, float]] = {}
        self.count, self.seconds = 0, 0.0
        self._pool = None
        if self.cache_path is not None and os.path.exists(self.cache_path):
            self._read_cache()

    def _read_cache(self) -> None:
        with open(self.cache_path) as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                key, metrics = d["key"], _metrics(d["metrics"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if i >= len(lines) - 2:                  # the last line: an interrupted write, measured again
                    continue
                raise ValueError(f"{self.cache_path}:{i + 1} is not a measurement ({type(e).__name__}: {e}); the "
                                 "file is written by SubnetMeasurer: delete it or pass another cache_path") from None
            self.cache.setdefault(key, {}).update(metrics)

    # --- workers ------------------------------------------------------------------------------------------------
    def _start(self):
        if self._pool is None:
            import multiprocessing as mp
            import pickle
            from concurrent.futures import ProcessPoolExecutor
            fn, is_factory = ((self.worker_evaluate, True) if self.worker_evaluate is not None
                              else (self.evaluate, False))
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise ValueError(f"jobs={self.jobs} sends the evaluation function to worker processes, but it cannot "
                                 f"be pickled ({type(e).__name__}: {e}); pass worker_evaluate= (a module-level "
                                 "factory or functools.partial) or use jobs=1") from None
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                             initargs=(fn, is_factory))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (the cache stays)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "SubnetMeasurer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- measuring ----------------------------------------------------------------------------------------------
    def _store(self, key: str, metrics: dict[str, float]) -> None:
        self.cache.setdefault(key, {}).update(metrics)
        self.count += 1
        if self.cache_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            with open(self.cache_path, "a") as f:
                f.write(json.dumps({"key": key, "metrics": metrics}) + "\n")
                f.flush()

    def remember(self, cfg: SubnetConfig, metrics: Mapping[str, float]) -> None:
        """Count `metrics` (with an ``"accuracy"`` key) as a measurement of `cfg` made elsewhere (e.g. a record);
        a measurement already held wins. Kept in memory, not written to the cache file."""
        key = config_key(cfg)
        if "accuracy" not in self.cache.get(key, {}):
            self.cache.setdefault(key, {}).update(_metrics(metrics))

    def iter(self, cfgs: Iterable[SubnetConfig]) -> Iterator[tuple[SubnetConfig, dict[str, float]]]:
        """Yield ``(cfg, metrics)`` for every subnet in order; the ones not yet measured are measured (in parallel
        with ``jobs > 1``, ahead of the consumer)."""
        cfgs = list(cfgs)
        keys = [config_key(c) for c in cfgs]
        todo, seen = [], set()
        for c, k in zip(cfgs, keys):
            if "accuracy" not in self.cache.get(k, {}) and k not in seen:
                seen.add(k)
                todo.append((c, k))
        t = time.perf_counter()
        if self.jobs > 1 and len(todo) > 1:
            results = self._start().map(_worker_measure, [c for c, _ in todo])
        else:
            results = (_metrics(self.evaluate(c)) for c, _ in todo)
        pending, it = iter(todo), iter(results)
        try:
            for c, k in zip(cfgs, keys):
                while "accuracy" not in self.cache.get(k, {}):
                    _, kk = next(pending)
                    self._store(kk, next(it))
                yield c, self.cache[k]
        finally:
            self.seconds += time.perf_counter() - t

    def many(self, cfgs: Iterable[SubnetConfig]) -> list[dict[str, float]]:
        """Metrics of every subnet, in order (see `iter`)."""
        return [m for _, m in self.iter(cfgs)]

    def accuracies(self, cfgs: Sequence[SubnetConfig]) -> list[float]:
        """Measured accuracy of every subnet, in order.

        Raises:
            ValueError: the evaluation function returned a non-finite accuracy.
        """
        out = [m["accuracy"] for m in self.many(cfgs)]
        bad = [a for a in out if not math.isfinite(a)]
        if bad:
            raise ValueError(f"the evaluation function returned {bad[0]} for a subnet; it must return a finite "
                             "accuracy")
        return out

    def __call__(self, cfg: SubnetConfig) -> float:
        return self.accuracies([cfg])[0]

    def __repr__(self) -> str:
        return (f"SubnetMeasurer(jobs={self.jobs}, cached={len(self.cache)}, measured={self.count}, "
                f"cache_path={self.cache_path!r})")


def as_measurer(measure: SubnetMeasurer | Evaluate) -> SubnetMeasurer:
    """`measure` itself, or a one-process `SubnetMeasurer` around an evaluation function."""
    return measure if isinstance(measure, SubnetMeasurer) else SubnetMeasurer(measure)
