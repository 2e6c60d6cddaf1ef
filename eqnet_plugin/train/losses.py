"""EQ-Net training losses (paper section 3.4): Weight Distribution Regularization and Group Progressive
Guidance.

* WDR pulls every layer's latent float weights towards a symmetric, flat (uniform-like) distribution, which every
  bit-width quantizes well: per layer ``skew_weight * Skew^2 + kurt_weight * (Kurt - 1.8)^2`` (1.8 is the kurtosis
  of a uniform distribution), averaged over the weighted layers, first layer excluded.
* GPG chains distillation through the sandwich: H learns from the labels, R from H and the labels, L from R and
  the labels; the teacher's logits are detached.

Moments use the population (biased) estimators, as `scipy.stats.skew` / `kurtosis(fisher=False)` do (the official
code divides by the unbiased standard deviation: a factor ((n-1)/n)^(3/2) or ^2, negligible for real layers).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.bn_fold import quantized_weight

__all__ = ["skewness", "kurtosis", "wdr_penalty", "WDRLoss", "distill_kl", "gpg_term", "gpg_losses",
           "UNIFORM_KURTOSIS"]

UNIFORM_KURTOSIS = 1.8
_STD_EPS = 1e-12


def _standardized(w: torch.Tensor) -> torch.Tensor:
    w = w.reshape(-1).float()
    mu = w.mean()
    sigma = w.var(unbiased=False).clamp(min=_STD_EPS).sqrt()
    return (w - mu) / sigma


def skewness(w: torch.Tensor) -> torch.Tensor:
    """Population skewness E[((w - mu) / sigma)^3] of all entries of `w` (a 0-dim tensor, differentiable)."""
    return _standardized(w).pow(3).mean()


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """Population (Pearson, non-excess) kurtosis E[((w - mu) / sigma)^4]; 3 for a Gaussian, 1.8 for a uniform."""
    return _standardized(w).pow(4).mean()


def wdr_penalty(weights: Iterable[torch.Tensor], skew_weight: float = 1.0, kurt_weight: float = 0.015,
                target_kurtosis: float = UNIFORM_KURTOSIS) -> torch.Tensor:
    """Mean over `weights` of ``skew_weight * Skew(w)^2 + kurt_weight * (Kurt(w) - target_kurtosis)^2``.

    Raises:
        ValueError: `weights` is empty.
    """
    terms = []
    for w in weights:
        z = _standardized(w)
        z2 = z * z
        skew, kurt = (z2 * z).mean(), (z2 * z2).mean()
        terms.append(skew_weight * skew.square() + kurt_weight * (kurt - target_kurtosis).square())
    if not terms:
        raise ValueError("WDR needs at least one weight tensor (a model with one weighted layer has nothing left "
                         "after excluding the first layer; pass exclude_first=False)")
    return torch.stack(terms).mean()


class WDRLoss(nn.Module):
    """Weight Distribution Regularization over a supernet's weighted layers.

    Args:
        skew_weight: coefficient of Skew^2 (paper/official code: 1.0).
        kurt_weight: coefficient of (Kurt - target)^2 (paper/official code: 0.015).
        target_kurtosis: 1.8, the kurtosis of a uniform distribution.
        exclude_first: leave out the first weighted layer (it stays at 8 bits), as the paper does.

    `forward(supernet)` reads the tensor each layer of `supernet.layers` hands its weight quantizer (for Conv-BN
    layers the weight with BatchNorm folded in, ``w * gamma / sqrt(fold_var + eps)``; the official code, which does
    not fold, regularizes the quantized tensor too) and returns the scalar penalty. `layer_weights(supernet)` lists
    those tensors; a subclass may override it to regularize others.

    Example:
        >>> wdr = WDRLoss()
        >>> loss = wdr(sn)                                     # doctest: +SKIP
    """

    def __init__(self, skew_weight: float = 1.0, kurt_weight: float = 0.015,
                 target_kurtosis: float = UNIFORM_KURTOSIS, exclude_first: bool = True) -> None:
        super().__init__()
        for name, v in (("skew_weight", skew_weight), ("kurt_weight", kurt_weight)):
            if not v >= 0:
                raise ValueError(f"{name}={v!r} must be >= 0")
        self.skew_weight, self.kurt_weight = float(skew_weight), float(kurt_weight)
        self.target_kurtosis, self.exclude_first = float(target_kurtosis), bool(exclude_first)

    def layer_weights(self, supernet) -> list[torch.Tensor]:
        """The weights the penalty is computed on (what each weight quantizer sees), in layer order."""
        layers = list(supernet.layers)
        if self.exclude_first:
            layers = layers[1:]
        mods = [supernet.model.get_submodule(lay.name) for lay in layers]
        return [quantized_weight(m) for m in mods]

    def forward(self, supernet) -> torch.Tensor:
        return wdr_penalty(self.layer_weights(supernet), self.skew_weight, self.kurt_weight, self.target_kurtosis)

    def extra_repr(self) -> str:
        return (f"skew_weight={self.skew_weight}, kurt_weight={self.kurt_weight}, "
                f"target_kurtosis={self.target_kurtosis}, exclude_first={self.exclude_first}")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss T^2 * KL(p_teacher || p_student) at temperature T, averaged over the batch; the teacher
    is detached (stop-gradient). This is the paper's KL(Y_student || Y_teacher) term as the official code computes
    it (`KLDivLoss(log_softmax(student / T), softmax(teacher / T))`, batch mean, times T^2).
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (the paper uses 1.0)")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)          # (B, K)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def gpg_losses(logits_h: torch.Tensor, logits_r: torch.Tensor, logits_l: torch.Tensor, targets: torch.Tensor,
               lam: float = 0.5, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Group Progressive Guidance losses of one sandwich.

    ``h = CE(Y_H, y)``; ``r = lam * KL(Y_R || sg Y_H) + (1 - lam) * CE(Y_R, y)``;
    ``l = lam * KL(Y_L || sg Y_R) + (1 - lam) * CE(Y_L, y)`` (KL as in `distill_kl`).

    Args:
        logits_h, logits_r, logits_l: (B, K) logits of the max, random and min subnets.
        targets: (B,) int64 labels.
        lam: weight of the distillation term (paper: 0.5).
        temperature: distillation temperature (paper: 1.0).
    Returns:
        {"h": ..., "r": ..., "l": ...} scalar tensors; their sum is the training loss.
    """
    return {"h": gpg_term(logits_h, None, targets, lam, temperature),
            "r": gpg_term(logits_r, logits_h, targets, lam, temperature),
            "l": gpg_term(logits_l, logits_r, targets, lam, temperature)}


def gpg_term(logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor, lam: float = 0.5,
             temperature: float = 1.0, criterion=None) -> torch.Tensor:
    """One link of the GPG chain: ``CE(logits, y)`` without a teacher, else
    ``lam * KL(logits || sg teacher) + (1 - lam) * CE(logits, y)``. `sandwich_step` calls it per subnet so that
    each subnet's graph is freed by its own backward pass. `criterion(logits, targets)` replaces the
    cross-entropy when given."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam!r} must be in [0, 1] (the paper uses 0.5)")
    ce = (criterion or F.cross_entropy)(logits, targets)
    if teacher_logits is None:
        return ce
    return lam * distill_kl(logits, teacher_logits, temperature) + (1.0 - lam) * ce
