"""Bad inputs the command line guards against (docs/bad_inputs.md): damaged checkpoints, resumes
with other settings, mismatched image sizes, out-of-range numbers, records of another supernet, exports some targets
refuse, unwritable output folders. Each ends with exit status 2, one line that names the fix, and nothing written.

Two small runs serve every test: a `eqnet train` killed after its first epoch (tiny_resnet on 8x8 digits, batch 256:
5 steps per epoch, 2 epochs planned) and the same run resumed to its end.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from eqnet_plugin.app import cli
from eqnet_plugin.app.pipeline import read_run_spec
from eqnet_plugin.search.records import Record
from eqnet_plugin.quant.space import QuantChoice, SubnetConfig

from _cli import FAST, assert_one_line_error, run

TRAIN = ["--float-epochs", "0", "--epochs", "2", "--batch-size", "256", "--image-size", "8", "--weight-bits", "2",
         "4", "8", "--act-bits", "2", "4", "8", *FAST]




def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "supernet.pt"


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """OUT of an `eqnet train` interrupted in its second epoch: its checkpoint is the one of epoch 1 (step 5)."""
    import eqnet_plugin.train.loops as T           # the module whose train_supernet calls sandwich_step
    out = tmp_path_factory.mktemp("partial")
    real, calls = T.sandwich_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt          # what Ctrl-C (or a kill) does in the middle of epoch 2
        return real(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "sandwich_step", step)
        assert cli.main(["train", *TRAIN, "--out", str(out)]) == 130
    assert torch.load(out / "supernet.pt", weights_only=True)["step"] == 5
    return out


@pytest.fixture(scope="module")
def finished(partial, tmp_path_factory):
    """The interrupted run resumed to its end (10 steps)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ckpt = _copy_run(partial, out)
    assert cli.main(["train", *TRAIN, "--out", str(out)]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 10
    return ckpt


# --- checkpoints ----------------------------------------------------------------------------------------------------
def test_partial_run_checkpoint_evaluates(partial, capsys):
    """A checkpoint left by a killed `eqnet train` used to ask for --model/--data (and fail with them): every
    checkpoint written during training now stores the run spec."""
    ckpt = partial / "supernet.pt"
    spec, _ = read_run_spec(ckpt)
    assert spec.image_size == 8 and spec.batch_size == 256
    rc, text, err = run(capsys, "eval", "--checkpoint", ckpt, "--bits", "8,8", "--schemes", "sym", *FAST)
    assert rc == 0, err
    assert "unfinished run (step 5 of 10)" in text and "w8a8" in text


def test_checkpoint_without_run_spec_takes_model_and_data(partial, tmp_path, capsys):
    """A checkpoint without a run spec (save_checkpoint called directly): --model and --data rebuild it, and the
    error without them says so."""
    from eqnet_plugin.train.checkpoint import _content_sha256
    ckpt = torch.load(partial / "supernet.pt", weights_only=True)
    del ckpt["extra"]["run"]                         # as save_checkpoint without a run spec writes it
    ckpt["sha256"] = _content_sha256(ckpt)
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    rc, _, err = run(capsys, "eval", "--checkpoint", old, *FAST)
    assert_one_line_error(rc, err, "old.pt", "holds no run description", "--model and --data")
    rc, text, err = run(capsys, "eval", "--checkpoint", old, "--model", "tiny_resnet", "--data", "digits",
                        "--image-size", "8", "--bits", "8,8", "--schemes", "sym", *FAST)
    assert rc == 0 and "w8a8" in text, err


def test_empty_checkpoint_in_eval_and_train_resume(tmp_path, capsys):
    """An empty file crashed with an IndexError in `eqnet eval` and when `eqnet train` resumed."""
    empty = tmp_path / "supernet.pt"
    empty.write_bytes(b"")
    rc, _, err = run(capsys, "eval", "--checkpoint", empty, *FAST)
    assert_one_line_error(rc, err, str(empty), "is empty (0 bytes)")
    rc, _, err = run(capsys, "train", *TRAIN, "--out", tmp_path)
    assert_one_line_error(rc, err, str(empty), "is empty", "--no-resume")
    assert empty.read_bytes() == b"" and os.listdir(tmp_path) == ["supernet.pt"]


def test_random_binary_checkpoint_gets_our_message(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1),
                                         dtype=torch.uint8).tolist()))
    rc, _, err = run(capsys, "eval", "--checkpoint", junk, *FAST)
    assert_one_line_error(rc, err, "junk.pt", "not an eqnet_plugin checkpoint")
    assert "weights_only" not in err


def test_flipped_bit_checkpoint_is_refused(finished, tmp_path, capsys):
    """One flipped bit in a stored scale used to give exit status 0 and a wrong accuracy."""
    import struct
    import zipfile
    with zipfile.ZipFile(finished) as z:             # the stored bytes of a tensor in the archive
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 0)
    data = bytearray(finished.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len] ^= 0x04
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    rc, _, err = run(capsys, "eval", "--checkpoint", bad, *FAST)
    assert_one_line_error(rc, err, "flipped.pt", "is corrupt")


# --- resuming ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,new,old", [("--lr", "0.01", "0.001"), ("--seed", "1", "0"),
                                          ("--batch-size", "128", "256"), ("--image-size", "12", "8"),
                                          ("--epochs", "3", "2")])
