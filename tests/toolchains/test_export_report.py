"""The export report (adapters/report.py): sizes on disk, stored vs used weight bits, agreement with the subnet and
the `Runtime` hook of a `Target`. Latency is measured here only to check its keys (benchmarks time it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eqnet_plugin import freeze
from eqnet_plugin.adapters import Target, UnsignedActivations, get_target, register_target, unregister_target
from eqnet_plugin.adapters.report import REPORT_HEADERS, ReportConfig, Runtime, report_row

from _tiny import tiny_data

FAST = dict(latency_rounds=1, latency_runs=2)


@pytest.fixture(scope="module")
def sn(tiny_digits_supernet):
    return tiny_digits_supernet()


@pytest.fixture(scope="module")
def x():
    return tiny_data()[0].tensors[0][:32]


def _export(target, frozen, x, folder, **opts) -> tuple[dict, dict]:
    files = get_target(target).export(frozen, x[:1], folder, report=ReportConfig(inputs=x, **FAST), **opts)
    return files, json.loads(Path(files["report"]).read_text())


def test_onnx_report_sizes_bits_agreement(sn, x, tmp_path):
    reports = {}
    for bits in (8, 4):
        files, r = _export("onnx", freeze(sn, sn.uniform(bits, bits)), x, tmp_path / f"w{bits}")
        assert r["target"] == "onnx" and r["files"]["onnx"]["bytes"] == os.path.getsize(files["onnx"])
        assert r["total_bytes"] == sum(f["bytes"] for f in r["files"].values())
        w = r["weights"]
        assert sum(w["used_bits"].values()) == w["elements"] == sum(w["stored"].values())
        a = r["agreement"]
        assert a["inputs"] == len(x) and a["top1"] == 1.0 and a["max_lsb"] <= 1.001 and a["within_1lsb"] == 1.0
        assert set(r["latency"]) == {"runtime", "threads", "ms", "float_ms", "ratio", "samples"}
        assert r["latency"]["runtime"] == "ONNX Runtime"
        reports[bits] = r
    w8, w4 = reports[8]["weights"], reports[4]["weights"]
    assert w8["note"] is None and w8["used_bytes"] == w8["stored_bytes"]
    assert "4" in w4["used_bits"] and w4["used_bytes"] < w8["used_bytes"]
    if w4["stored_bytes"] >= w8["stored_bytes"]:          # 4-bit weights in an 8-bit container: said plainly
        assert "fewer bits do not make this file smaller" in w4["note"]
    row = report_row(reports[4])
    assert len(row) == len(REPORT_HEADERS) and row[0] == "onnx"


def test_tensorrt_report_says_there_is_no_runtime_and_no_saving(sn, x, tmp_path):
    frozen = freeze(sn, sn.uniform(8, 8, per_channel=True))
    _, r = _export("tensorrt", frozen, x, tmp_path, unsigned_activations=UnsignedActivations.RESCALE)
    assert r["agreement"] is None and r["latency"] is None
    assert any("TensorRT has no runtime here" in n for n in r["notes"])
    assert "INT8" in r["weights"]["note"] and r["weights"]["stored"] == {"INT8": r["weights"]["elements"]}


def test_pytorch_quantization_report_reads_the_saved_module(sn, x, tmp_path):
    _, r = _export("pytorch-quantization", freeze(sn, sn.uniform(8, 8, per_channel=True)), x, tmp_path)
    assert r["weights"]["stored"] == {"FLOAT32": r["weights"]["elements"]}
    assert r["agreement"]["top1"] == 1.0 and r["agreement"]["max_lsb"] <= 1.001
    assert r["latency"] is None                      # no float baseline for this runtime


def _toy(runtime: Runtime | None) -> Target:
    def write(frozen, example_inputs, folder, options):
        torch.save(frozen.graph, folder / "model.pt")
        return {"model": folder / "model.pt"}
    return Target("toy-report", "a toy target with a runtime", profile="brevitas", write=write, runtime=runtime)


def test_a_target_plugs_in_its_runtime(sn, x, tmp_path):
    loaded = []

    def load(files, threads):
        loaded.append(sorted(files))
        model = torch.load(files["model"], weights_only=False)
        return lambda a: model(torch.from_numpy(a)).detach().numpy()

    def off_by_two_lsb(files, threads):
        run = load(files, threads)
        return lambda a: run(a) + 2.0 * np.float32(frozen.qparams[out_group].scale)

    frozen = freeze(sn, sn.uniform(8, 8))
    out_group = sn.act_groups[-1]
    try:
        register_target(_toy(Runtime("torch", load, write_float=lambda f, ex, folder: {})))
        _, r = _export("toy-report", frozen, x, tmp_path / "a")
        assert loaded and loaded[0] == ["model"]
        assert r["agreement"]["max_lsb"] == 0.0 and r["agreement"]["top1"] == 1.0
        register_target(_toy(Runtime("shifted", off_by_two_lsb)), replace=True)
        _, r = _export("toy-report", frozen, x, tmp_path / "b")
        assert r["agreement"]["max_lsb"] == pytest.approx(2.0, abs=1e-3) and r["agreement"]["within_1lsb"] == 0.0
        register_target(_toy(Runtime("absent", load, requires=("no_such_runtime_xyz",))), replace=True)
        _, r = _export("toy-report", frozen, x, tmp_path / "c")
        assert r["agreement"] is None and any("no_such_runtime_xyz" in n for n in r["notes"])
        files = get_target("toy-report").export(frozen, x[:1], tmp_path / "d", report=None)
        assert list(files) == ["model"] and not (tmp_path / "d" / "report.json").exists()
    finally:
        unregister_target("toy-report")


@pytest.mark.parametrize("bad", [dict(inputs=torch.zeros(0, 1)), dict(latency_rounds=-1), dict(threads=0),
                                 dict(latency_runs=True)])
def test_report_config_is_validated(bad):
    with pytest.raises(ValueError, match="ReportConfig"):
        ReportConfig(**bad)
