"""IDX readers: Fashion-MNIST from the real files of Debian's ``dataset-fashion-mnist`` package (``.ci/run`` installs
it; no skip), MNIST and corrupt files on synthetic IDX files written here."""
from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqnet_plugin.app import data as data_mod
from eqnet_plugin.app.data import FASHION_MNIST_DIR, fashion_mnist_splits, mnist_splits, read_idx
from eqnet_plugin.app.pipeline import RunSpec, load_data

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SMALL = dict(val_size=1000, limit_train=3000, limit_test=2000)


@pytest.fixture(scope="module")
def fashion():
    return fashion_mnist_splits(seed=0, **SMALL)


@pytest.fixture(scope="module")
def raw():
    """(train images, train labels, test images, test labels) of the real files, read with `read_idx`."""
    return tuple(read_idx(FASHION_MNIST_DIR / (n + ".gz")) for n in NAMES)


def _link_real_files(folder):
    folder.mkdir(parents=True)
    for n in NAMES:
        (folder / (n + ".gz")).symlink_to(FASHION_MNIST_DIR / (n + ".gz"))


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_mnist(folder, n_train=120, n_test=40, side=8, labels=None, gz=(True, False, True, False)):
    """Synthetic MNIST-format files; image i of a file has every pixel = label * 20 + (i % 7)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for n in (n_train, n_test):
        y = np.arange(n) % 10 if labels is None else np.full(n, labels)
        x = np.broadcast_to((y * 20 + np.arange(n) % 7)[:, None, None], (n, side, side))
        arrays += [x, y]
    for name, arr, z in zip(NAMES, arrays, gz):
        body = _idx_bytes(arr)
        if z:
            (folder / (name + ".gz")).write_bytes(gzip.compress(body))
        else:
            (folder / name).write_bytes(body)
    return arrays


# --- Fashion-MNIST, real files ----------------------------------------------------------------------------------
def test_real_files_header(raw):
    x_tr, y_tr, x_te, y_te = raw
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28) and x_tr.dtype == np.uint8
    assert y_tr.shape == (60000,) and y_te.shape == (10000,)
    assert np.bincount(y_tr).tolist() == [6000] * 10 and np.bincount(y_te).tolist() == [1000] * 10


def test_fashion_shapes_labels_classes(fashion):
    s = fashion
    assert (len(s.train), len(s.val), len(s.test)) == (3000, 1000, 2000)
    assert s.train.tensors[0].shape[1:] == (1, 28, 28) and s.train.tensors[0].dtype == torch.float32
    assert s.image_size == 28
    assert (s.num_classes, s.in_channels, len(s.classes)) == (10, 1, 10) and s.classes[9] == "Ankle boot"
    for ds, per_class in ((s.train, 300), (s.val, 100), (s.test, 200)):         # stratified
        y = ds.tensors[1]
        assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    x = s.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3 and len(s.mean) == 1


def test_fashion_val_disjoint_and_test_is_t10k(fashion, raw):
    tr, va, te = (set(i) for i in fashion.indices)
    assert not tr & va and len(tr) == 3000 and len(va) == 1000
    assert max(tr | va) < 60000 and min(te) >= 60000 and max(te) < 70000 and len(te) == 2000
    # the tensors are the files' images at those indices, normalized with the training statistics
    x_tr, y_tr, x_te, y_te = raw
    m, sd = fashion.mean[0], fashion.std[0]
    for ds, idx, images, labels, off in ((fashion.train, fashion.indices[0], x_tr, y_tr, 0),
                                         (fashion.val, fashion.indices[1], x_tr, y_tr, 0),
                                         (fashion.test, fashion.indices[2], x_te, y_te, 60000)):
        pos = np.array(idx[:50]) - off
        want = torch.from_numpy(images[pos].astype(np.float32) / 255.0)[:, None]
        torch.testing.assert_close(ds.tensors[0][:50] * sd + m, want, rtol=0, atol=1e-5)
        assert ds.tensors[1][:50].tolist() == labels[pos].tolist()


def test_fashion_deterministic_in_seed(fashion):
    again = fashion_mnist_splits(seed=0, **SMALL)
    assert again.indices == fashion.indices and torch.equal(again.train.tensors[0], fashion.train.tensors[0])
    other = fashion_mnist_splits(seed=1, **SMALL)
    assert set(other.indices[1]) != set(fashion.indices[1]) and other.indices[0] != fashion.indices[0]
    assert other.indices[2] == fashion.indices[2]              # the test subset is the same for every seed


def test_fashion_resize_and_benchmark_signature(raw):
    s = fashion_mnist_splits(image_size=16, seed=3, val_size=10000, limit_train=1000, limit_test=500)
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 10000, 500) and s.image_size == 16
    assert torch.bincount(s.val.tensors[1]).tolist() == [1000] * 10
    i = s.indices[2][0] - 60000
    want = F.interpolate(torch.from_numpy(raw[2][i:i + 1].astype(np.float32) / 255.0)[:, None], size=(16, 16),
                         mode="bilinear", align_corners=False)
    torch.testing.assert_close(s.test.tensors[0][:1] * s.std[0] + s.mean[0], want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="val_size"):
        fashion_mnist_splits(val_size=5, **{k: v for k, v in SMALL.items() if k != "val_size"})
    with pytest.raises(ValueError, match="limit_train"):
        fashion_mnist_splits(val_size=1000, limit_train=3)
    with pytest.raises(ValueError, match="image_size"):
        fashion_mnist_splits(image_size=2)


def test_fashion_missing_folder_names_the_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist_splits(tmp_path / "nope", **SMALL)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and all(n in msg for n in NAMES)
    assert str(tmp_path / "nope") in msg and str(tmp_path / "nope" / "FashionMNIST" / "raw") in msg
    # nothing given: $EQNET_DATA, then the Debian folder, both named
    monkeypatch.setenv("EQNET_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", tmp_path / "debian")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        fashion_mnist_splits(**SMALL)
    assert str(tmp_path / "env") in str(e.value) and str(tmp_path / "debian") in str(e.value)
    # a folder with some of the files: the missing ones are named
    _link_real_files(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\)"):
        fashion_mnist_splits(tmp_path / "part", **SMALL)


def test_fashion_layouts_and_eqnet_data(tmp_path, monkeypatch, fashion):
    _link_real_files(tmp_path / "flat")
    _link_real_files(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert fashion_mnist_splits(tmp_path / "flat", seed=0, **SMALL).indices == fashion.indices
    assert fashion_mnist_splits(str(tmp_path / "tv"), seed=0, **SMALL).indices == fashion.indices
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", tmp_path / "no-debian")       # only $EQNET_DATA can serve
    monkeypatch.setenv("EQNET_DATA", str(tmp_path / "tv"))
    s = fashion_mnist_splits(seed=0, **SMALL)
    assert s.indices == fashion.indices
    torch.testing.assert_close(s.test.tensors[0], fashion.test.tensors[0], rtol=0, atol=0)
    # an explicit path wins over $EQNET_DATA (synthetic files: 120 training images)
    _write_mnist(tmp_path / "synthetic")
    assert len(fashion_mnist_splits(tmp_path / "synthetic", image_size=8, val_size=20).train) == 100


def test_load_data_fashion_mnist_full_and_default_size():
    assert RunSpec(data="fashion-mnist").resolved_image_size() == 28
    assert RunSpec(data="fashion-mnist:/some/dir").resolved_image_size() == 28
    assert RunSpec(data="mnist", image_size=16).resolved_image_size() == 16
    s = load_data("fashion-mnist", 28, seed=0)                # what benchmarks get: the full data set
    assert (len(s.train), len(s.val), len(s.test)) == (50000, 10000, 10000) and s.num_classes == 10
    assert s.indices[2] == tuple(range(60000, 70000))
    assert torch.bincount(s.val.tensors[1]).tolist() == [1000] * 10


# --- MNIST and generic IDX, synthetic files --------------------------------------------------------------------
def test_mnist_reader_synthetic(tmp_path, monkeypatch):
    x_tr, y_tr, x_te, y_te = _write_mnist(tmp_path / "MNIST" / "raw")
    s = mnist_splits(tmp_path, image_size=8, seed=0, val_size=20)          # torchvision layout, .gz and plain
    assert (len(s.train), len(s.val), len(s.test)) == (100, 20, 40) and s.classes == tuple("0123456789")
    assert torch.bincount(s.val.tensors[1]).tolist() == [2] * 10
    raw_train = (s.train.tensors[0] * s.std[0] + s.mean[0]) * 255.0
    want = torch.as_tensor(x_tr[list(s.indices[0])], dtype=torch.float32)[:, None]
    torch.testing.assert_close(raw_train, want, rtol=0, atol=1e-3)
    assert s.test.tensors[1].tolist() == y_te.tolist() and s.indices[2] == tuple(range(120, 160))
    assert mnist_splits(tmp_path, image_size=16, val_size=20).train.tensors[0].shape[1:] == (1, 16, 16)
    # $EQNET_DATA, and through load_data with and without a folder
    monkeypatch.setenv("EQNET_DATA", str(tmp_path))
    assert mnist_splits(image_size=8, val_size=20).indices[1] == s.indices[1]
    with pytest.raises(ValueError, match="val_size"):
        load_data("mnist", 8)                                  # 10000 validation images of 120: a clear error
    monkeypatch.delenv("EQNET_DATA")
    with pytest.raises(FileNotFoundError, match=r"\$EQNET_DATA is not set") as e:
        mnist_splits()
    assert all(n in str(e.value) for n in NAMES)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_data(f"mnist:{tmp_path / 'nope'}", 8)


def test_load_data_idx_with_folder(tmp_path):
    _write_mnist(tmp_path / "m", n_train=10030, n_test=20, side=4)
    s = load_data(f"mnist:{tmp_path / 'm'}", 6, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10000, 20) and s.image_size == 6
    s2 = load_data(f"fashion-mnist:{tmp_path / 'm'}", 6, seed=1)             # same format, other class names
    assert s2.indices == s.indices and s2.classes[0] == "T-shirt/top"


def test_one_class_idx_raises(tmp_path):
    _write_mnist(tmp_path, labels=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        mnist_splits(tmp_path, image_size=8, val_size=20)


# --- corrupt files ------------------------------------------------------------------------------------------------
def test_read_idx_round_trip_and_corrupt_files(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    good = tmp_path / "good-idx3-ubyte"
    good.write_bytes(_idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(good), arr)
    (tmp_path / "good.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "good.gz"), arr)
    cases = {
        "bad-magic": (b"\x12\x34\x56\x78" + _idx_bytes(arr)[4:], "bad magic number 12345678"),
        "empty": (b"", "bad magic"),
        "short-header": (b"\0\0\x08\x03\0\0\0\x02", "truncated"),
        "truncated": (_idx_bytes(arr)[:-7], r"truncated.*\(2, 3, 5\)"),
        "too-long": (_idx_bytes(arr) + b"xx", "corrupt"),
        "truncated.gz": (gzip.compress(_idx_bytes(arr))[:-12], "corrupt or truncated gzip"),
        "garbage.gz": (b"\x1f\x8b" + b"\xff" * 40, "corrupt or truncated gzip"),
    }
    for name, (body, msg) in cases.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(ValueError, match=msg) as e:
            read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), name


def test_corrupt_dataset_files_named(tmp_path):
    _write_mnist(tmp_path / "a")
    f = tmp_path / "a" / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])                                         # truncated download
    with pytest.raises(ValueError, match=re.escape(str(f))):
        mnist_splits(tmp_path / "a", image_size=8, val_size=20)
    _write_mnist(tmp_path / "b", gz=(False,) * 4)
    lab = tmp_path / "b" / "train-labels-idx1-ubyte"
    lab.write_bytes(_idx_bytes(np.arange(119) % 10))                            # 119 labels for 120 images
    with pytest.raises(ValueError, match="119 labels") as e:
        mnist_splits(tmp_path / "b", image_size=8, val_size=20)
    assert str(lab) in str(e.value)
    lab.write_bytes(_idx_bytes(np.zeros((120, 2, 2))))                          # an images file as labels
    with pytest.raises(ValueError, match="0x00000801") as e:
        mnist_splits(tmp_path / "b", image_size=8, val_size=20)
    assert str(lab) in str(e.value)
