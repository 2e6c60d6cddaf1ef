"""Models and data by name: compact models, torchvision classification models, ``package.module:callable``;
``digits``, ``fashion-mnist`` / ``mnist`` IDX files, CIFAR-10 batches and ImageFolder trees."""
from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..data import DataSplits, cifar10_splits, digits_splits, fashion_mnist_splits, image_folder_splits, mnist_splits

COMPACT_MODELS = ("tiny_resnet", "tiny_mobilenet_v2")


# --- models and data ------------------------------------------------------------------------------------------
def _torchvision_models() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _call_with_supported(fn: Callable, **kwargs) -> nn.Module:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return fn(**{k: v for k, v in kwargs.items() if var_kw or k in params})


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A float model by name (see module docstring), randomly initialized (global torch RNG).

    Raises:
        ValueError: unknown name, a callable that cannot be imported or does not return an nn.Module.
    """
    if name in COMPACT_MODELS:
        from ..models import build_model as compact
        return compact(name, num_classes, in_channels)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({e}); give "
                             "package.module:callable of an importable module") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ValueError(f"model {name!r}: {module_name} has no callable {attr!r}")
        model = _call_with_supported(fn, num_classes=num_classes, in_channels=in_channels)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        names = _torchvision_models()
    except ImportError:
        names = []
    if name in names:
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    close = [n for n in names if n.startswith(name[:4])][:6]
    raise ValueError(f"unknown model {name!r}: use {' or '.join(COMPACT_MODELS)}, a torchvision classification model "
                     f"(e.g. resnet18, mobilenet_v2{', ' + ', '.join(close) if close else ''}) or "
                     "package.module:callable")


def model_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first conv layer (None when the model starts otherwise)."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return None
    return None


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
