"""A tiny, deterministic supernet on 8x8 digits for the training tests and their subprocess workers. Tests take the
supernet through the session fixture ``tiny_digits_supernet`` (conftest.py), built once; the workers call
`tiny_supernet` directly."""
from __future__ import annotations

import warnings

import torch
from torch.ao.quantization.quantize_fx import prepare_qat_fx
from torch.utils.data import DataLoader, TensorDataset

from eqnet_plugin import ElasticSpace, Supernet, elastic_qconfig_mapping
from eqnet_plugin.app.data import digits_splits
from eqnet_plugin.app.models import TinyResNet

SPACE = ElasticSpace(weight_bits=(2, 4, 8), act_bits=(2, 4, 8))
WIDTHS = (8, 16, 16)


def tiny_data(n_train: int = 256, image_size: int = 8):
    """(train TensorDataset of n_train samples, val TensorDataset, splits)."""
    splits = digits_splits(image_size=image_size)
    x, y = splits.train.tensors
    return TensorDataset(x[:n_train], y[:n_train]), splits.val, splits


def tiny_loader(dataset, batch_size: int = 64, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def tiny_supernet(seed: int = 0, calibration: torch.Tensor | None = None, calibrate: bool = True) -> Supernet:
    """TinyResNet(widths=(8, 16, 16)) prepared with the small space and calibrated (deterministic in `seed`)."""
    torch.manual_seed(seed)
    model = TinyResNet(widths=WIDTHS)
    if calibration is None:
        calibration = tiny_data()[0].tensors[0][:128]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = prepare_qat_fx(model, elastic_qconfig_mapping(SPACE), (calibration[:2],))
    sn = Supernet(gm, SPACE)
    if calibrate:
        sn.calibrate([calibration[:64], calibration[64:128]])
    return sn
