"""Datasets for training and evaluating supernets; nothing here downloads.

* `digits_splits` / `digits_loaders`: the embedded default, scikit-learn's bundled 8x8 handwritten digits
  (1797 images, 10 classes) resized (bilinear) to `image_size`, with deterministic stratified train / validation /
  test splits. Several `split_seed`s or k folds (`fold`, `num_folds`) give independent splits for benchmarks.
* `image_folder_splits(path, image_size)`: a local ImageFolder tree (``train/`` + ``val/`` [+ ``test/``] subfolders,
  or one tree split deterministically), loaded into memory.
* `cifar10_splits(path)`: the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``) from a local folder,
  read with a restricted unpickler (numpy arrays and plain containers only: a batch file cannot run code).
* `fashion_mnist_splits(path=None, image_size=28, seed=0, val_size=10000)`: Fashion-MNIST from its four IDX files
  (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``), by default those of Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``); a stratified `val_size` of the 60,000 training images is the
  validation split and the official 10,000 ``t10k`` images are the test split. `mnist_splits(path)` reads MNIST,
  which uses the same format. Folders are searched in this order: `path` (alone, when given), ``$EQNET_DATA``,
  then the Debian folder (Fashion-MNIST only); each as a folder holding the four files or torchvision's
  ``<root>/FashionMNIST/raw/`` (``<root>/MNIST/raw/``).
* `read_idx(path)`: one IDX file (gzip or plain) as a numpy array, validated against its header.
* `make_loaders(splits, batch_size, seed)`: DataLoaders with a seeded shuffling generator.

Every split is a `TensorDataset` of float images (N, C, H, W), normalized with the training split's per-channel
mean and standard deviation, and int64 labels. Every reader needs at least 2 classes, and a file it cannot read
(a truncated image, a corrupt batch or IDX file) raises ValueError naming that file.
"""
from __future__ import annotations

import functools
import gzip
import importlib
import os
import pickle
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DataSplits", "digits_splits", "digits_loaders", "make_loaders", "image_folder_splits", "cifar10_splits",
           "fashion_mnist_splits", "mnist_splits", "read_idx", "FASHION_MNIST_DIR"]

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
    present = np.unique(labels[parts[0]])                             # class labels the training split holds
    if num_classes < 2 or len(present) < 2:
        names = [classes[i] if 0 <= i < len(classes) else str(i) for i in present.tolist()]
        raise ValueError(f"the training split holds {len(present)} class(es) {names} of num_classes={num_classes}; "
                         "a classifier needs at least 2 classes")
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
                   drop_last: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, val, test) loaders over `digits_splits(image_size, split_seed, val_fraction, test_fraction)`;
    `seed` seeds the shuffling. For k-fold splits use `digits_splits(fold=...)` with `make_loaders`.

    Example:
        >>> train, val, test = digits_loaders(batch_size=64)
        >>> x, y = next(iter(train)); tuple(x.shape)
        (64, 1, 16, 16)
    """
    splits = digits_splits(image_size, split_seed, val_fraction, test_fraction)
    return make_loaders(splits, batch_size, seed, eval_batch_size, drop_last)


# --- local ImageFolder trees ----------------------------------------------------------------------------------
def _scan_tree(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file()]
    if not classes or not items:
        raise FileNotFoundError(f"{root} holds no class folders with images: expected {root}/<class>/<image>.png "
                                f"(suffixes {', '.join(_IMAGE_SUFFIXES)})")
    with_images = sorted({classes[label] for _, label in items})
    if len(with_images) < 2:
        raise ValueError(f"{root} holds images of {len(with_images)} class ({with_images[0]!r}); a classifier needs at "
                         f"least 2 classes: one subfolder per class, {root}/<class>/<image>, with 2 or more classes")
    return items, classes


def _load_images(items: list[tuple[Path, int]], image_size: int, grayscale: bool) -> tuple[torch.Tensor, np.ndarray]:
    from PIL import Image
    mode = "L" if grayscale else "RGB"
    arrays = []
    for f, _ in items:
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, -1))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            # PIL: UnidentifiedImageError (an OSError) for unknown content, OSError for truncated data
            raise ValueError(f"cannot read image {f} ({type(e).__name__}: {e}); the file is truncated or not an "
                             "image: replace or remove it") from None
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
def _numpy_global(name: str, modules: tuple[str, ...]):
    for m in modules:                           # numpy >= 2 has numpy._core; numpy 1.x (and old pickles) numpy.core
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name} in {modules}")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
# (module, name) a CIFAR-10 batch may reference -> how to get it. The real batches (pickled by Python 2) hold a dict
# of a uint8 ndarray, lists of ints and byte strings: numpy's array reconstruction is all they need. Pickles written
# by Python 3 may add _codecs.encode (bytes under protocol 2) and numpy's _frombuffer (protocol 5).
_CIFAR_GLOBALS = {
    **{(m, "_reconstruct"): functools.partial(_numpy_global, "_reconstruct", _MULTIARRAY) for m in _MULTIARRAY},
    **{(m, "scalar"): functools.partial(_numpy_global, "scalar", _MULTIARRAY) for m in _MULTIARRAY},
    **{(m, "_frombuffer"): functools.partial(_numpy_global, "_frombuffer", _NUMERIC) for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and plain containers, and nothing else: a pickle naming any other
    global (``os.system``, ``builtins.open``, ...) raises `pickle.UnpicklingError` before anything runs."""

    def find_class(self, module: str, name: str):
        get = _CIFAR_GLOBALS.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch (only numpy "
                                         "arrays, lists, dicts, numbers and strings)")
        return get()


