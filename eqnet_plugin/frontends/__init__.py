"""The graph frontends: how elastic fake-quants get into a model, and what `Supernet` needs from the graph.

`base` defines the protocol (`Frontend`), the shared `PlacementError` and `Layer`; `fx` + `fx_graph` implement it
for torch.ao FX (``prepare_qat_fx``), `pt2e` for torchao PT2E (``torch.export`` + ``prepare_qat_pt2e``; needs
torchao, imported only when `eqnet_plugin.frontends.pt2e` is).
"""
from .base import Frontend, Layer, PlacementError, QuantizerLayout, frontend_for, register_frontend

__all__ = ["Frontend", "Layer", "PlacementError", "QuantizerLayout", "frontend_for", "register_frontend"]
