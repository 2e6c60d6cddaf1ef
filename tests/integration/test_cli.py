"""The `eqnet` command line: option files, one-line errors with exit status 2 for bad input, and the happy paths of
eval / search / export on a small trained checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eqnet_plugin.app import cli
from eqnet_plugin.app.pipeline import (BuildSettings, RunSpec, activations_signed, build_experiment, build_model,
                                       load_experiment, parse_subnet, read_run_spec, uniform_config)
from eqnet_plugin.train import evaluate

from _cli import FAST, assert_one_line_error, run

MIN_FLOAT_ACCURACY = 0.5            # `checkpoint`'s float model, one epoch on 8x8 digits (measured 0.78; chance 0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A supernet trained for 3 steps by `eqnet train` (space 2/4/8 bits, 8x8 digits)."""
    out = tmp_path_factory.mktemp("train")
    rc = cli.main(["train", "--float-epochs", "1", "--epochs", "1", "--max-steps", "3", "--image-size", "8",
                   "--weight-bits", "2", "4", "8", "--act-bits", "2", "4", "8", "--out", str(out), *FAST])
    assert rc == 0
    return out / "supernet.pt"


# --- happy paths --------------------------------------------------------------------------------------------------
def test_train_writes_checkpoint_with_run_spec(checkpoint):
    spec, info = read_run_spec(checkpoint)
    assert spec.model == "tiny_resnet" and spec.image_size == 8
    assert spec.space.weight_bits == (2, 4, 8)
    assert info["float_test_accuracy"] >= MIN_FLOAT_ACCURACY      # one float epoch learned


