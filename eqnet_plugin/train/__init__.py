"""Supernet training (paper section 3.4), by concern:

* `step`: one training step: `sandwich_step` (H, R and L subnets, GPG, WDR) and the single-subnet `qat_step`,
  configured by `SandwichConfig`;
* `evaluate`: accuracy of a subnet with BatchNorm re-estimated for it (`evaluate`, `evaluate_configs`);
* `checkpoint`: verified, atomic training checkpoints (`save_checkpoint`, `load_checkpoint`, `read_checkpoint`);
* `loops`: the complete supernet loop (`train_supernet`, `TrainConfig`) and the baselines (`train_float`,
  `lsq_qat` with `QATConfig`);
* `losses` (WDR, GPG), `optim` (`SubnetOptimizer`), `distributed` (torch.distributed helpers).

Inside an existing loop, replace ``loss = ce(model(x), y); loss.backward(); opt.step()`` by::

    losses = sandwich_step(sn, x, y, opt, generator=g)     # model=ddp_module under DDP
"""
from __future__ import annotations

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, load_checkpoint, read_checkpoint, \
    save_checkpoint
from .evaluate import accuracy, bn_batches_from, evaluate, evaluate_configs
from .loops import QATConfig, TrainConfig, cosine_scheduler, lsq_qat, train_float, train_supernet
from .step import SandwichConfig, qat_step, sample_sandwich, sandwich_step

__all__ = ["SandwichConfig", "TrainConfig", "QATConfig", "sample_sandwich", "sandwich_step", "qat_step", "evaluate",
           "evaluate_configs", "accuracy", "bn_batches_from", "cosine_scheduler", "train_supernet", "train_float",
           "lsq_qat", "save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION"]
