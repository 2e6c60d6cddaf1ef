"""The supernet: `Supernet`, a view over a graph prepared for elastic QAT (`core`), what it hands out while it
switches subnets (`tracking`) and the batch / device / rank plumbing of its data-driven steps (`batches`)."""
from .batches import batch_inputs
from .core import BatchNormStatsError, Supernet
from ..frontends.base import Layer

__all__ = ["Supernet", "Layer", "batch_inputs", "BatchNormStatsError"]