def _read_cifar_batch(f: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(f, "rb") as fh:
            d = _CifarUnpickler(fh, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        if labels.shape != (len(data),):
            raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for {len(data)} images")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"labels {labels.min()}..{labels.max()} outside 0..9")
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
            ImportError, OverflowError, MemoryError) as e:
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


# --- IDX files: Fashion-MNIST and MNIST -------------------------------------------------------------------------
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")     # Debian package dataset-fashion-mnist
_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# IDX type byte -> numpy dtype (multi-byte values are big-endian)
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 0x00000803, 0x00000801        # uint8, 3 dims / uint8, 1 dim
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (the MNIST format; gzip-compressed or plain, told apart by content) as a read-only array.

    The header (two zero bytes, a type byte, the number of dimensions, then each dimension as a big-endian uint32)
    must describe exactly the bytes that follow.

    Raises:
        ValueError: the file is truncated, corrupt, not gzip/IDX, or longer than its header says; naming the file.
    """
    f = Path(path)
    try:
        with open(f, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":                                    # gzip magic
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{f} is a corrupt or truncated gzip file ({type(e).__name__}: {e}); download or install "
                         "it again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{f} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'} (expected "
                         "0000 then a type byte 08/09/0b/0c/0d/0e and the number of dimensions)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{f} is truncated: its header announces {ndim} dimensions but the file ends after "
                         f"{len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    want = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "corrupt"
        raise ValueError(f"{f} is {what}: its header announces shape {dims} ({want} bytes with the header) but it "
                         f"holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _idx_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The four IDX files in `folder` (``name.gz`` preferred over ``name``) and the names missing there."""
    found, missing = [], []
    for n in _IDX_NAMES:
        hit = next((folder / c for c in (n + ".gz", n) if (folder / c).is_file()), None)
        (found if hit else missing).append(hit or n)
    return found, missing


def _find_idx_folder(dataset: str, path, raw_dir: str, default: Path | None, install_hint: str) -> list[Path]:
    """The four IDX files of the first folder that holds them all: `path` alone when given, else ``$EQNET_DATA``
    and then `default`; each as a folder with the files or torchvision's ``<root>/<raw_dir>/raw``."""
    if path is not None:
        roots = [Path(path).expanduser()]
    else:
        env = os.environ.get("EQNET_DATA", "")
        roots = ([Path(env).expanduser()] if env else []) + ([default] if default is not None else [])
    searched = []
    for root in roots:
        for folder in (root, root / raw_dir / "raw"):
            files, missing = _idx_files(folder)
            if not missing:
                return files
            partial = f" (missing {', '.join(missing)})" if len(missing) < len(_IDX_NAMES) else ""
            searched.append(f"{folder}{partial}")
    where = "; ".join(searched) if searched else "nothing (no path given and $EQNET_DATA is not set)"
    raise FileNotFoundError(f"{dataset} IDX files not found. Expected {', '.join(n + '[.gz]' for n in _IDX_NAMES)} "
                            f"in a folder, or in torchvision's <root>/{raw_dir}/raw/. Searched: {where}. "
                            f"{install_hint}")


@functools.lru_cache(maxsize=2)
def _read_idx_set(files: tuple[str, ...], stamps: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels), validated; cached by path and modification stamp."""
    del stamps                                                          # only part of the cache key
    arrays = [read_idx(f) for f in files]
    for k, (img_f, lab_f) in enumerate(((files[0], files[1]), (files[2], files[3]))):
        images, labels = arrays[2 * k], arrays[2 * k + 1]
        for f, arr, magic, nd in ((img_f, images, _IDX_IMAGES_MAGIC, 3), (lab_f, labels, _IDX_LABELS_MAGIC, 1)):
            if arr.dtype != np.uint8 or arr.ndim != nd:
                raise ValueError(f"{f}: expected magic number {magic:#010x} (uint8, {nd} dimension(s)), found a "
                                 f"{arr.dtype} array of shape {arr.shape}")
        if images.shape[1] < 1 or images.shape[2] < 1:
            raise ValueError(f"{img_f}: images of shape {images.shape[1:]}, expected rows and columns >= 1")
        if len(labels) != len(images):
            raise ValueError(f"{lab_f} holds {len(labels)} labels but {img_f} holds {len(images)} images; the "
                             "counts must match")
        if len(labels) and labels.max() > 9:
            raise ValueError(f"{lab_f}: label {int(labels.max())} outside 0..9")
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise ValueError(f"{files[0]} holds {arrays[0].shape[1:]} images but {files[2]} holds {arrays[2].shape[1:]}")
    return tuple(arrays)


def _subset(labels: np.ndarray, limit: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted indices of a stratified subset of at most `limit` samples (all of them when `limit` is None)."""
    if limit is None:
        return np.arange(len(labels))
    n_cls = len(np.unique(labels))
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < n_cls:
        raise ValueError(f"{what}={limit!r}: use None (all) or an integer >= the number of classes ({n_cls})")
    if limit >= len(labels):
        return np.arange(len(labels))
    if limit > len(labels) - n_cls:                                     # a stratified split leaves >= 1 per class
        raise ValueError(f"{what}={limit!r}: use at most {len(labels) - n_cls} (a stratified subset) or "
                         f"{len(labels)} or more (all {len(labels)} images)")
    return _stratified_split(labels, int(limit), seed)[1]


def _idx_splits(files: list[Path], classes: tuple[str, ...], image_size: int, seed: int, val_size: int,
                limit_train: int | None, limit_test: int | None) -> DataSplits:
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size={image_size!r}: use an integer >= 4 (e.g. 28)")
    stamps = tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files))
    x_tr, y_tr, x_te, y_te = _read_idx_set(tuple(str(f) for f in files), stamps)
    n_cls = len(np.unique(y_tr))
    if not isinstance(val_size, (int, np.integer)) or not n_cls <= val_size < len(y_tr) - n_cls:
        raise ValueError(f"val_size={val_size!r}: use an integer from {n_cls} (one image per class) to "
                         f"{len(y_tr) - n_cls - 1} (the validation images held out of the {len(y_tr)} training "
                         "images), e.g. 10000")
    rest, val = _stratified_split(y_tr, int(val_size), seed)            # val: held out of the training file
    train = rest[_subset(y_tr[rest], limit_train, seed + 1, "limit_train")]
    test = _subset(y_te, limit_test, 0, "limit_test")                   # same test subset for every seed
    # only the selected images become float tensors; indices count train file first, then test file (60000 + i)
    x = torch.from_numpy(np.concatenate([x_tr[train], x_tr[val], x_te[test]]))[:, None].float().div_(255.0)
    y = np.concatenate([y_tr[train], y_tr[val], y_te[test]]).astype(np.int64)
    x = _resize(x, image_size)                                          # (N, 1, S, S)
    n1, n2 = len(train), len(train) + len(val)
    order = _shuffled(np.arange(n1), seed)                              # train order: every class in early batches
    splits = _make_splits(x, y, (order, np.arange(n1, n2), np.arange(n2, len(y))), len(classes), classes)
    return replace(splits, indices=(tuple(int(i) for i in train[order]), tuple(int(i) for i in val),
                                    tuple(int(i) + len(y_tr) for i in test)))