def test_resume_with_other_settings_is_refused(partial, tmp_path, capsys, flag, new, old):
    """Resuming with another --lr/--seed/--batch-size used to keep the checkpoint's values while the run spec
    recorded the new ones; another --epochs would stretch the cosine schedule mid-run."""
    ckpt = _copy_run(partial, tmp_path / "run")
    before = ckpt.read_bytes()
    rc, out, err = run(capsys, "train", *TRAIN, flag, new, "--out", ckpt.parent)
    assert_one_line_error(rc, err, "cannot resume", f"{flag} {new}", f"{flag} {old}", "new --out", "--no-resume")
    assert "resuming" not in out                       # refused before any work
    assert ckpt.read_bytes() == before and os.listdir(ckpt.parent) == ["supernet.pt"]


def test_resume_finished_run_with_more_epochs_is_refused(finished, tmp_path, capsys):
    """A finished run resumed with more --epochs used to let the cosine schedule rise again."""
    ckpt = _copy_run(finished.parent, tmp_path / "run")
    before = ckpt.read_bytes()
    rc, _, err = run(capsys, "train", *TRAIN, "--epochs", "4", "--out", ckpt.parent)
    assert_one_line_error(rc, err, "has finished", "--epochs 4", "--epochs 2", "rise again", "start a new run",
                          "new --out")
    assert ckpt.read_bytes() == before


# --- eval / search / export -------------------------------------------------------------------------------------------
def test_image_size_other_than_the_checkpoints_is_refused(finished, capsys):
    rc, _, err = run(capsys, "eval", "--checkpoint", finished, "--image-size", "32", *FAST)
    assert_one_line_error(rc, err, "--image-size 32", "trained on 8x8 images", "omit --image-size")


@pytest.mark.parametrize("argv,needle", [
    (["train", "--float-epochs", "-1"], "argument --float-epochs: -1"),
    (["train", "--max-steps", "0"], "argument --max-steps: 0"),
    (["train", "--epochs", "0"], "argument --epochs: 0"),
    (["train", "--lr", "-0.1"], "argument --lr: -0.1"),
    (["train", "--batch-size", "0"], "argument --batch-size: 0"),
    (["train", "--seed", "-3"], "argument --seed: -3"),
    (["train", "--image-size", "2"], "argument --image-size: 2"),
    (["train", "--weight-bits", "4", "9"], "argument --weight-bits: 9"),
    (["train", "--calib-batches", "x"], "argument --calib-batches: 'x' is not an integer"),
    (["demo", "--float-epochs", "-1"], "argument --float-epochs: -1"),
    (["search", "--checkpoint", "x.pt", "--records", "0"], "argument --records: 0"),
    (["search", "--checkpoint", "x.pt", "--bitops-fraction", "0"], "argument --bitops-fraction: 0"),
    (["search", "--checkpoint", "x.pt", "--population", "1"], "argument --population: 1"),
])
def test_numeric_options_are_validated(capsys, argv, needle):
    """--float-epochs -1 used to mean 0, --max-steps 0 said the checkpoint did not exist, --records 0 named `n`."""
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, needle, "give ")


def _record_line(fingerprint):
    cfg = SubnetConfig({"stem": QuantChoice(8, True, False)})
    return Record(0, cfg, 0.5, {"bitops": 1.0}, {}, fingerprint).to_json_line(0)


@pytest.mark.parametrize("fingerprint,needle", [("0" * 64, "records of another supernet"),
                                                (None, "without a supernet fingerprint")], ids=["other", "old"])
def test_search_refuses_records_of_another_supernet(finished, tmp_path, capsys, fingerprint, needle):
    """`eqnet search --out DIR` used to resume DIR/records.jsonl measured on another checkpoint without a word."""
    out = tmp_path / "search"
    out.mkdir()
    records = out / "records.jsonl"
    records.write_text(_record_line(fingerprint))
    before = records.read_bytes()
    rc, _, err = run(capsys, "search", "--checkpoint", finished, "--records", "4", "--generations", "2",
                     "--population", "6", "--out", out, *FAST)
    assert_one_line_error(rc, err, str(records), needle, "new --out", "delete")
    assert records.read_bytes() == before and os.listdir(out) == ["records.jsonl"]


def test_export_all_checks_every_target_before_writing(finished, tmp_path, capsys):
    """`--target all` with a subnet one target refuses used to write the first targets and stop."""
    out = tmp_path / "exports"
    rc, _, err = run(capsys, "export", "--checkpoint", finished, "--target", "all", "--subnet", "w2a2@asym",
                     "--out", out, *FAST)
    assert_one_line_error(rc, err, "nothing written", "target tensorrt cannot run this subnet",
                          "target qnn cannot run this subnet")
    assert "target onnx" not in err and "target brevitas" not in err
    assert not out.exists()


# --- output folders ---------------------------------------------------------------------------------------------------
def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """A read-only output folder used to fail only after the work (e.g. `eqnet demo` after float pretraining)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run(capsys, "demo", "--budget", "tiny", "--out", afile / "demo")
    assert_one_line_error(rc, err, "--out", str(afile), "is a file")
    rc, _, err = run(capsys, "train", *TRAIN, "--out", afile)
    assert_one_line_error(rc, err, "--out", "is a file")

    def denied(*a, **k):                               # what a read-only folder answers (also when run as root)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for cmd in (["demo", "--budget", "tiny"], ["train", *TRAIN]):
        rc, out, err = run(capsys, *cmd, "--out", tmp_path / "ro")
        assert_one_line_error(rc, err, "--out", str(tmp_path), "Permission denied")
        assert out == ""                               # no stage started
    assert sorted(os.listdir(tmp_path)) == ["afile"]
