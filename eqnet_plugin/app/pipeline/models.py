"""Data by name (``digits``, ``fashion-mnist`` / ``mnist`` IDX files, CIFAR-10 batches and ImageFolder trees) and
what the pipeline needs around its models (models by name: `eqnet_plugin.app.models.build_model`)."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..data import DataSplits, cifar10_splits, digits_splits, fashion_mnist_splits, image_folder_splits, mnist_splits


# --- data by name ---------------------------------------------------------------------------------------------
def _repeat_channels(splits: DataSplits, channels: int) -> DataSplits:
    """1-channel data repeated to `channels` channels (for models with an RGB stem, e.g. torchvision's)."""
    def rep(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        return TensorDataset(x.expand(-1, channels, -1, -1).contiguous(), y)    # (N, channels, H, W)
    return replace(splits, train=rep(splits.train), val=rep(splits.val), test=rep(splits.test),
                   in_channels=channels, mean=splits.mean * channels, std=splits.std * channels)


_IDX_DATASETS = {"fashion-mnist": fashion_mnist_splits, "mnist": mnist_splits}


def _idx_dataset(data: str):
    """(reader, folder or None) for ``fashion-mnist`` / ``mnist`` [``:<folder>``], else None."""
    name, sep, folder = data.partition(":")
    if name not in _IDX_DATASETS:
        return None
    return _IDX_DATASETS[name], folder or None


def load_data(data: str, image_size: int, seed: int = 0) -> DataSplits:
    """``digits``, ``fashion-mnist`` / ``mnist`` (IDX files, optionally ``fashion-mnist:<folder>``), or a local
    folder: CIFAR-10 python batches (``data_batch_1`` .. / ``cifar-10-batches-py``) or an ImageFolder tree.

    ``fashion-mnist`` alone reads ``$EQNET_DATA`` or Debian's ``dataset-fashion-mnist`` files
    (`eqnet_plugin.app.data.fashion_mnist_splits`); ``mnist`` alone reads ``$EQNET_DATA``. Both are resized to
    `image_size` and keep 10,000 training images for validation. A folder literally named ``mnist`` is given as
    ``./mnist``.

    Raises:
        FileNotFoundError: the folder does not exist or holds no images / IDX files.
        ValueError: a file cannot be read, or the data has fewer than 2 classes.
    """
    if data == "digits":
        return digits_splits(image_size=image_size, seed=seed)
    idx = _idx_dataset(data)
    if idx is not None:
        reader, folder = idx
        return reader(folder, image_size=image_size, seed=seed)
    root = Path(data).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist; use 'digits' (embedded), 'fashion-mnist' "
                                "or 'mnist' (IDX files), an ImageFolder tree (<path>/<class>/<image> or "
                                "<path>/train + <path>/val) or a CIFAR-10 python batches folder")
    if not root.is_dir():
        raise FileNotFoundError(f"data path {str(root)!r} is a file; give the folder that holds the images")
    if (root / "data_batch_1").is_file() or (root / "cifar-10-batches-py").is_dir():
        return cifar10_splits(root, seed=seed, image_size=None if image_size == 32 else image_size)
    return image_folder_splits(root, image_size, seed=seed)


def _needs_relu6_patterns(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.ReLU6, nn.Hardtanh)) for m in model.modules())


def _seeded(seed: int):
    """A context in which the global torch RNG is seeded, restored afterwards (initialization only)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(seed)
    return stack
