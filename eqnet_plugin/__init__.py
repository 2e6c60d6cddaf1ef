"""eqnet_plugin: EQ-Net elastic quantization (one weight-sharing supernet, many mixed-precision subnets) for
torch.ao FX QAT, with search and export to TensorRT, Brevitas and Qualcomm QNN.

    gm = prepare_qat_fx(model, elastic_qconfig_mapping(), example_inputs)
    sn = Supernet(gm); sn.calibrate(batches)
    optimizer = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=1e-3)   # one Adam state per subnet
    losses = sandwich_step(sn, x, y, optimizer, generator=g)         # inside your training loop
    acc = evaluate(sn, sn.uniform(4, 4), val_loader, bn_batches)
    frozen = freeze(sn, best_cfg)                                      # then eqnet_plugin.adapters.*
    eqnet_plugin.export_to_tensorrt(frozen, x, "model.onnx")          # or export_onnx / export_qnn / to_brevitas
"""
from ._version import __version__
from . import search
from .quant.fake_quant import ElasticFakeQuantize
from .export.freeze import FrozenSubnet, QParams, freeze
from .frontends.fx import elastic_backend_config, elastic_qconfig_mapping, prepare_qat
from .frontends.base import PlacementError
from .train.losses import WDRLoss, gpg_losses
from .train.optim import SubnetOptimizer
from .quant.grid import Grid, Scheme
from .quant.space import ElasticSpace, QuantChoice, SubnetConfig
from .supernet import BatchNormStatsError, Supernet
from .train import (QATConfig, SandwichConfig, TrainConfig, evaluate, evaluate_configs, load_checkpoint,
                    sandwich_step, save_checkpoint, train_supernet)

__all__ = ["ElasticSpace", "QuantChoice", "SubnetConfig", "Grid", "Scheme", "ElasticFakeQuantize",
           "elastic_qconfig_mapping", "elastic_backend_config", "prepare_qat", "Supernet", "SubnetOptimizer",
           "SandwichConfig", "TrainConfig", "QATConfig", "WDRLoss", "gpg_losses", "sandwich_step", "evaluate",
           "evaluate_configs", "train_supernet", "save_checkpoint",
           "load_checkpoint", "freeze", "FrozenSubnet", "QParams", "search", "BatchNormStatsError", "adapters",
           "export_onnx", "export_to_tensorrt", "export_qnn", "to_brevitas", "to_pytorch_quantization",
           "register_target", "get_target", "Target", "PlacementError", "__version__"]

_ADAPTER_EXPORTS = ("export_onnx", "export_to_tensorrt", "export_qnn", "to_brevitas", "to_pytorch_quantization",
                    "export_brevitas_qcdq", "export_brevitas_qonnx", "check_tensorrt_onnx", "register_target",
                    "get_target", "Target")


def __getattr__(name: str):
    """`eqnet_plugin.adapters` and its exporters as package attributes, imported on first use (the adapters pull
    in onnx and friends, which the core does not need)."""
    if name == "adapters" or name in _ADAPTER_EXPORTS:
        import importlib
        adapters = importlib.import_module(".adapters", __name__)
        return adapters if name == "adapters" else getattr(adapters, name)
    raise AttributeError(f"module 'eqnet_plugin' has no attribute {name!r}")
