"""Measured (subnet, accuracy) records for fitting the CQAP, stored as JSON lines (resumable).

Each line: ``{"version": 1, "index": i, "seed": s, "config": {...SubnetConfig...}, "accuracy": a, "costs": {...},
"supernet": fingerprint}``. Record ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so it depends only on
(seed, i): a run that stopped halfway resumes by re-drawing the stored records' configs (checked against the file)
and measuring the rest. ``supernet`` (`supernet_fingerprint`: a sha256 of the trained state) says which supernet a
record was measured on, so that a file is never resumed with the accuracies of another supernet.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..quant.space import SubnetConfig
from .cost import CostModel
from .encoding import SPREAD, SearchSpace
from .measure import Evaluate, SubnetMeasurer, as_measurer
from .profiles import BackendProfile

__all__ = ["Record", "RecordsConfig", "collect_records", "load_records", "sample_config", "supernet_fingerprint",
           "RecordsMismatchError", "RECORDS_VERSION"]

RECORDS_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One measured subnet: its config, accuracy, costs (`Costs.to_dict()` keys), any other metrics the
    evaluation function returned (e.g. loss) and the `supernet_fingerprint` of the supernet it was measured on
    (None: not recorded)."""

    index: int
    config: SubnetConfig
    accuracy: float
    costs: dict
    metrics: dict = field(default_factory=dict)
    supernet: str | None = None

    def to_json_line(self, seed: int) -> str:
        d = {"version": RECORDS_VERSION, "index": self.index, "seed": seed, "config": self.config.to_dict(),
             "accuracy": self.accuracy, "costs": self.costs}
        if self.metrics:
            d["metrics"] = self.metrics
        if self.supernet is not None:
            d["supernet"] = self.supernet
        return json.dumps(d, separators=(",", ":")) + "\n"


class RecordsMismatchError(ValueError):
    """A records file holds records of another supernet (or records without a fingerprint)."""


def supernet_fingerprint(supernet) -> str:
    """sha256 (hex) of a supernet's trained state: every entry of its model's state_dict (name, dtype, shape,
    bytes) and its space. Equal for the supernet a checkpoint holds however often it is loaded; changed by any
    training step."""
    import torch
    h = hashlib.sha256()
    h.update(json.dumps(supernet.space.to_dict(), sort_keys=True).encode())
    for name, t in supernet.model.state_dict().items():
        h.update(f"{name};{t.dtype};{tuple(t.shape)};".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        if t.is_quantized:
            t = t.int_repr()
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def sample_config(space: SearchSpace, seed: int, index: int, spread: float = SPREAD) -> SubnetConfig:
    """Record `index`'s subnet: the paper's sampling (`SearchSpace.sample_around`) from rng([seed, index])."""
    bits, cond = space.sample_around(1, np.random.default_rng([seed, index]), spread)
    return space.decode(bits[0], cond[0])


def _parse(line: str, where: str) -> Record:
    d = json.loads(line)
    if not isinstance(d, dict) or d.get("version") != RECORDS_VERSION:
        raise ValueError(f"{where}: record version {d.get('version') if isinstance(d, dict) else None!r} is not "
                         f"supported (this release reads version {RECORDS_VERSION})")
    try:
        return Record(int(d["index"]), SubnetConfig.from_dict(d["config"]), float(d["accuracy"]), dict(d["costs"]),
                      dict(d.get("metrics", {})), d.get("supernet"))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed record ({e}); records are written by collect_records") from None


def _read(path: str, repair: bool) -> list[Record]:
    """Records of `path`. A truncated or unparsable LAST line (an interrupted write) is dropped, and with
    `repair` cut from the file; a bad line elsewhere raises."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    records, good_end, pos = [], 0, 0
    for i, raw in enumerate(lines):
        end = pos + len(raw) + 1
        last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
        complete = end <= len(data)               # the line ends with a newline
        if raw.strip():
            try:
                if not complete:
                    raise ValueError("no trailing newline")
                records.append(_parse(raw.decode(), f"{path}:{i + 1}"))
            except ValueError as e:
                if not last:
                    raise ValueError(f"{path}:{i + 1} is corrupt ({e}); fix or delete that line, or start a new "
                                     "records file") from None
                break
        if complete:
            good_end = end
        pos = end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def load_records(path: str | os.PathLike) -> list[Record]:
    """All complete records of a JSON-lines file (an interrupted last line is ignored).

    Raises:
        FileNotFoundError: no such file. ValueError: a corrupt line that is not the last.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"records file {path!r} does not exist; write it with collect_records")
    return _read(path, repair=False)


