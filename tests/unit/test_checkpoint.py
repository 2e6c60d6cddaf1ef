"""Checkpoints: exact resume in a fresh process, atomic writes, clear errors for truncated or foreign files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eqnet_plugin import ElasticSpace, Supernet, elastic_backend_config, elastic_qconfig_mapping
from eqnet_plugin.train import CheckpointError, load_checkpoint, save_checkpoint, sandwich_step

from _tiny import SPACE, tiny_data

HERE = Path(__file__).resolve().parents[1]          # tests/, where the workers live


def _run_worker(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "_resume_worker.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    ckpt, full, resumed = tmp_path / "ckpt.pt", tmp_path / "full.pt", tmp_path / "resumed.pt"
    _run_worker("first", ckpt, full)          # STOP steps + checkpoint; then the uninterrupted run
    assert ckpt.exists()
    _run_worker("second", ckpt, resumed)      # fresh process: load, continue to the end
    a, b = torch.load(full), torch.load(resumed)
    assert a["step"] == b["step"] == 12
    _assert_same(a, b)                        # model, optimizer, scheduler, generators, history, RNG


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_digits_supernet):
    sn = tiny_digits_supernet()
    train, _, _ = tiny_data(n_train=64)
    opt = torch.optim.Adam(sn.model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    gen = torch.Generator().manual_seed(3)
    x, y = train.tensors
    sandwich_step(sn, x[:32], y[:32], opt, generator=gen)
    sched.step()
    path = tmp_path_factory.mktemp("ckpt") / "sn.pt"
    sn.apply(sn.uniform(4, 2, symmetric=False))
    assert save_checkpoint(path, sn, opt, sched, step=1, generator=gen, extra={"note": "hello", "n": 3})
    return sn, opt, sched, gen, path


def test_roundtrip_restores_everything(trained, tiny_digits_supernet):
    sn, opt, sched, gen, path = trained
    other = tiny_digits_supernet(seed=1)
    opt2 = torch.optim.Adam(other.model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    gen2 = torch.Generator().manual_seed(99)
    info = load_checkpoint(path, other, opt2, sched2, gen2)
    assert info["step"] == 1 and info["extra"] == {"note": "hello", "n": 3} and info["space"] == SPACE
    assert info["active_config"] == sn.current_config() == other.current_config()
    sd, sd2 = sn.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(gen.get_state(), gen2.get_state())
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # the global RNG states are restored to the saved ones
    import random
    import numpy as np
    draws = [(torch.rand(4), np.random.rand(2), random.random())]
    load_checkpoint(path, other, restore_rng=True)
    draws.append((torch.rand(4), np.random.rand(2), random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and (draws[0][1] == draws[1][1]).all()
    assert draws[0][2] == draws[1][2]


def test_truncated_checkpoint_is_reported(trained, tmp_path):
    sn, opt, _, _, path = trained
    data = path.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad, sn)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", sn)


def test_foreign_checkpoints_are_reported(trained, tmp_path):
    sn, _, _, _, _ = trained
    plain = tmp_path / "plain.pt"
    torch.save(sn.model.state_dict(), plain)                    # a bare state_dict, not our format
    with pytest.raises(CheckpointError, match="not an eqnet_plugin checkpoint"):
        load_checkpoint(plain, sn)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk, sn)


def test_checkpoint_of_another_model_or_space(trained, tmp_path):
    import warnings
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    from eqnet_plugin.app.models import TinyMobileNetV2
    sn, _, _, _, path = trained
    x = tiny_data(n_train=8)[0].tensors[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = prepare_qat_fx(TinyMobileNetV2(), elastic_qconfig_mapping(SPACE), (x[:2],),
                            backend_config=elastic_backend_config())
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(path, Supernet(gm, SPACE))
    wider = ElasticSpace(weight_bits=(2, 4, 8), act_bits=(4, 8))
    with pytest.raises(CheckpointError, match="space"):
        load_checkpoint(path, Supernet(sn.model, wider))


def test_failed_save_leaves_previous_file_intact(trained, tmp_path, monkeypatch):
    sn, opt, _, _, _ = trained
    path = tmp_path / "keep.pt"
    save_checkpoint(path, sn, opt, step=5)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, sn, opt, step=6)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["keep.pt"]
    assert load_checkpoint(path, sn, restore_rng=False)["step"] == 5


def test_extra_must_be_plain_values(trained, tmp_path):
    sn, opt, _, _, _ = trained
    with pytest.raises(TypeError, match="to_dict"):
        save_checkpoint(tmp_path / "x.pt", sn, opt, extra={"config": sn.current_config()})
    assert not (tmp_path / "x.pt").exists()


def _flip_bit_in_entry(src: Path, dst: Path, entry_suffix: str = "data/0", bit: int = 2) -> str:
    """Copy `src` to `dst` with one bit flipped inside the stored bytes of the first zip entry ending in
    `entry_suffix` (a tensor's data); returns the entry's name."""
    import struct
    import zipfile
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(entry_suffix) and i.file_size > 0)
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len          # the local header's own extra field (padding)
    data[start] ^= 1 << bit
    dst.write_bytes(bytes(data))
    return info.filename


def test_flipped_bit_in_stored_data_is_refused(trained, tmp_path):
    """One flipped bit in a stored tensor (e.g. a quantizer scale) used to load silently; now the zip CRC check
    refuses it with the file's name."""
    sn, _, _, _, path = trained
    bad = tmp_path / "flipped.pt"
    entry = _flip_bit_in_entry(path, bad)
    with pytest.raises(CheckpointError, match=r"'.*flipped\.pt' is corrupt") as e:
        load_checkpoint(bad, sn)
    assert entry in str(e.value)


def test_content_hash_catches_a_change_with_valid_crcs(trained, tmp_path):
    """A checkpoint re-saved with one value changed (valid zip CRCs) no longer matches its stored sha256."""
    sn, _, _, _, path = trained
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["sha256"]) == 64
    name = next(k for k in ckpt["model"] if "scale" in k)             # a quantizer's learned scale
    ckpt["model"][name] = ckpt["model"][name].clone()
    flat = ckpt["model"][name].view(-1)
    flat[0] = torch.nextafter(flat[0], flat[0] + 1)                # the smallest possible change
    bad = tmp_path / "edited.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"edited\.pt' is corrupt: its content does not match the sha256"):
        load_checkpoint(bad, sn)


def test_checkpoint_without_hash_is_refused(trained, tmp_path):
    """Every checkpoint save_checkpoint writes holds its content hash: one without it cannot be verified and is
    refused with the file's name."""
    sn, _, _, _, path = trained
    ckpt = torch.load(path, weights_only=True)
    del ckpt["sha256"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    with pytest.raises(CheckpointError, match=r"old\.pt' holds no content hash .*save_checkpoint"):
        load_checkpoint(old, sn, restore_rng=False)


def test_empty_and_random_files_get_our_message(trained, tmp_path):
    """An empty file used to crash with an IndexError; random bytes showed torch's weights_only advice."""
    sn, _, _, _, _ = trained
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"'.*empty\.pt' is empty \(0 bytes\)"):
        load_checkpoint(empty, sn)
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"random\.pt' is not an eqnet_plugin checkpoint") as e:
        load_checkpoint(rnd, sn)
    assert "weights_only" not in str(e.value)
