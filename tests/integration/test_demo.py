"""End to end: `eqnet demo` with a reduced budget (every artifact exists and loads), the examples, the walk-through
(docs/walkthrough.md) and the README's set-up commands."""
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
from torch.utils.data import DataLoader

from eqnet_plugin.app import cli
from eqnet_plugin.app.demo import BUDGETS
from eqnet_plugin.app.pipeline import load_experiment, uniform_config
from eqnet_plugin.search import CQAP, load_records
from eqnet_plugin.quant.space import SubnetConfig
from eqnet_plugin import Supernet, prepare_qat
from eqnet_plugin.train import bn_batches_from, evaluate, evaluate_configs, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STANDARD_DOMAINS = {"", "ai.onnx", "com.microsoft"}
MIN_W8A8_ACCURACY = 0.6            # the tiny demo's W8A8 sym test accuracy (measured 0.80; chance is 0.1)


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
    exp = load_experiment(demo / "supernet.pt", bn_batches=BUDGETS["tiny"].bn_batches)   # the demo's BN batches
    assert exp.spec.model == "tiny_resnet" and exp.spec.data == "digits"
    acc = evaluate(exp.supernet, uniform_config(exp.supernet, 8, 8), exp.test_loader, exp.bn_batches)
    table = json.loads((demo / "uniform.json").read_text())
    assert set(table) == {"w8a8", "w6a6", "w4a4", "w3a3", "w2a2"}
    assert all(set(row) == {"sym", "asym", "sym-pc"} for row in table.values())
    assert table["w8a8"]["sym"] == acc                  # the table is evaluate() on the saved checkpoint
    assert acc >= MIN_W8A8_ACCURACY                     # the tiny budget learned


def test_demo_records_predictor_and_searches(demo):
    lines = (demo / "records.jsonl").read_text().splitlines()
    assert len(lines) == BUDGETS["tiny"].records
    assert all(json.loads(line)["costs"]["bitops"] > 0 for line in lines)
    records = load_records(demo / "records.jsonl")
    assert len(records) == len(lines)
    exp = load_experiment(demo / "supernet.pt", bn_batches=BUDGETS["tiny"].bn_batches)
    # the records are evaluate() on the validation split, with the demo's BN batches
    assert [r.accuracy for r in records[:2]] == [evaluate(exp.supernet, r.config, exp.val_loader, exp.bn_batches)
                                                 for r in records[:2]]
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
    assert set(summary["exports"]) == {"onnx", "tensorrt", "pytorch-quantization", "brevitas", "qnn", "openvino",
                                       "executorch"}
    assert summary["exports"]["pytorch-quantization"]["search"] == "tensorrt"
    assert (demo / summary["exports"]["pytorch-quantization"]["files"]["model"]).is_file()
    agreement = {k: e["ort_top1_agreement"] for k, e in summary["exports"].items() if "ort_top1_agreement" in e}
    assert set(agreement) == {"onnx", "tensorrt", "brevitas"}
    assert min(agreement.values()) >= 0.99, agreement   # every ONNX export computes what PyTorch computes
    assert summary["seconds"]["total"] > 0


def test_demo_tensorrt_export_agrees_like_the_others(demo):
    """A TensorRT target is in play, so the demo calibrates its supernet on the signed activation grid and the
    TensorRT file computes the trained subnet: its top-1 agreement with PyTorch in ONNX Runtime is as high as the
    other targets'."""
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["info"]["signed_activations"] is True
    agree = {t: e["ort_top1_agreement"] for t, e in summary["exports"].items() if "ort_top1_agreement" in e}
    assert set(agree) == {"onnx", "tensorrt", "brevitas"}
    others = min(v for t, v in agree.items() if t != "tensorrt")
    assert others >= 0.98, agree
    assert agree["tensorrt"] >= others - 0.02, agree


