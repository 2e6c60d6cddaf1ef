"""Datasets for training and evaluating supernets; nothing here downloads.

* `digits_splits` / `digits_loaders`: the embedded default, scikit-learn's bundled 8x8 handwritten digits
  (1797 images, 10 classes) resized (bilinear) to `image_size`, with deterministic stratified train / validation /
  test splits. Several `split_seed`s or k folds (`fold`, `num_folds`) give independent splits for benchmarks.
* `image_folder_splits(path, image_size)`: a local ImageFolder tree (``train/`` + ``val/`` [+ ``test/``] subfolders,
  or one tree split deterministically), loaded into memory.
* `cifar10_splits(path)`: the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``) from a local folder.
* `make_loaders(splits, batch_size, seed)`: DataLoaders with a seeded shuffling generator.

Every split is a `TensorDataset` of float images (N, C, H, W), normalized with the training split's per-channel
mean and standard deviation, and int64 labels.
"""
from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DataSplits", "digits_splits", "digits_loaders", "make_loaders", "image_folder_splits", "cifar10_splits"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test datasets and what a model needs to know about them.

    Attributes:
        train, val, test: `TensorDataset(images (N, C, H, W) float32, labels (N,) int64)`.
        num_classes: number of classes.
        in_channels: image channels C.
        mean, std: per-channel normalization statistics (of the training split) that were applied.
        classes: class names, index = label.
        indices: for each split, the positions of its samples in the source data (train, val, test order), so a
            split can be reproduced or audited.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...] = ()

    @property
    def image_size(self) -> int:
        return int(self.train.tensors[0].shape[-1])


# --- helpers --------------------------------------------------------------------------------------------------
def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with a "
                         "sum below 1, e.g. val_fraction=0.15, test_fraction=0.2")


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with `fraction` of every class held out, deterministic in `seed`."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    rest, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(rest), np.sort(held)


def _kfold_split(labels: np.ndarray, fold: int, num_folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedKFold
    if not (isinstance(num_folds, int) and num_folds >= 2 and isinstance(fold, int) and 0 <= fold < num_folds):
        raise ValueError(f"fold={fold!r}, num_folds={num_folds!r}: need num_folds >= 2 and 0 <= fold < num_folds")
    folds = StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    rest, held = list(folds)[fold]
    return np.sort(rest), np.sort(held)


def _shuffled(idx: np.ndarray, seed: int) -> np.ndarray:
    """`idx` in a seeded random order (so the first batches of a split hold every class)."""
    return idx[np.random.default_rng(seed).permutation(len(idx))]


def _normalize(train: torch.Tensor, *others: torch.Tensor):
    """Normalize all tensors (N, C, H, W) with the per-channel mean/std of `train`."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)                  # (1, C, 1, 1)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    out = [((t - mean) / std).contiguous() for t in (train, *others)]
    return out, tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size={image_size!r}: use an integer >= 4 (e.g. 16)")
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _make_splits(images: torch.Tensor, labels: np.ndarray, parts: tuple[np.ndarray, np.ndarray, np.ndarray],
                 num_classes: int, classes: tuple[str, ...]) -> DataSplits:
    (tr, va, te), mean, std = _normalize(*(images[torch.as_tensor(p, dtype=torch.long)] for p in parts))
    y = torch.as_tensor(labels, dtype=torch.long)
    sets = [TensorDataset(x, y[torch.as_tensor(p, dtype=torch.long)]) for x, p in zip((tr, va, te), parts)]
    return DataSplits(*sets, num_classes=num_classes, in_channels=int(images.shape[1]), mean=mean, std=std,
                      classes=classes, indices=tuple(tuple(int(i) for i in p) for p in parts))


# --- digits ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()                                                  # bundled with scikit-learn, no download
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)    # (1797, 8, 8) in [0, 1]


def digits_splits(image_size: int = 16, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2,
                  fold: int | None = None, num_folds: int = 5) -> DataSplits:
    """scikit-learn's bundled digits, resized to `image_size`, split into stratified train / val / test.

    Args:
        image_size: output side length (bilinear resize of the 8x8 originals).
        seed: split seed; different seeds give different (deterministic) splits.
        val_fraction: share of all images in the validation split (taken out of the non-test part).
        test_fraction: share of all images in the test split (ignored when `fold` is given).
        fold: with `num_folds`, use stratified k-fold: fold `fold` is the test split.
        num_folds: number of folds for `fold`.
    Returns:
        DataSplits (10 classes, 1 channel).
    Raises:
        ValueError: fractions or fold numbers out of range.
    """
    _check_fractions(val_fraction, test_fraction)
    images, labels = _digits_raw()
    x = _resize(torch.from_numpy(images)[:, None], image_size)          # (N, 1, S, S)
    if fold is None:
        rest, test = _stratified_split(labels, test_fraction, seed)
    else:
        rest, test = _kfold_split(labels, fold, num_folds, seed)
    tr, va = _stratified_split(labels[rest], val_fraction / (1.0 - (len(test) / len(labels))), seed + 1)
    parts = (_shuffled(rest[tr], seed), rest[va], test)
    return _make_splits(x, labels, parts, 10, tuple(str(i) for i in range(10)))


def make_loaders(splits: DataSplits, batch_size: int = 64, seed: int = 0, eval_batch_size: int | None = None,
                 drop_last: bool = False, num_workers: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, val, test) DataLoaders; the train loader shuffles with a `torch.Generator` seeded with `seed`.

    The generator is `train_loader.generator`; `train_supernet` saves and restores its state for exact resume.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: use a positive integer")
    gen = torch.Generator().manual_seed(int(seed))
    ebs = eval_batch_size or max(batch_size, 256)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                       num_workers=num_workers)
    val = DataLoader(splits.val, batch_size=ebs, shuffle=False, num_workers=num_workers)
    test = DataLoader(splits.test, batch_size=ebs, shuffle=False, num_workers=num_workers)
    return train, val, test


def digits_loaders(batch_size: int = 64, image_size: int = 16, seed: int = 0, split_seed: int = 0,
                   val_fraction: float = 0.15, test_fraction: float = 0.2, eval_batch_size: int | None = None,
                   drop_last: bool = False, fold: int | None = None, num_folds: int = 5
                   ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, val, test) loaders over `digits_splits(image_size, split_seed, ...)`; `seed` seeds the shuffling.

    Example:
        >>> train, val, test = digits_loaders(batch_size=64)
        >>> x, y = next(iter(train)); tuple(x.shape)
        (64, 1, 16, 16)
    """
    splits = digits_splits(image_size, split_seed, val_fraction, test_fraction, fold=fold, num_folds=num_folds)
    return make_loaders(splits, batch_size, seed, eval_batch_size, drop_last)


# --- local ImageFolder trees ----------------------------------------------------------------------------------
def _scan_tree(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file()]
    if not classes or not items:
        raise FileNotFoundError(f"{root} holds no class folders with images: expected {root}/<class>/<image>.png "
                                f"(suffixes {', '.join(_IMAGE_SUFFIXES)})")
    return items, classes


def _load_images(items: list[tuple[Path, int]], image_size: int, grayscale: bool) -> tuple[torch.Tensor, np.ndarray]:
    from PIL import Image
    mode = "L" if grayscale else "RGB"
    arrays = []
    for f, _ in items:
        with Image.open(f) as im:
            im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, -1))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)     # (N, C, S, S)
    return x, np.array([label for _, label in items], dtype=np.int64)


