"""The PT2E frontend: EQ-Net on graphs captured with ``torch.export`` and prepared by torchao's PT2E QAT flow,
beside the torch.ao FX one (`eqnet_plugin.frontends.fx`). The only package that imports torchao (`_torchao`)::

    gm = prepare_qat(model, example_inputs, space)       # export + prepare_qat_pt2e(..., ElasticQuantizer) + check
    sn = eqnet_plugin.Supernet(gm)                       # picks PT2EFrontend
    sn.calibrate(batches); sandwich_step(sn, x, y, optimizer, generator=g); evaluate(sn, cfg, loader, bn_batches)
    q = sn.to_reference(cfg)                             # torchao's convert_pt2e: the standard Q/DQ graph of the subnet

Entry points (the same pair as the FX frontend's):

* `prepare_qat(model, example_inputs, space)`: export + ``prepare_qat_pt2e(..., ElasticQuantizer(space))`` + the
  placement postcondition (`check_placement`, raising `eqnet_plugin.frontends.base.PlacementError`).
* `check_placement(exported, prepared)`: for graphs prepared by hand with ``prepare_qat_pt2e``.

Modules: `quantizer` (`ElasticQuantizer`, `ElasticPT2EFakeQuantize`), `graph` (BatchNorm / dropout as modules,
exact pools, ``train()`` / ``eval()``), `placement` (`check_placement`, `prepare_qat`), `frontend` (`PT2EFrontend`,
the `Frontend` that `Supernet` uses) and `freeze` (`freeze_pt2e`, the export IR of one subnet).
"""
from ..base import PlacementError
from .freeze import freeze_pt2e
from .frontend import PT2EFrontend, is_pt2e_prepared
from .graph import enable_train_eval, swap_training_ops
from .placement import check_placement, fake_quant_placement, prepare_qat, reference_placement
from .quantizer import ElasticPT2EFakeQuantize, ElasticQuantizer, split_reused_modules

__all__ = ["ElasticPT2EFakeQuantize", "ElasticQuantizer", "PT2EFrontend", "prepare_qat", "check_placement",
           "fake_quant_placement", "reference_placement", "split_reused_modules", "enable_train_eval",
           "swap_training_ops", "freeze_pt2e", "is_pt2e_prepared", "PlacementError"]
