"""The export-target registry and the layering of the adapters."""
from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest
import torch

import eqnet_plugin
import eqnet_plugin.adapters
import eqnet_plugin.export.ir
from eqnet_plugin import freeze
from eqnet_plugin.adapters import (Target, TargetError, UnsignedActivations, get_target, register_target, target_names,
                                   unregister_target)
from eqnet_plugin.export.ir import FrozenSubnet

from _tiny import tiny_data

ADAPTERS = Path(eqnet_plugin.adapters.__file__).parent
ALLOWED = {"eqnet_plugin.export.ir", "eqnet_plugin.quant.space", "eqnet_plugin.files"}


@pytest.fixture(scope="module")
def sn(tiny_digits_supernet):
    return tiny_digits_supernet()


@pytest.fixture(scope="module")
def x():
    return tiny_data()[0].tensors[0][:4]


def _eqnet_imports(path: Path) -> set[str]:
    """Every eqnet_plugin module a source file imports (absolute, or relative resolved against the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:                    # from .x import: inside eqnet_plugin.adapters
                mod = "eqnet_plugin.adapters" + ("." + mod if mod else "")
            elif node.level == 2:
                mod = "eqnet_plugin" + ("." + mod if mod else "")
            if mod.startswith("eqnet_plugin"):
                out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("eqnet_plugin")}
    return out


@pytest.mark.parametrize("path", sorted(ADAPTERS.glob("*.py")), ids=lambda p: p.name)
def test_adapters_import_only_the_ir(path):
    bad = {m for m in _eqnet_imports(path) if not m.startswith("eqnet_plugin.adapters") and m not in ALLOWED}
    assert not bad, f"{path.name} imports {bad}; adapters may import only {sorted(ALLOWED)}"


def test_the_layering_check_sees_a_violation(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from eqnet_plugin.supernet import Supernet\nfrom ..freeze import freeze\nfrom .ir import x\n")
    assert _eqnet_imports(f) == {"eqnet_plugin.supernet", "eqnet_plugin.freeze", "eqnet_plugin.adapters.ir"}


def test_freeze_reads_no_private_attribute_of_the_quantizers():
    src = "".join(Path(importlib.import_module(m).__file__).read_text()
                  for m in ("eqnet_plugin.export.freeze", "eqnet_plugin.export.ir"))
    private = {n.attr for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")
               and isinstance(n.value, ast.Name) and n.value.id in ("fq", "mod", "m", "supernet")}
    assert not private, private


def test_builtin_targets_are_registered_with_profiles():
    names = target_names()
    assert {"onnx", "tensorrt", "pytorch-quantization", "brevitas", "qnn"} <= set(names)
    from eqnet_plugin.search.profiles import PROFILES
    assert all(get_target(n).profile in PROFILES for n in names)
    with pytest.raises(ValueError, match="unknown target 'nope'; choose one of onnx"):
        get_target("nope")


def test_every_builtin_target_lists_rules_without_writing(sn, tmp_path):
    asym = freeze(sn, sn.uniform(4, 4, symmetric=False))
    trt = get_target("tensorrt").check(asym, unsigned_activations=UnsignedActivations.REFUSE)
    assert any("zero-point" in p for p in trt) and any("activation-bits" in p for p in trt)
    assert any("symmetric" in p for p in get_target("pytorch-quantization").check(asym))
    assert get_target("onnx").check(asym) == []
    with pytest.raises(TypeError, match="no option"):
        get_target("onnx").check(asym, encoding_version="1.0.0")
    with pytest.raises(TargetError) as err:
        get_target("tensorrt").export(asym, torch.zeros(1, 1, 8, 8), tmp_path / "trt",
                                      unsigned_activations=UnsignedActivations.REFUSE)
    assert len(err.value.problems) == len(trt)
    assert not (tmp_path / "trt").exists() or not any((tmp_path / "trt").iterdir())


def test_targets_take_a_supernet_with_cfg(sn, x, tmp_path):
    cfg = sn.uniform(8, 8)
    files = get_target("onnx").export(sn, x[:1], tmp_path, cfg=cfg)
    assert list(files) == ["onnx", "report"] and os.path.getsize(files["onnx"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json"]   # no staging folder left


def test_pytorch_quantization_target_writes_a_loadable_model(sn, x, tmp_path):
    cfg = sn.uniform(8, 8, per_channel=True)
    frozen = freeze(sn, cfg)
    files = get_target("pytorch-quantization").export(frozen, x[:1], tmp_path)
    model = torch.load(files["model"], weights_only=False)
    with torch.no_grad():
        assert torch.allclose(model(x), frozen(x), atol=1e-5)


def _toy_target(written: list, fail: bool = False) -> Target:
    def write(frozen, example_inputs, folder, options):
        assert isinstance(frozen, FrozenSubnet)
        (folder / "weights.pt").write_bytes(b"w" * 10)
        if fail:
            raise RuntimeError("compiler crashed")
        (folder / "meta.txt").write_text(f"scale={options['scale']}")
        written.append(folder)
        return {"weights": folder / "weights.pt", "meta": folder / "meta.txt"}

    def rules(frozen, options):
        return [f"{g}: {qp.bits}-bit" for g, qp in frozen.qparams.items() if qp.bits < options["min_bits"]]

    return Target("toy-npu", "a toy target defined in a test", profile="brevitas", write=write, rules=rules,
                  options={"scale": 1, "min_bits": 4})


def test_register_a_user_target(sn, x, tmp_path):
    written: list = []
    register_target(_toy_target(written))
    try:
        assert "toy-npu" in target_names()
        with pytest.raises(ValueError, match="registered already"):
            register_target(_toy_target(written))
        files = get_target("toy-npu").export(sn, x[:1], tmp_path / "out", cfg=sn.uniform(8, 8), scale=3)
        assert Path(files["meta"]).read_text() == "scale=3" and Path(files["weights"]).parent == tmp_path / "out"
        problems = get_target("toy-npu").check(sn, cfg=sn.uniform(2, 2))
        assert problems and all("2-bit" in p for p in problems)
        # a target that fails half-way leaves the earlier files untouched and nothing new
        register_target(_toy_target(written, fail=True), replace=True)
        with pytest.raises(RuntimeError, match="compiler crashed"):
            get_target("toy-npu").export(sn, x[:1], tmp_path / "out", cfg=sn.uniform(8, 8), scale=5)
        assert Path(files["meta"]).read_text() == "scale=3"
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.txt", "report.json", "weights.pt"]
    finally:
        unregister_target("toy-npu")
    assert "toy-npu" not in target_names()


@pytest.mark.parametrize("name", ["", "all", "My NPU", "Tensor_RT"])
def test_bad_target_names_are_refused(name):
    with pytest.raises(ValueError, match="lowercase"):
        register_target(Target(name, "x", profile="brevitas", write=lambda *a: {}))


def test_cli_choices_and_all_read_the_registry(sn, tmp_path):
    from eqnet_plugin.app.cli import build_parser
    written: list = []
    register_target(_toy_target(written))
    try:
        parser = build_parser()
        args = parser.parse_args(["export", "--checkpoint", "c.pt", "--target", "toy-npu"])
        assert args.target == "toy-npu"
        demo = parser.parse_args(["demo"])
        assert "toy-npu" in demo.targets
    finally:
        unregister_target("toy-npu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--checkpoint", "c.pt", "--target", "toy-npu"])