@dataclass(frozen=True)
class RecordsConfig:
    """How `collect_records` draws its subnets.

    Attributes:
        seed: sampling seed (must match the file's when resuming).
        profile: restrict sampling to a backend profile (None: the whole space).
        spread: spread of per-group bits around the target (`SearchSpace.sample_around`).
        fingerprint: `supernet_fingerprint(supernet)` (or any string naming the supernet), stored with every new
            record; an existing file is resumed only if all its records carry the same one (None: not checked, not
            stored).
    """

    seed: int = 0
    profile: str | BackendProfile | None = None
    spread: float = SPREAD
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"RecordsConfig.seed must be an int, got {self.seed!r}")
        if isinstance(self.spread, bool) or not isinstance(self.spread, (int, float)) or not self.spread > 0:
            raise ValueError(f"RecordsConfig.spread must be a positive number, got {self.spread!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise TypeError("RecordsConfig.fingerprint must be a string (supernet_fingerprint(supernet)) or None")


def collect_records(supernet, measure: SubnetMeasurer | Evaluate, n: int, path: str | os.PathLike,
                    config: RecordsConfig | None = None, *, cost_model: CostModel,
                    progress: Callable[[int, Record], None] | None = None) -> list[Record]:
    """Measure `n` sampled subnets and append them to the JSON-lines file `path` (resumable).

    Subnets are drawn the paper's way (a uniform target average bit-width, per-group bits around it; one global
    condition per subnet) from the supernet's space restricted by ``config.profile``, and measured by `measure`.

    Args:
        supernet: a calibrated, trained `Supernet`.
        measure: a `SubnetMeasurer` (parallel and cached; it also learns the stored records, so a later
            `refine_search` with it does not measure them again) or an evaluation function
            ``cfg -> accuracy or {"accuracy": ..., other metrics}``, e.g.
            ``lambda cfg: evaluate(sn, cfg, val_loader, bn_batches)`` on held-out TRAINING data, never the test set.
            Other metrics are stored in `Record.metrics`.
        n: total number of records wanted in the file (existing ones count).
        path: the JSON-lines file; appended to, one flushed line per record.
        config: `RecordsConfig` (seed, profile, spread, fingerprint); default ``RecordsConfig()``.
        cost_model: for the costs stored with each record (`CostModel.from_supernet(supernet, x[:1])`).
        progress: called as ``progress(i, record)`` after each new record.
    Returns:
        all n records (stored and new), in index order.
    Raises:
        RecordsMismatchError: with a fingerprint, the file holds records of another supernet or records without
            a fingerprint (nothing is measured or written).
        ValueError: the file holds records of another seed/supernet/profile, or a corrupt line before the last.
    """
    config = RecordsConfig() if config is None else config
    if not isinstance(config, RecordsConfig):
        raise TypeError(f"config must be a RecordsConfig, got {type(config).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(cost_model, CostModel):
        raise TypeError("collect_records needs cost_model=CostModel.from_supernet(supernet, x[:1])")
    measurer = as_measurer(measure)
    path, seed, fingerprint = os.fspath(path), config.seed, config.fingerprint
    space = SearchSpace.from_supernet(supernet, config.profile)
    if fingerprint is not None and os.path.exists(path):
        _check_fingerprint(path, _read(path, repair=False), fingerprint)
    records = _read(path, repair=True) if os.path.exists(path) else []
    for i, r in enumerate(records[:n]):
        if r.index != i or r.config != sample_config(space, seed, i, config.spread):
            raise ValueError(f"{path}: record {i} does not match seed={seed} for this supernet/profile (index "
                             f"{r.index}); resume with the seed, profile and supernet that wrote it, or use a new path")
    for r in records:
        measurer.remember(r.config, {"accuracy": r.accuracy, **r.metrics})
    if len(records) >= n:
        return records[:n]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cfgs = [sample_config(space, seed, i, config.spread) for i in range(len(records), n)]
    with open(path, "a") as f:
        for i, (cfg, metrics) in enumerate(measurer.iter(cfgs), start=len(records)):
            rec = Record(i, cfg, metrics["accuracy"], cost_model(cfg).to_dict(),
                         {k: v for k, v in metrics.items() if k != "accuracy"}, fingerprint)
            f.write(rec.to_json_line(seed))
            f.flush()
            os.fsync(f.fileno())
            records.append(rec)
            if progress is not None:
                progress(i, rec)
    return records


def _check_fingerprint(path: str, records: list[Record], fingerprint: str) -> None:
    """Raise RecordsMismatchError unless every record of `path` was measured on the supernet `fingerprint` names."""
    other = sorted({r.supernet for r in records if r.supernet != fingerprint}, key=str)
    if not other:
        return
    why = ("records without a supernet fingerprint, so they may belong to another supernet" if None in other else
           f"records of another supernet (fingerprint {str(other[0])[:12]}..., this one {fingerprint[:12]}...)")
    raise RecordsMismatchError(f"{path} holds {why}; their accuracies would be reused for this one. Write the records "
                               f"to a new file (eqnet search: a new --out) or delete {path}")
