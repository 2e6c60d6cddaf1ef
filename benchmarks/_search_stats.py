"""Statistics shared by bench_search's digits and Fashion-MNIST modes: the measurement-noise ceiling of Kendall tau
and random search at an equal measurement budget."""
from __future__ import annotations

import numpy as np


def tau_ceiling(half_tau: float) -> float:
    """Highest Kendall tau any predictor can reach against the full-split measurement, estimated from the tau of the
    two half-split measurements: Greiner's relation (Pearson r = sin(pi tau / 2), bivariate normal), Spearman-Brown
    for the doubled split, and a perfect predictor correlating sqrt(reliability) with a noisy measurement."""
    r_half = np.sin(np.pi * max(half_tau, 0.0) / 2)
    r_full = 2 * r_half / (1 + r_half)
    return float(2 / np.pi * np.arcsin(np.sqrt(r_full)))


def equal_budget(rand: np.ndarray, m: int, ours: tuple[float, float], draws: int = 2000) -> dict:
    """Random search with the same number of validation measurements as ours: `draws` times pick `m` of the measured
    random subnets, keep the best by val; how often is ours at least as good (val; test of the val pick)?"""
    rng = np.random.default_rng(0)
    vals, tests = [], []
    for _ in range(draws):
        sub = rand[rng.choice(len(rand), m, replace=False)]
        b = int(np.argmax(sub[:, 0]))
        vals.append(sub[b, 0])
        tests.append(sub[b, 1])
    vals, tests = np.array(vals), np.array(tests)
    return {"m": m, "median_val": float(np.median(vals)), "median_test": float(np.median(tests)),
            "p_val": float((ours[0] >= vals).mean()), "p_test": float((ours[1] >= tests).mean())}
