"""End to end: `eqnet demo` with a reduced budget (every artifact exists and loads), the examples, and the README's
set-up commands."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eqnet_plugin.app import cli
from eqnet_plugin.app.demo import BUDGETS
from eqnet_plugin.app.pipeline import load_experiment, uniform_config
from eqnet_plugin.search import CQAP, load_records
from eqnet_plugin.quant.space import SubnetConfig
from eqnet_plugin.train import evaluate

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STANDARD_DOMAINS = {"", "ai.onnx", "com.microsoft"}


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_onnx(path: Path, x: torch.Tensor) -> bool:
    """onnx.checker passes; a model of standard ops runs in ONNX Runtime with finite outputs. Returns whether it ran."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    if {n.domain for n in model.graph.node} - STANDARD_DOMAINS:
        return False                                   # QONNX `Quant` nodes: for FINN/QONNX tools, not ORT
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == (x.shape[0], 10)
    assert torch.isfinite(torch.from_numpy(out)).all()
    return True


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--budget", "tiny", "--out", str(out), "--threads", "1", "--no-progress"])
    assert rc == 0
    return out


def test_demo_checkpoint_loads_and_evaluates(demo):
    exp = load_experiment(demo / "supernet.pt")
    assert exp.spec.model == "tiny_resnet" and exp.spec.data == "digits"
    acc = evaluate(exp.supernet, uniform_config(exp.supernet, 8, 8), exp.test_loader, exp.bn_batches)
    assert 0.0 <= acc <= 1.0
    table = json.loads((demo / "uniform.json").read_text())
    assert set(table) == {"w8a8", "w6a6", "w4a4", "w3a3", "w2a2"}
    assert all(set(row) == {"sym", "asym", "sym-pc"} for row in table.values())


def test_demo_records_predictor_and_searches(demo):
    lines = (demo / "records.jsonl").read_text().splitlines()
    assert len(lines) == BUDGETS["tiny"].records
    for line in lines:
        rec = json.loads(line)
        assert 0.0 <= rec["accuracy"] <= 1.0 and rec["costs"]["bitops"] > 0
    assert len(load_records(demo / "records.jsonl")) == len(lines)
    assert CQAP.load(demo / "search" / "brevitas" / "cqap.pt").fitted
    assert (demo / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    for profile in ("brevitas", "tensorrt", "qnn"):
        folder = demo / "search" / profile
        assert (folder / "pareto.png").read_bytes()[:8] == PNG_MAGIC
        result = json.loads((folder / "search.json").read_text())
        assert result["profile"] == profile
        assert result["best"]["costs"]["bitops"] <= result["constraints"]["max_bitops"]
        best = SubnetConfig.from_json(folder / "best.json")
        assert best == SubnetConfig.from_dict(result["best"]["config"])


def test_demo_exports_load_and_run(demo):
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ran = []
    for target in ("onnx", "tensorrt", "brevitas", "qnn"):
        folder = demo / "exports" / target
        assert SubnetConfig.from_json(folder / "subnet.json")
        files = sorted(folder.glob("*.onnx"))
        assert files, target
        ran += [f"{target}/{f.name}" for f in files if _check_onnx(f, x)]
    assert {"onnx/model.onnx", "tensorrt/model.onnx", "brevitas/model_qcdq.onnx", "qnn/model.onnx"} <= set(ran)

    import onnx
    from eqnet_plugin.adapters.tensorrt import check_tensorrt_onnx
    assert check_tensorrt_onnx(str(demo / "exports" / "tensorrt" / "model.onnx")) == []
    enc = json.loads((demo / "exports" / "qnn" / "model.encodings").read_text())
    model = onnx.load(str(demo / "exports" / "qnn" / "model.onnx"))
    names = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output} \
        | {i.name for i in model.graph.input}
    entries = enc["activation_encodings"] + enc["param_encodings"]
    assert entries and all(e["name"] in names for e in entries)


def test_demo_report_links_plot_and_files(demo):
    report = (demo / "report.md").read_text()
    assert "![Pareto front](search/brevitas/pareto.png)" in report
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert len(links) >= 8
    for link in links:
        assert (demo / link).is_file(), link
    summary = json.loads((demo / "summary.json").read_text())
    # every registered target (adapters/targets.py)
    assert set(summary["exports"]) == {"onnx", "tensorrt", "pytorch-quantization", "brevitas", "qnn"}
    assert summary["exports"]["pytorch-quantization"]["search"] == "tensorrt"
    assert (demo / summary["exports"]["pytorch-quantization"]["files"]["model"]).is_file()
    assert summary["seconds"]["total"] > 0


def test_demo_rejects_unknown_budget(tmp_path, capsys):
    assert cli.main(["demo", "--budget", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown budget 'huge'" in capsys.readouterr().err


# --- examples -----------------------------------------------------------------------------------------------------
def test_export_all_targets_example(tmp_path):
    rows = _example("export_all_targets").main(["--out", str(tmp_path), "--threads", "1"])
    targets = {r["target"] for r in rows}
    assert {"onnxruntime", "tensorrt", "pytorch-quantization", "brevitas QCDQ", "brevitas QONNX",
            "qnn encodings 1.0.0"} <= targets
    for r in rows:
        if r["file"] != "(in memory)":
            assert os.path.isfile(r["file"]), r
        if "top1" in r:
            assert r["top1"] >= 0.9, r
    assert next(r for r in rows if r["target"] == "brevitas (modules)")["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_imagenet_example_smoke(tmp_path):
    result = _example("imagenet_resnet18").main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    assert result["steps"] == 3
    assert len(result["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    ckpt = torch.load(tmp_path / "supernet.pt", weights_only=True)
    assert ckpt["step"] == 3


@pytest.mark.slow
def test_imagenet_example_under_torchrun(tmp_path):
    """Two CPU ranks (gloo) through torchrun: the script's DDP path runs and rank 0 writes the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "imagenet_resnet18.py"), "--smoke", "--arch", "tiny_resnet", "--threads", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "w8a8" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert torch.load(tmp_path / "supernet.pt", weights_only=True)["step"] == 3


# --- README -------------------------------------------------------------------------------------------------------
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """The README's worked examples (every ```python block, in order) run as one script."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            exec(compile("\n".join(blocks), "README.md", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    for f in ("records.jsonl", "search.json", "pareto.png", "onnxruntime/model.onnx", "tensorrt/model.onnx",
              "brevitas/model_qcdq.onnx", "brevitas/model_qonnx.onnx", "qnn/model.onnx", "qnn/model.encodings"):
        assert (tmp_path / "runs" / "readme" / f).is_file(), f


def test_readme_starts_with_the_two_commands_ci_runs():
    """A title, then one fenced shell block with the two set-up commands."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2] == "```shell"
    assert lines[3] == 'pip install -e ".[all]" && eqnet demo'
    assert lines[4] == 'pip install -e ".[dev]" && python -m pytest -q'
    assert lines[5] == "```"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest -q" in ci
