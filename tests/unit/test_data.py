"""Embedded digits splits, loaders, and the local ImageFolder / CIFAR-10 readers (nothing downloads), including
malicious CIFAR-10 batches, one-class folders and unreadable images."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqnet_plugin.app.data import (cifar10_splits, digits_loaders, digits_splits, image_folder_splits, make_loaders)


def _labels(ds):
    return ds.tensors[1]


def test_digits_splits_shapes_disjoint_stratified():
    s = digits_splits(image_size=16, seed=0)
    x = s.train.tensors[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 16, 16) and s.image_size == 16
    assert _labels(s.train).dtype == torch.int64
    assert (s.num_classes, s.in_channels) == (10, 1)
    sizes = [len(d) for d in (s.train, s.val, s.test)]
    assert sum(sizes) == 1797 and sizes[2] == 360 and sizes[1] == 270
    idx = [set(i) for i in s.indices]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) == set(range(1797))
    # stratified: every class has 35..37 test images (360 / 10)
    assert torch.bincount(_labels(s.test), minlength=10).min() >= 35
    # normalized with the training statistics
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    assert len(s.mean) == len(s.std) == 1


def test_digits_resize_is_bilinear_of_the_originals():
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    s8, s16 = digits_splits(image_size=8), digits_splits(image_size=16)
    i = s16.indices[2][0]
    want = F.interpolate(raw[i:i + 1], size=(16, 16), mode="bilinear", align_corners=False)
    want = (want - s16.mean[0]) / s16.std[0]
    torch.testing.assert_close(s16.test.tensors[0][:1], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(s8.test.tensors[0][0, 0], (raw[i, 0] - s8.mean[0]) / s8.std[0], rtol=0, atol=1e-5)


def test_digits_splits_deterministic_and_seeded():
    a, b, c = digits_splits(seed=0), digits_splits(seed=0), digits_splits(seed=1)
    assert a.indices == b.indices
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert a.indices[2] != c.indices[2]


def test_digits_kfold_test_sets_partition_the_data():
    tests = [set(digits_splits(image_size=8, fold=k, num_folds=5).indices[2]) for k in range(5)]
    assert sum(len(t) for t in tests) == 1797 and set().union(*tests) == set(range(1797))
    with pytest.raises(ValueError, match="num_folds"):
        digits_splits(fold=5, num_folds=5)


def test_bad_fractions_raise():
    with pytest.raises(ValueError, match="val_fraction"):
        digits_splits(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="image_size"):
        digits_splits(image_size=2)


def test_loaders_shuffle_with_a_seeded_generator():
    tr1, va, te = digits_loaders(batch_size=32, image_size=8, seed=5)
    tr2, _, _ = digits_loaders(batch_size=32, image_size=8, seed=5)
    tr3, _, _ = digits_loaders(batch_size=32, image_size=8, seed=6)
    y1, y2, y3 = (next(iter(t))[1] for t in (tr1, tr2, tr3))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert tr1.generator is not None
    assert len(va.dataset) == 270 and len(te.dataset) == 360
    # epochs differ (the generator advances), the order is reproducible from the generator state
    state = tr1.generator.get_state()
    e2 = torch.cat([b[1] for b in tr1])
    tr1.generator.set_state(state)
    assert torch.equal(e2, torch.cat([b[1] for b in tr1]))
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(digits_splits(image_size=8), batch_size=0)


def _write_png_tree(root, classes, per_class, size=6, offset=0):
    from PIL import Image
    rng = np.random.default_rng(offset)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_single_tree(tmp_path):
    _write_png_tree(tmp_path / "data", ["cat", "dog", "emu"], 10)
    s = image_folder_splits(tmp_path / "data", image_size=8, seed=0)
    assert s.classes == ("cat", "dog", "emu") and s.num_classes == 3 and s.in_channels == 3
    assert sum(len(d) for d in (s.train, s.val, s.test)) == 30
    assert s.train.tensors[0].shape[1:] == (3, 8, 8)
    assert torch.bincount(_labels(s.test), minlength=3).tolist() == [2, 2, 2]
    g = image_folder_splits(tmp_path / "data", image_size=8, grayscale=True)
    assert g.in_channels == 1
    assert image_folder_splits(tmp_path / "data", image_size=8, seed=0).indices == s.indices


def test_image_folder_train_val_layout(tmp_path):
    _write_png_tree(tmp_path / "train", ["a", "b"], 10)
    _write_png_tree(tmp_path / "val", ["a", "b"], 3, offset=1)
    s = image_folder_splits(tmp_path, image_size=8, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    _write_png_tree(tmp_path / "test", ["a", "b"], 2, offset=2)
    s = image_folder_splits(tmp_path, image_size=8)
    assert (len(s.train), len(s.val), len(s.test)) == (20, 6, 4)


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        image_folder_splits(tmp_path / "nope", image_size=8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders with images"):
        image_folder_splits(tmp_path / "empty", image_size=8)


def _write_cifar(folder, per_batch=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, n in enumerate(names):
        data = rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8)
        data[:, 0] = k                                    # tag the batch in the first pixel
        labels = [i % 10 for i in range(per_batch)]
        with open(folder / n, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": n.encode()}, f)


def test_cifar10_reader(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    s = cifar10_splits(tmp_path, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.train.tensors[0].shape[1:] == (3, 32, 32) and s.in_channels == 3 and s.classes[0] == "airplane"
    assert torch.bincount(_labels(s.val), minlength=10).tolist() == [1] * 10
    # the test split is test_batch: its first pixel (batch tag 5) differs from every training image
    raw_first = s.test.tensors[0][:, 0, 0, 0] * s.std[0] + s.mean[0]
    torch.testing.assert_close(raw_first, torch.full((20,), 5 / 255.0), rtol=0, atol=1e-5)
    assert cifar10_splits(tmp_path / "cifar-10-batches-py", image_size=16).image_size == 16


def test_cifar10_missing_files_named(tmp_path):
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar10_splits(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        cifar10_splits(tmp_path / "c")


# --- safety and unreadable files -------------------------------------------------------------------------------
class _CreatesFileWithSystem:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        import os
        return os.system, (f"touch '{self.target}'",)


class _CreatesFileWithOpen:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        import builtins
        return builtins.open, (self.target, "w")


@pytest.mark.parametrize("payload", [_CreatesFileWithSystem, _CreatesFileWithOpen])
def test_cifar10_malicious_batch_runs_no_code(tmp_path, payload):
    _write_cifar(tmp_path / "c")
    target = tmp_path / "pwned"
    bad = tmp_path / "c" / "data_batch_2"
    with open(bad, "wb") as f:                   # the payload sits inside an otherwise normal batch dict
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": payload(target)}, f)
    with pytest.raises(ValueError, match="not allowed") as e:
        cifar10_splits(tmp_path / "c")
    assert str(bad) in str(e.value) and "not a CIFAR-10 python batch" in str(e.value)
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_legitimate_batches_still_load(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": n.encode(), b"labels": np.arange(20) % 10,        # labels as an ndarray this time
             b"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * 20}
        body = pickle.dumps(d, protocol=protocol)
        if protocol == 2:       # the global names numpy 1.x wrote into the real (Python 2) CIFAR-10 files
            body = body.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / n).write_bytes(body)
    s = cifar10_splits(tmp_path, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20) and s.num_classes == 10


def test_image_folder_needs_two_classes(tmp_path):
    _write_png_tree(tmp_path / "one", ["cat"], 6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        image_folder_splits(tmp_path / "one", image_size=8)
    (tmp_path / "one" / "dog").mkdir()                                 # an empty second class does not count
    with pytest.raises(ValueError, match="at least 2 classes"):
        image_folder_splits(tmp_path / "one", image_size=8)
    _write_png_tree(tmp_path / "tv" / "train", ["a"], 6)
    _write_png_tree(tmp_path / "tv" / "val", ["a"], 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        image_folder_splits(tmp_path / "tv", image_size=8)


def test_truncated_image_names_the_file(tmp_path):
    _write_png_tree(tmp_path / "d", ["a", "b"], 4, size=32)
    bad = tmp_path / "d" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])                             # header intact, pixel data cut
    with pytest.raises(ValueError, match="cannot read image") as e:
        image_folder_splits(tmp_path / "d", image_size=8)
    assert str(bad) in str(e.value)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image") as e:
        image_folder_splits(tmp_path / "d", image_size=8)
    assert str(bad) in str(e.value)