def fashion_mnist_splits(path: str | os.PathLike | None = None, image_size: int = 28, seed: int = 0,
                         val_size: int = 10000, limit_train: int | None = None,
                         limit_test: int | None = None) -> DataSplits:
    """Fashion-MNIST (70,000 28x28 grey images, 10 classes) from its IDX files; nothing is downloaded.

    Splits: a stratified `val_size` of the 60,000 ``train`` images (chosen by `seed`) is the validation split, the
    rest is the training split, and the official 10,000 ``t10k`` images are the test split. All are normalized with
    the training split's mean and std. ``indices`` count the ``train`` file's images 0..59999 and the ``t10k``
    file's 60000..69999.

    Args:
        path: a folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, or torchvision's root
            (``<path>/FashionMNIST/raw/``). Only this folder is searched when given; otherwise ``$EQNET_DATA`` (same
            two layouts), then `FASHION_MNIST_DIR` (``apt-get install dataset-fashion-mnist``).
        image_size: output side length (bilinear resize when not 28).
        seed: validation split and training order; deterministic.
        val_size: number of validation images (stratified, held out of the training file).
        limit_train: keep a stratified subset of at most this many training images (None: all), e.g. for tests.
        limit_test: keep a stratified subset of at most this many test images (the same for every seed).
    Returns:
        DataSplits (10 classes, 1 channel).
    Raises:
        FileNotFoundError: no folder holds the four files; names the package, the files and the folders searched.
        ValueError: a corrupt or truncated file (named), or arguments out of range.

    Example (benchmarks):
        >>> s = fashion_mnist_splits(image_size=28, seed=0, val_size=10000)   # doctest: +SKIP
        >>> len(s.train), len(s.val), len(s.test)                             # doctest: +SKIP
        (50000, 10000, 10000)
    """
    files = _find_idx_folder("Fashion-MNIST", path, "FashionMNIST", FASHION_MNIST_DIR,
                             "On Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs them in "
                             f"{FASHION_MNIST_DIR}); or pass the folder, or set EQNET_DATA to it.")
    return _idx_splits(files, FASHION_MNIST_CLASSES, image_size, seed, val_size, limit_train, limit_test)


def mnist_splits(path: str | os.PathLike | None = None, image_size: int = 28, seed: int = 0, val_size: int = 10000,
                 limit_train: int | None = None, limit_test: int | None = None) -> DataSplits:
    """MNIST handwritten digits from its four IDX files, split like `fashion_mnist_splits` (same arguments).

    `path`: a folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` or torchvision's root
    (``<path>/MNIST/raw/``); without it, ``$EQNET_DATA`` (same layouts). There is no default folder.

    Raises:
        FileNotFoundError: no folder holds the four files (naming the files and the folders searched).
        ValueError: a corrupt or truncated file (named), or arguments out of range.
    """
    files = _find_idx_folder("MNIST", path, "MNIST", None,
                             "Pass the folder that holds them (e.g. --data mnist:/path/to/mnist), or set EQNET_DATA "
                             "to it; nothing is downloaded.")
    return _idx_splits(files, tuple(str(i) for i in range(10)), image_size, seed, val_size, limit_train, limit_test)
