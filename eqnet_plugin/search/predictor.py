"""CQAP: the conditional quantization-aware accuracy predictor (paper section 3.5).

Input encoding (one row per subnet): three condition bits (weight per-channel, weight symmetric, activation
symmetric), then for every searchable group (weights and activations; fixed groups carry no information) a one-hot
vector over that group's bit choices in the supernet's space.

Three regressors (`Regressor`) read that encoding:

* ``Regressor.ENSEMBLE`` (default): the mean prediction of the MLP below and of four tree models that differ only
  in shape (``GBT_SHAPES``: unlimited depth with 31 leaves, i.e. ``Regressor.GBT``, and depth 1, 2 and 3). Which
  shape ranks best differs between supernets, and cross-validation on a thousand records cannot tell them apart
  reliably; their average ranks held-out subnets better than the trees alone (BENCHMARKS.md, bench_search).
* ``Regressor.GBT``: gradient-boosted regression trees (scikit-learn's `HistGradientBoostingRegressor`, 500
  rounds, learning rate 0.05, seeded) on the same information with each group's bit-width as one ordinal column.
  A subnet's accuracy collapses when one sensitive layer drops to 2 bits under one condition, an interaction that
  tree splits capture from a thousand records and the MLP does not (BENCHMARKS.md, bench_search).
* ``Regressor.MLP``: the paper's MLP (ReLU hidden layers, one output) trained with MSE on standardized accuracies; Adam
  with cosine learning-rate decay, seeded `torch.Generator` for initialization and shuffling.

Every fit is deterministic on CPU. A saved predictor stores the trees' training encoding and targets and refits them
on load (no pickle, so loading a file cannot run code; the refit is deterministic, so predictions are identical),
and the MLP's weights.
"""
from __future__ import annotations

import enum
import io
import math
import os
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..quant.space import MAX_BITS, SubnetConfig, atomic_write_bytes
from .encoding import SearchSpace

__all__ = ["CQAP", "Regressor", "kendall_tau", "pearson", "PREDICTOR_VERSION", "GBT_SHAPES"]

PREDICTOR_VERSION = 3


class Regressor(enum.Enum):
    """The CQAP's regressor (see the module docstring). ``Regressor("gbt")`` parses the CLI / JSON spelling."""

    ENSEMBLE = "ensemble"
    GBT = "gbt"
    MLP = "mlp"

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"unknown CQAP regressor {value!r}; choose one of {[r.value for r in cls]}")


GBT_DEFAULTS = {"max_iter": 500, "learning_rate": 0.05}
GBT_SHAPES = (                     # the ensemble's trees: same data, different depth (rounds scaled to match)
    GBT_DEFAULTS,
    {"max_iter": 2000, "learning_rate": 0.05, "max_depth": 1},
    {"max_iter": 1000, "learning_rate": 0.05, "max_depth": 2},
    {"max_iter": 700, "learning_rate": 0.05, "max_depth": 3},
)
_TAU_CHUNK = 512          # rows per block in the O(n^2) Kendall computation


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties handled as scipy.stats.kendalltau does); O(n^2) memory-bounded blocks."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"kendall_tau needs two 1-D arrays of equal length >= 2, got {x.shape} and {y.shape}")
    s = sx = sy = 0.0
    for i in range(0, len(x), _TAU_CHUNK):
        dx = np.sign(x[i:i + _TAU_CHUNK, None] - x[None, :])                            # (b, n)
        dy = np.sign(y[i:i + _TAU_CHUNK, None] - y[None, :])
        s, sx, sy = s + (dx * dy).sum(), sx + (dx * dx).sum(), sy + (dy * dy).sum()       # each pair counted twice
    return float(s / math.sqrt(sx * sy)) if sx > 0 and sy > 0 else float("nan")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or len(x) < 2:
        raise ValueError("pearson needs two 1-D arrays of equal length >= 2")
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _mlp(d_in: int, hidden: Sequence[int]) -> nn.Sequential:
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