def test_demo_rejects_unknown_budget(tmp_path, capsys):
    assert cli.main(["demo", "--budget", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown budget 'huge'" in capsys.readouterr().err


# --- examples -----------------------------------------------------------------------------------------------------
def test_export_all_targets_example(tmp_path):
    rows = _example("export_all_targets").main(["--out", str(tmp_path), "--threads", "1"])
    targets = {r["target"] for r in rows}
    assert {"onnxruntime", "tensorrt", "pytorch-quantization", "brevitas QCDQ", "brevitas QONNX",
            "qnn encodings 1.0.0"} <= targets
    in_memory = {r["target"] for r in rows if r["file"] == "(in memory)"}
    assert in_memory == {"pytorch-quantization", "brevitas (modules)"}
    assert all(os.path.isfile(r["file"]) for r in rows if r["target"] not in in_memory)
    onnx_runtime_checked = {r["target"]: r["top1"] for r in rows if "top1" in r}
    assert set(onnx_runtime_checked) == {"onnxruntime", "tensorrt", "brevitas QCDQ"}
    assert min(onnx_runtime_checked.values()) >= 0.9, onnx_runtime_checked
    assert next(r for r in rows if r["target"] == "brevitas (modules)")["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_imagenet_example_smoke(tmp_path):
    example = _example("imagenet_resnet18")
    argv = ["--smoke", "--out", str(tmp_path), "--threads", "1"]
    result = example.main(argv)
    assert result["steps"] == 3
    ckpt = torch.load(tmp_path / "supernet.pt", weights_only=True)
    assert ckpt["step"] == 3
    # the reported accuracies are those of the checkpoint it wrote, measured as the example documents
    args = example.parse_args(argv)
    train_set, val_set, classes = example.datasets(args)
    sn = Supernet(prepare_qat(example.build_model(args, classes), (train_set[0][0][None],)))
    load_checkpoint(tmp_path / "supernet.pt", sn, restore_rng=False)
    configs = {"w8a8": sn.uniform(8, 8), "w4a4": sn.uniform(4, 4), "w4a4 asym": sn.uniform(4, 4, symmetric=False),
               "w8a8 sym per-channel (TensorRT)": sn.uniform(8, 8, per_channel=True)}
    bn = bn_batches_from(train_set, args.bn_batches, args.batch_size, seed=args.seed + 1)
    assert result["accuracy"] == evaluate_configs(sn, configs, DataLoader(val_set, args.batch_size), bn,
                                                  max_batches=args.eval_batches)


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


# --- README and the walk-through ----------------------------------------------------------------------------------
def test_walkthrough_python_blocks_run_in_order(tmp_path, monkeypatch):
    """docs/walkthrough.md's worked examples (every ```python block, in order) run as one script."""
    text = (ROOT / "docs" / "walkthrough.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            exec(compile("\n".join(blocks), "docs/walkthrough.md", "exec"), {"__name__": "walkthrough"})
    finally:
        torch.set_num_threads(threads)
    for f in ("records.jsonl", "search.json", "pareto.png", "onnxruntime/model.onnx", "tensorrt/model.onnx",
              "brevitas/model_qcdq.onnx", "brevitas/model_qonnx.onnx", "qnn/model.onnx", "qnn/model.encodings"):
        assert (tmp_path / "runs" / "walkthrough" / f).is_file(), f


def test_readme_starts_with_the_two_commands_ci_runs():
    """A title, then one fenced shell block with the two set-up commands."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2] == "```shell"
    assert lines[3] == 'pip install -e ".[all]" && eqnet demo'
    assert lines[4] == 'pip install -e ".[dev]" && python -m pytest -q'
    assert lines[5] == "```"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest -q" in ci


def test_readme_is_short_and_its_drop_in_diff_is_the_examples():
    """README under 150 lines; every line of its ```diff block is in examples/drop_in_qat.py: added and context
    lines as code, removed lines as the example's commented-out originals."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    (diff,) = re.findall(r"```diff\n(.*?)```", text, flags=re.S)
    example = (ROOT / "examples" / "drop_in_qat.py").read_text()
    code = [line.split("#")[0].strip() for line in example.splitlines()]
    for line in diff.splitlines():
        sign, body = line[:1], line[1:].strip()
        if sign == "-":
            assert "# " + body in example, line
        else:
            assert sign in "+ " and any(body in c for c in code if c), line


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings (lower case, punctuation dropped, spaces as hyphens)."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_docs_links_resolve():
    """Every relative link in README.md and docs/*.md names a file of the repository (nothing outside it), every
    #anchor one of that page's headings, and every path they cite in backticks (`tests/...`, `eqnet_plugin/...`)
    exists."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve() if target else page
            assert path.exists() and ROOT in path.parents, f"{page.name}: {target}"
            if anchor:
                assert anchor in _anchors(path), f"{page.name}: {target}#{anchor}"
        for cited in re.findall(r"`((?:tests|benchmarks|examples|adapters|eqnet_plugin)/[\w./-]*)", page.read_text()):
            assert (ROOT / cited).exists(), f"{page.name} cites {cited}, which does not exist"


def test_bad_inputs_page_names_existing_tests():
    """Every test that docs/bad_inputs.md names (`tests/<lane>/test_x.py::test_y`, or `::test_y` after it) exists."""
    named = 0
    for row in (ROOT / "docs" / "bad_inputs.md").read_text().splitlines():
        current = None
        for token in re.findall(r"`([^`]*)`", row.rstrip("|").split("|")[-1]) if row.startswith("|") else []:
            if token.startswith("tests/"):
                current, _, func = token.partition("::")
                assert (ROOT / current).is_file(), token
            elif token.startswith("::") and current:
                func = token[2:]
            else:
                continue
            named += 1
            assert not func or f"def {func}(" in (ROOT / current).read_text(), f"{current}::{func}"
    assert named >= 20