def image_folder_splits(path: str | os.PathLike, image_size: int, seed: int = 0, val_fraction: float = 0.15,
                        test_fraction: float = 0.2, grayscale: bool = False) -> DataSplits:
    """A local ImageFolder tree loaded into memory (meant for small datasets), resized to `image_size`.

    Layouts:
        * ``path/train/<class>/*`` and ``path/val/<class>/*``: ``val`` is the test split, and a stratified
          `val_fraction` of ``train`` becomes the validation split; with ``path/test/<class>/*`` too, the three
          folders are used as they are.
        * ``path/<class>/*``: one tree, split deterministically (stratified by `seed`) into the three splits.

    Raises:
        FileNotFoundError: `path` is missing or holds no images, naming the layout expected.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {root}/train/<class>/<image> and "
                                f"{root}/val/<class>/<image>, or {root}/<class>/<image>")
    _check_fractions(val_fraction, test_fraction)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_items, classes = _scan_tree(root / "train")
        val_items, val_classes = _scan_tree(root / "val")
        if val_classes != classes:
            raise ValueError(f"{root}/val has classes {val_classes[:5]}... but {root}/train has {classes[:5]}...; "
                             "both folders need the same class subfolders")
        items = train_items + val_items
        x, y = _load_images(items, image_size, grayscale)
        n_tr = len(train_items)
        if (root / "test").is_dir():
            test_items, _ = _scan_tree(root / "test")
            xt, yt = _load_images(test_items, image_size, grayscale)
            x, y = torch.cat([x, xt]), np.concatenate([y, yt])
            parts = (_shuffled(np.arange(n_tr), seed), np.arange(n_tr, len(items)), np.arange(len(items), len(y)))
        else:
            tr, va = _stratified_split(y[:n_tr], val_fraction, seed)
            parts = (_shuffled(tr, seed), va, np.arange(n_tr, len(items)))
    else:
        items, classes = _scan_tree(root)
        x, y = _load_images(items, image_size, grayscale)
        rest, test = _stratified_split(y, test_fraction, seed)
        tr, va = _stratified_split(y[rest], val_fraction / (1.0 - test_fraction), seed + 1)
        parts = (_shuffled(rest[tr], seed), rest[va], test)
    return _make_splits(x, y, parts, len(classes), classes)


# --- CIFAR-10 python batches ----------------------------------------------------------------------------------
def _read_cifar_batch(f: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{f} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); use the files of "
                         "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html") from None
    return data, labels


def cifar10_splits(path: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1,
                   image_size: int | None = None) -> DataSplits:
    """CIFAR-10 from the python batches in `path` (or `path/cifar-10-batches-py`).

    ``test_batch`` is the test split; a stratified `val_fraction` of the five training batches is the validation
    split. Nothing is downloaded.

    Raises:
        FileNotFoundError: a batch file is missing, naming every file expected.
    """
    root = Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python batches missing in {root}: {missing}; expected data_batch_1 .. "
                                "data_batch_5 and test_batch (extract cifar-10-python.tar.gz; nothing is downloaded)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    parts = [_read_cifar_batch(root / n) for n in (*_CIFAR_TRAIN, _CIFAR_TEST)]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255.0)       # (60000, 3, 32, 32)
    y = np.concatenate([p[1] for p in parts])
    if image_size is not None:
        x = _resize(x, image_size)
    n_tr = sum(len(p[1]) for p in parts[:-1])
    tr, va = _stratified_split(y[:n_tr], val_fraction, seed)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    return _make_splits(x, y, (_shuffled(tr, seed), va, np.arange(n_tr, len(y))), 10, classes)