@torch.no_grad()
def _init(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, drawn from `generator` (no global RNG)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.uniform_(-bound, bound, generator=generator)
            m.bias.uniform_(-bound, bound, generator=generator)


class CQAP:
    """Conditional accuracy predictor over the subnets of one supernet.

    Args:
        space: the supernet's (unrestricted) `SearchSpace`: fixes the encoding. Subnets of a profile-restricted
            space of the same supernet can be scored too.
        hidden: hidden layer widths of the MLP (``Regressor.MLP`` or ``Regressor.ENSEMBLE``).
        seed: seed of the MLP's initialization and shuffling generator, and of the trees' random state.
        regressor: a `Regressor`: ``ENSEMBLE`` (trees of four shapes and the MLP, averaged; default), ``GBT``
            (gradient-boosted trees) or ``MLP`` (the paper's); see the module docstring.
        gbt_params: keyword arguments of `HistGradientBoostingRegressor` for ``Regressor.GBT`` (default
            ``GBT_DEFAULTS``); the ensemble's trees are ``GBT_SHAPES``.

    Example:
        >>> cqap = CQAP(SearchSpace.from_supernet(sn)).fit(configs, accs)     # doctest: +SKIP
        >>> cqap.evaluate(test_configs, test_accs)["kendall_tau"]            # doctest: +SKIP
    """

    def __init__(self, space: SearchSpace, hidden: Sequence[int] = (400, 400, 400), seed: int = 0,
                 regressor: Regressor = Regressor.ENSEMBLE, gbt_params: Mapping | None = None) -> None:
        if not isinstance(space, SearchSpace):
            raise TypeError(f"CQAP needs a SearchSpace (SearchSpace.from_supernet(sn)), got {type(space).__name__}")
        if not isinstance(regressor, Regressor):
            raise TypeError(f"CQAP regressor must be a Regressor, got {regressor!r}; parse a name with "
                            f"Regressor({regressor!r})")
        self.space = space
        self.hidden = tuple(int(h) for h in hidden)
        self.seed = int(seed)
        self.regressor = regressor
        self.gbt_params = {**GBT_DEFAULTS, **dict(gbt_params or {})}
        self._gbts: list = []
        self._train_xy: tuple[np.ndarray, np.ndarray] | None = None
        # Column of the one-hot for (group, bits); -1 where the group is fixed or the bits are not a choice.
        col = np.full((len(space.group_names), MAX_BITS + 1), -1, dtype=np.int64)                  # (G, 9)
        d = 3
        for g, (choices, searchable) in enumerate(zip(space.choices, space.searchable)):
            if searchable:
                col[g, list(choices)] = np.arange(d, d + len(choices))
                d += len(choices)
        self._col, self.n_features = col, d
        self.model = _mlp(d, self.hidden)
        _init(self.model, torch.Generator().manual_seed(self.seed))
        self.y_mean, self.y_std = 0.0, 1.0
        self.fitted = False

    # --- encoding -------------------------------------------------------------------------------------------
    def encode_arrays(self, bits: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """(N, G) bits + (N, 3) condition flags -> (N, n_features) float32 encoding.

        Raises:
            ValueError: a searchable group holds bits outside the supernet's choices.
        """
        bits = np.asarray(bits, dtype=np.int64)
        n, g = bits.shape
        if g != len(self.space.group_names):
            raise ValueError(f"bits have {g} columns; this CQAP encodes {len(self.space.group_names)} groups")
        cols = self._col[np.arange(g)[None, :], np.clip(bits, 0, MAX_BITS)]                         # (N, G)
        bad = (cols < 0) & self.space.searchable[None, :]
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"group {self.space.group_names[c]!r} holds {bits[r, c]}-bit, which this CQAP's "
                             f"space does not contain (choices {self.space.choices[c]})")
        x = np.zeros((n, self.n_features), dtype=np.float32)
        x[:, :3] = np.asarray(flags, dtype=np.float32)
        rows = np.repeat(np.arange(n), int(self.space.searchable.sum()))
        x[rows, cols[:, self.space.searchable].ravel()] = 1.0
        return x

    def encode(self, configs: Sequence[SubnetConfig]) -> np.ndarray:
        """SubnetConfigs (one global scheme each) -> (N, n_features) encoding."""
        return self.encode_arrays(*self._arrays(configs))

    def _arrays(self, configs: Sequence[SubnetConfig]) -> tuple[np.ndarray, np.ndarray]:
        if not configs:
            raise ValueError("encode() got no configs")
        enc = [self.space.encode(c) for c in configs]
        return np.stack([b for b, _ in enc]), self.space.flags(np.array([c for _, c in enc]))

    def _features(self, bits: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The regressors' inputs: the one-hot encoding (MLP), and for the trees the same information with each
        searchable group's bit-width as one ordinal column ((N, 3 + searchable groups) condition bits, then bits):
        a tree reaches "bits <= k" in one split instead of k one-hot splits."""
        x = self.encode_arrays(bits, flags)                      # validates the bits against the space
        return x, np.concatenate([x[:, :3], np.asarray(bits, dtype=np.float32)[:, self.space.searchable]], axis=1)

    @property
    def _uses_trees(self) -> bool:
        return self.regressor in (Regressor.GBT, Regressor.ENSEMBLE)

    @property
    def _uses_mlp(self) -> bool:
        return self.regressor in (Regressor.MLP, Regressor.ENSEMBLE)

    # --- fit / predict --------------------------------------------------------------------------------------
    def fit(self, configs: Sequence[SubnetConfig], accuracies: Sequence[float], *, epochs: int = 100,
            lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256) -> "CQAP":
        """Train on measured (subnet, accuracy) pairs from scratch (re-initialized from `seed`).

        `epochs`, `lr`, `weight_decay` and `batch_size` apply to the MLP; the trees use `gbt_params` or
        ``GBT_SHAPES``.

        Returns:
            self.
        Raises:
            ValueError: fewer than 2 records, or lengths differ.
        """
        y = np.asarray(accuracies, dtype=np.float64)
        if len(configs) != len(y) or len(y) < 2:
            raise ValueError(f"fit needs >= 2 configs and as many accuracies; got {len(configs)} and {len(y)}")
        if not np.isfinite(y).all():
            raise ValueError("fit: accuracies contain NaN or inf")
        x_mlp, x_tree = self._features(*self._arrays(configs))
        if self._uses_trees:
            self._fit_gbt(x_tree, y)
        if self._uses_mlp:
            self._fit_mlp(x_mlp, y, epochs, lr, weight_decay, batch_size)
        self.fitted = True
        return self

    def _fit_mlp(self, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, weight_decay: float,
                 batch_size: int) -> None:
        x = torch.from_numpy(x)
        self.y_mean, self.y_std = float(y.mean()), float(y.std()) or 1.0
        t = torch.from_numpy(((y - self.y_mean) / self.y_std).astype(np.float32))[:, None]   # (N, 1)
        gen = torch.Generator().manual_seed(self.seed)
        _init(self.model, gen)
        opt = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(y) / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1))
        self.model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                loss = nn.functional.mse_loss(self.model(x[idx]), t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.model.eval()

    def _fit_gbt(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor
        shapes = GBT_SHAPES if self.regressor is Regressor.ENSEMBLE else (self.gbt_params,)
        self._gbts = [HistGradientBoostingRegressor(**{"early_stopping": False, **params, "random_state": self.seed})
                      .fit(x, y) for params in shapes]
        self._train_xy = (x, y)

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("this CQAP is not fitted; call fit(configs, accuracies) or CQAP.load(path)")

    @torch.no_grad()
    def _predict_x(self, x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        self._require_fitted()
        x_mlp, x_tree = x
        preds = [np.asarray(g.predict(x_tree), dtype=np.float64) for g in self._gbts] if self._uses_trees else []
        if self._uses_mlp:
            preds.append(self.model(torch.from_numpy(x_mlp))[:, 0].double().numpy() * self.y_std + self.y_mean)
        return np.mean(preds, axis=0)

    def predict(self, configs: Sequence[SubnetConfig]) -> np.ndarray:
        """Predicted accuracies (N,) of SubnetConfigs. Not clipped: they rank subnets, and a regressor fitted on a
        few hundred records can overshoot the measured range (an accuracy above 1 is possible)."""
        return self._predict_x(self._features(*self._arrays(configs)))

    def predict_arrays(self, group_names: Sequence[str], bits: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Vectorized prediction for the search: (N, G) bits in `group_names` order + (N, 3) flags -> (N,)."""
        if tuple(group_names) != self.space.group_names:
            raise ValueError("the search space's groups differ from this CQAP's; fit the predictor on records of "
                             "the same supernet")
        return self._predict_x(self._features(bits, flags))

    def evaluate(self, configs: Sequence[SubnetConfig], accuracies: Sequence[float]) -> dict:
        """Kendall tau, Pearson and RMSE of predictions against measured accuracies (held-out records)."""
        p, y = self.predict(configs), np.asarray(accuracies, dtype=np.float64)
        return {"kendall_tau": kendall_tau(p, y), "pearson": pearson(p, y),
                "rmse": float(np.sqrt(np.mean((p - y) ** 2))), "n": int(len(y))}

    # --- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename): version, encoding space, regressor, the MLP's weights and target
        scaling, and the trees' training encoding and targets (refit on load)."""
        self._require_fitted()
        state = {"version": PREDICTOR_VERSION, "space": self.space.to_dict(), "hidden": list(self.hidden),
                 "seed": self.seed, "regressor": self.regressor.value, "y_mean": self.y_mean, "y_std": self.y_std}
        if self._uses_trees:
            x, y = self._train_xy
            state.update(gbt_params=dict(self.gbt_params), train_x=torch.from_numpy(x.astype(np.uint8)),
                         train_y=torch.from_numpy(y))
        if self._uses_mlp:
            state["state_dict"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CQAP":
        """Load a predictor written by `save`.

        Raises:
            FileNotFoundError / ValueError: missing, corrupt or other-version file.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"CQAP file {path!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path!r} is not a CQAP file written by CQAP.save ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("version") != PREDICTOR_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path!r}: CQAP file version {got!r} is not supported; this release reads version "
                             f"{PREDICTOR_VERSION} (refit and save the predictor)")
        try:
            obj = cls(SearchSpace.from_dict(state["space"]), state["hidden"], state["seed"],
                      Regressor(state["regressor"]), state.get("gbt_params"))
            if obj._uses_trees:
                x, y = state["train_x"].numpy().astype(np.float32), state["train_y"].numpy()
                width = 3 + int(obj.space.searchable.sum())
                if x.ndim != 2 or x.shape != (len(y), width):
                    raise TypeError(f"training features of shape {tuple(x.shape)} do not fit {width} columns")
                obj._fit_gbt(x, y)
            if obj._uses_mlp:
                obj.model.load_state_dict(state["state_dict"])
                obj.y_mean, obj.y_std = float(state["y_mean"]), float(state["y_std"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: corrupt CQAP file ({type(e).__name__}: {e}); refit and save it") from None
        obj.model.eval()
        obj.fitted = True
        return obj

    def __repr__(self) -> str:
        detail = {Regressor.MLP: f"hidden={self.hidden}", Regressor.GBT: f"{self.gbt_params}",
                  Regressor.ENSEMBLE: f"{len(GBT_SHAPES)} tree shapes + MLP hidden={self.hidden}"}[self.regressor]
        return f"CQAP({self.regressor.value}, {self.n_features} features, {detail}, fitted={self.fitted})"