def test_eval_table_and_subnets(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, text, _ = run(capsys, "eval", "--checkpoint", str(checkpoint), "--bits", "8,8", "2,2", "--schemes", "sym",
                      "asym", "--out", str(out), *FAST)
    assert rc == 0
    assert "w8a8" in text and "w2a2" in text and "asym" in text
    table = json.loads(out.read_text())
    assert set(table) == {"w8a8", "w2a2"}
    assert all(set(row) == {"sym", "asym"} for row in table.values())
    exp = load_experiment(checkpoint)                   # the table is evaluate() on the checkpoint, test split
    assert [table["w8a8"]["sym"], table["w2a2"]["sym"]] == [
        evaluate(exp.supernet, uniform_config(exp.supernet, w, a), exp.test_loader, exp.bn_batches)
        for w, a in ((8, 8), (2, 2))]
    rc, text, _ = run(capsys, "eval", "--checkpoint", str(checkpoint), "--subnet", "w4a8@sym-pc", *FAST)
    assert rc == 0 and "w4a8@sym-pc" in text and "BitOps" in text


def test_search_then_export_best(checkpoint, tmp_path, capsys):
    out = tmp_path / "search"
    rc, text, _ = run(capsys, "search", "--checkpoint", str(checkpoint), "--records", "8", "--generations", "3",
                      "--population", "10", "--cqap-epochs", "5", "--bitops-fraction", "0.5", "--out", str(out),
                      *FAST)
    assert rc == 0, text
    assert "measured accuracy" in text
    for name in ("search.json", "best.json", "pareto.png", "records.jsonl", "cqap.pt"):
        assert (out / name).is_file(), name
    result = json.loads((out / "search.json").read_text())
    assert result["best"]["costs"]["bitops"] <= result["constraints"]["max_bitops"]
    rc, text, _ = run(capsys, "export", "--checkpoint", str(checkpoint), "--subnet", str(out / "search.json"),
                      "--target", "onnx", "--out", str(tmp_path / "exp"), *FAST)
    assert rc == 0, text
    assert (tmp_path / "exp" / "model.onnx").is_file()
    assert "ORT top-1 agreement" in text


def test_export_after_finetune_leaves_checkpoint_unchanged(checkpoint, tmp_path, capsys):
    before = checkpoint.read_bytes()
    rc, text, _ = run(capsys, "export", "--checkpoint", str(checkpoint), "--subnet", "w4a4@sym-pc", "--target",
                      "onnx", "--finetune-steps", "3", "--finetune-lr", "3e-4", "--out", str(tmp_path / "exp"), *FAST)
    assert rc == 0, text
    assert "after 3 steps" in text and "w4a4@sym-pc" in text
    assert "ORT top-1 agreement" in text                 # the fine-tuned subnet's export runs in ONNX Runtime
    assert (tmp_path / "exp" / "model.onnx").is_file()
    report = json.loads((tmp_path / "exp" / "report.json").read_text())     # the export report, printed as a table
    assert "export report" in text and "latency vs float" in text
    assert report["agreement"]["top1"] >= 0.99 and "4" in report["weights"]["used_bits"]
    assert checkpoint.read_bytes() == before


def test_finetune_subnet_trains_a_copy(checkpoint):
    from eqnet_plugin.app.pipeline import finetune_subnet
    exp = load_experiment(checkpoint, bn_batches=1)
    sn = exp.supernet
    cfg = parse_subnet("w2a2", sn)
    weights = {k: v.clone() for k, v in sn.model.state_dict().items()}
    tuned = finetune_subnet(exp, cfg, 2, lr=1e-2)
    assert tuned.supernet is not sn and tuned.info["finetuned"]["steps"] == 2
    assert all(torch.equal(v, sn.model.state_dict()[k]) for k, v in weights.items())      # the original is untouched
    assert any(not torch.equal(v, tuned.supernet.model.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="steps >= 1"):
        finetune_subnet(exp, cfg, 0)


def test_config_file_values_and_flags_win(tmp_path):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("model: tiny_mobilenet_v2\nepochs: 3\nprogress: false\nweight-bits: [4, 8]\n")
    parser = cli.build_parser()
    args = parser.parse_args(cli.expand_config(parser, ["train", "--config", str(cfg), "--epochs", "5"]))
    assert (args.model, args.epochs, args.progress, args.weight_bits) == ("tiny_mobilenet_v2", 5, False, [4, 8])
    js = tmp_path / "opts.json"
    js.write_text(json.dumps({"float_epochs": 0, "out": "x"}))
    args = parser.parse_args(cli.expand_config(parser, ["train", f"--config={js}"]))
    assert (args.float_epochs, args.out) == (0, "x")


def test_parse_subnet_forms(checkpoint, tmp_path):
    spec, _ = read_run_spec(checkpoint)
    exp = build_experiment(spec, BuildSettings(calibrate=False, bn_batches=1))
    sn = exp.supernet
    cfg = parse_subnet("W4A8@sym-pc", sn)
    assert {c.bits for g, c in cfg.groups.items() if g not in sn.fixed_groups and sn.groups[g].is_weight} == {4}
    assert all(c.symmetric for c in cfg.groups.values())
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert parse_subnet(str(path), sn) == cfg


def test_model_by_callable_and_torchvision_name():
    m = build_model("eqnet_plugin.app.models:TinyMobileNetV2", num_classes=7, in_channels=1)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    with pytest.raises(ValueError, match="cannot import module"):
        build_model("no_such_package_xyz.models:net", 10, 1)
    with pytest.raises(ValueError, match="has no callable"):
        build_model("eqnet_plugin.app.models:NoSuchNet", 10, 1)


def test_image_folder_data(tmp_path):
    """A local ImageFolder tree is recognized as such (RGB, its own classes)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog", "fox"):
        (tmp_path / c).mkdir()
        for i in range(10):
            px = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / c / f"{i}.png")
    exp = build_experiment(RunSpec(data=str(tmp_path), image_size=8, batch_size=4),
                           BuildSettings(calibrate=False, bn_batches=1))
    assert exp.splits.num_classes == 3 and exp.splits.classes == ("cat", "dog", "fox")
    assert exp.example_inputs[0].shape == (1, 3, 8, 8)
    assert len(exp.splits.train) + len(exp.splits.val) + len(exp.splits.test) == 30


def test_train_resumes_from_existing_checkpoint(checkpoint, tmp_path, capsys):
    """Resuming with the run's own settings continues it (a finished run: nothing to do) and keeps the float model's
    numbers; a longer schedule (--max-steps 4 after a 3-step run) is refused before any work."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "supernet.pt").write_bytes(checkpoint.read_bytes())
    opts = ["--epochs", "1", "--image-size", "8", "--weight-bits", "2", "4", "8", "--act-bits", "2", "4", "8",
            "--out", str(out), *FAST]
    rc, text, _ = run(capsys, "train", "--max-steps", "3", *opts)
    assert rc == 0 and "resuming from" in text and "3 steps" in text
    assert torch.load(out / "supernet.pt", weights_only=True)["step"] == 3
    assert read_run_spec(out / "supernet.pt")[1]["float_test_accuracy"] == read_run_spec(checkpoint)[1][
        "float_test_accuracy"]
    before = (out / "supernet.pt").read_bytes()
    rc, _, err = run(capsys, "train", "--max-steps", "4", *opts)
    assert_one_line_error(rc, err, "--max-steps 4", "--max-steps 3", "rise again", "new --out")
    assert (out / "supernet.pt").read_bytes() == before


def test_train_signed_activations_for_tensorrt(checkpoint, tmp_path, capsys):
    """--signed-activations: stored in the checkpoint's quantizers, the TensorRT export (exact by default) accepts
    the subnet and refuses the same subnet of a supernet calibrated without it; resuming a checkpoint calibrated
    without it is refused before training."""
    assert read_run_spec(checkpoint)[1]["signed_activations"] is False
    out = tmp_path / "signed"
    rc, text, _ = run(capsys, "train", "--signed-activations", "--float-epochs", "0", "--epochs", "1", "--max-steps",
                      "2", "--calib-batches", "2", "--image-size", "8", "--weight-bits", "4", "8", "--act-bits", "4",
                      "8", "--out", str(out), *FAST)
    assert rc == 0 and "signed activations (TensorRT-exact)" in text, text
    ckpt = out / "supernet.pt"
    assert read_run_spec(ckpt)[1]["signed_activations"] is True
    assert activations_signed(load_experiment(ckpt, bn_batches=1).supernet)
    rc, text, _ = run(capsys, "export", "--checkpoint", str(ckpt), "--target", "tensorrt", "--subnet", "w8a8@sym-pc",
                      "--no-check", "--out", str(tmp_path / "trt"), *FAST)
    assert rc == 0, text
    assert list((tmp_path / "trt").glob("*.onnx"))
    rc, _, err = run(capsys, "export", "--checkpoint", str(checkpoint), "--target", "tensorrt", "--subnet",
                     "w8a8@sym-pc", "--no-check", "--out", str(tmp_path / "trt_unsigned"), *FAST)
    assert_one_line_error(rc, err, "target tensorrt cannot run this subnet", "unsigned-activation",
                          "--signed-activations")
    assert not (tmp_path / "trt_unsigned").exists()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "supernet.pt").write_bytes(checkpoint.read_bytes())
    rc, _, err = run(capsys, "train", "--signed-activations", "--epochs", "1", "--max-steps", "4", "--image-size", "8",
                     "--weight-bits", "2", "4", "8", "--act-bits", "2", "4", "8", "--out", str(resumed), *FAST)
    assert_one_line_error(rc, err, "calibrated without --signed-activations", "--no-resume")
    assert (resumed / "supernet.pt").read_bytes() == checkpoint.read_bytes()


@pytest.mark.slow
def test_torchvision_model_on_one_channel_digits():
    """torchvision models take RGB: 1-channel digits are repeated to 3 channels."""
    exp = build_experiment(RunSpec(model="mobilenet_v2", image_size=16), BuildSettings(calibrate=False, bn_batches=1))
    assert exp.splits.in_channels == 3 and exp.example_inputs[0].shape == (1, 3, 16, 16)
    exp.supernet.model.eval()
    with exp.supernet.activate(exp.supernet.uniform(8, 8)), pytest.warns(UserWarning, match="not calibrated"):
        assert exp.supernet.model(exp.example_inputs[0]).shape == (1, 10)


# --- bad input: exit status 2 and one line ------------------------------------------------------------------------
def test_unknown_model(tmp_path, capsys):
    rc, _, err = run(capsys, "train", "--model", "resnet_nonexistent", "--out", str(tmp_path), *FAST)
    assert_one_line_error(rc, err, "eqnet train: error:", "unknown model 'resnet_nonexistent'", "resnet18")
    assert not (tmp_path / "supernet.pt").exists()


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    rc, _, err = run(capsys, "train", "--data", str(missing), "--out", str(tmp_path), *FAST)
    assert_one_line_error(rc, err, "does not exist", str(missing))


def test_missing_checkpoint(tmp_path, capsys):
    rc, _, err = run(capsys, "eval", "--checkpoint", str(tmp_path / "nope.pt"), *FAST)
    assert_one_line_error(rc, err, "eqnet eval: error:", "nope.pt", "does not exist")


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc, _, err = run(capsys, "export", "--checkpoint", str(bad), "--target", "onnx", *FAST)
    assert_one_line_error(rc, err, "bad.pt")


def test_missing_config_file(tmp_path, capsys):
    rc, _, err = run(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert_one_line_error(rc, err, "config file", "does not exist")


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    rc, _, err = run(capsys, "train", "--config", str(cfg))
    assert_one_line_error(rc, err, "unknown option 'epochz'", "epochs")


def test_unknown_option_and_command(capsys):
    rc, _, err = run(capsys, "train", "--epochz", "3")
    assert_one_line_error(rc, err, "unrecognized arguments: --epochz")
    rc, _, err = run(capsys, "frobnicate")
    assert_one_line_error(rc, err, "invalid choice")


def test_impossible_constraint(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    rc, _, err = run(capsys, "search", "--checkpoint", str(checkpoint), "--max-bitops", "1", "--out", str(out),
                     *FAST)
    assert_one_line_error(rc, err, "eqnet search: error:", "infeasible")
    assert not (out / "records.jsonl").exists()          # failed before measuring anything


def test_target_cannot_run_subnet(checkpoint, tmp_path, capsys):
    rc, _, err = run(capsys, "export", "--checkpoint", str(checkpoint), "--target", "qnn", "--subnet", "w2a2@asym",
                     "--out", str(tmp_path), *FAST)
    assert_one_line_error(rc, err, "target qnn cannot run this subnet")
    assert not list(tmp_path.rglob("*.encodings"))


def test_tensorrt_refuses_asymmetric_subnet(checkpoint, tmp_path, capsys):
    rc, _, err = run(capsys, "export", "--checkpoint", str(checkpoint), "--target", "tensorrt", "--subnet",
                     "w8a8@asym", "--out", str(tmp_path), *FAST)
    assert_one_line_error(rc, err, "target tensorrt cannot run this subnet")
    assert not list(tmp_path.rglob("*.onnx"))


def test_bad_subnet_spec(checkpoint, capsys):
    rc, _, err = run(capsys, "eval", "--checkpoint", str(checkpoint), "--subnet", "w9a1", *FAST)
    assert_one_line_error(rc, err, "w9a1", "bits must be in 2..8", "weight bits 2, 4, 8", "activation bits 2, 4, 8")
    rc, _, err = run(capsys, "eval", "--checkpoint", str(checkpoint), "--subnet", "x9", *FAST)
    assert_one_line_error(rc, err, "x9", "w<bits>a<bits>")
    rc, _, err = run(capsys, "eval", "--checkpoint", str(checkpoint), "--subnet", "w3a3", *FAST)
    assert_one_line_error(rc, err, "outside the space")


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--debug"])


def test_installed_console_script_runs(capsys):
    script = Path(sys.executable).parent / "eqnet"
    assert script.is_file(), "pip install -e . creates the eqnet console script next to the interpreter"
    proc = subprocess.run([str(script), "demo", "--budget", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown budget 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("eqnet ")


def test_console_script_declared():
    import configparser
    cp = configparser.ConfigParser()
    cp.read(os.path.join(os.path.dirname(__file__), "..", "..", "setup.cfg"))
    assert "eqnet = eqnet_plugin.app.cli:main" in cp["options.entry_points"]["console_scripts"]
