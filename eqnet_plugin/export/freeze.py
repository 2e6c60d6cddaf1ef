"""Freeze one subnet of a supernet into the export IR (`eqnet_plugin.export.ir`) that every adapter reads.

`freeze(supernet, cfg)` returns a `FrozenSubnet` whose forward pass reproduces the supernet's eval output under
`activate(cfg)`; adapters swap its QuantPoints (and layers) for their framework's modules or for ONNX Q/DQ nodes.
How layers become IR modules depends on the graph: each frontend builds it (`Frontend.freeze`:
`eqnet_plugin.frontends.fx_graph.freeze_fx`, `eqnet_plugin.frontends.pt2e.freeze_pt2e`) from the same `snapshot`.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch

from ..quant.space import SubnetConfig
from .ir import (FrozenLayer, FrozenSubnet, QParams, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantPoint,
                 as_example_inputs, as_frozen)

__all__ = ["QParams", "QuantPoint", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "FrozenLayer",
           "FrozenSubnet", "freeze", "snapshot", "as_frozen", "as_example_inputs"]


def freeze(supernet, cfg: SubnetConfig | None = None, bn_batches: Iterable | None = None) -> FrozenSubnet:
    """Freeze subnet `cfg` (default: the active one) of `supernet` into a `FrozenSubnet` (`Supernet.freeze`).

    Args:
        bn_batches: training batches to re-estimate the subnet's BatchNorm statistics on first. Needed once the
            supernet has been trained, unless the statistics were estimated already (`evaluate`,
            `Supernet.recalibrate_bn` under ``activate(cfg)``): a trained supernet holds the widest subnet's.

    The supernet is left unchanged. The frozen model is in eval mode; its output equals the supernet's eval output
    under ``activate(cfg)`` up to float rounding of the BN fold (measured in the adapter tests).

    Raises:
        TypeError: `supernet` is not a Supernet.
        ValueError: `cfg` does not fit the supernet (from `Supernet.validate`).
        BatchNormStatsError: the subnet's BatchNorm statistics are not known (pass `bn_batches`).
    """
    if not callable(getattr(supernet, "freeze", None)) or not hasattr(supernet, "frontend"):
        raise TypeError(f"freeze needs a Supernet, got {type(supernet).__name__}; build one with "
                        "eqnet_plugin.Supernet(prepared_graph_module)")
    return supernet.freeze(cfg, bn_batches)


def snapshot(supernet, cfg: SubnetConfig | None, bn_batches: Iterable | None = None
             ) -> tuple[SubnetConfig, dict[str, QParams], torch.fx.GraphModule]:
    """What every freeze starts from: (the subnet, the QParams of every group, a deep copy of the model) taken
    under ``activate(cfg)`` (default: the active subnet) after the checks, with the subnet's BatchNorm statistics
    (re-estimated on `bn_batches` first when given). The supernet is left unchanged."""
    cfg = cfg if cfg is not None else supernet.current_config()
    supernet.require_calibrated("freeze")
    with supernet.activate(cfg):
        if bn_batches is not None:
            supernet.recalibrate_bn(bn_batches)
        supernet.require_bn_stats(cfg, "freeze")
        qparams = {g: QParams.from_fake_quant(fq) for g, fq in supernet.groups.items()}
        gm = copy.deepcopy(supernet.model)
    return cfg, qparams, gm
