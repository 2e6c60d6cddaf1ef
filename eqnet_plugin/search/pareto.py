"""Pareto front (accuracy vs BitOps) and its plot."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..files import atomic_write

__all__ = ["pareto_front", "plot_pareto"]


def pareto_front(accuracy: Sequence[float], bitops: Sequence[float]) -> np.ndarray:
    """Indices of the non-dominated points (maximize accuracy, minimize BitOps), by increasing BitOps.

    A point is kept when no other point has lower-or-equal BitOps and higher accuracy (ties: the first index).
    """
    acc, ops = np.asarray(accuracy, dtype=np.float64), np.asarray(bitops, dtype=np.float64)
    if acc.shape != ops.shape or acc.ndim != 1:
        raise ValueError(f"accuracy and bitops must be 1-D of equal length, got {acc.shape} and {ops.shape}")
    order = np.lexsort((np.arange(len(acc)), -acc, ops))         # by BitOps, then best accuracy, then index
    keep, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            keep.append(i)
            best = acc[i]
    return np.array(keep, dtype=np.int64)


def plot_pareto(path: str | os.PathLike, points: tuple[Sequence[float], Sequence[float]],
                front: tuple[Sequence[float], Sequence[float]], *, best: tuple[float, float] | None = None,
                max_bitops: float | None = None, extra: dict[str, tuple[Sequence[float], Sequence[float]]] | None
                = None, title: str = "accuracy vs BitOps", ylabel: str = "predicted accuracy") -> None:
    """Draw evaluated points, the Pareto front, the chosen subnet and the BitOps limit to a PNG (atomic write).

    Args:
        path: the PNG file.
        points: (bitops, accuracy) of every evaluated subnet (gray dots; at most 5000 drawn).
        front: (bitops, accuracy) of the Pareto front (line).
        best: (bitops, accuracy) of the returned subnet (star).
        max_bitops: the BitOps constraint (dashed vertical line).
        extra: more labelled series, e.g. {"measured": (bitops, acc)}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    px, py = np.asarray(points[0], dtype=float), np.asarray(points[1], dtype=float)
    if len(px) > 5000:
        sel = np.linspace(0, len(px) - 1, 5000).astype(int)
        px, py = px[sel], py[sel]
    ax.scatter(px / 1e6, py, s=4, c="0.75", label="evaluated", rasterized=True)
    fx, fy = np.asarray(front[0], dtype=float), np.asarray(front[1], dtype=float)
    ax.plot(fx / 1e6, fy, "-o", ms=3, c="tab:blue", label="Pareto front")
    for i, (label, (ex, ey)) in enumerate((extra or {}).items()):
        many = len(ex) > 50                         # a cloud: small translucent dots; a few picks: big markers
        ax.scatter(np.asarray(ex, dtype=float) / 1e6, ey, s=5 if many else 40, marker="." if many else "^",
                   alpha=0.5 if many else 1.0, c=f"C{(i + 2) % 10}", label=label, zorder=3 if many else 4)
    if best is not None:
        ax.scatter([best[0] / 1e6], [best[1]], s=120, marker="*", c="tab:red", label="chosen", zorder=5)
    if max_bitops is not None:
        ax.axvline(max_bitops / 1e6, ls="--", c="tab:red", lw=1, label="BitOps limit")
    ax.set_xlabel("BitOps (millions)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
