"""Export targets: one registry that the CLI, the pipeline and the demo read.

A `Target` is one deployment toolchain: its name, the search profile whose subnets it runs, the checks that list
every rule a subnet breaks (without writing anything), and an export that writes its files atomically into a
folder (all of them or none). The built-in targets:

| name | writes | runs on | search profile |
|---|---|---|---|
| ``onnx`` | ``model.onnx`` (Q/DQ, sub-8-bit via Clip) | ONNX Runtime | ``brevitas`` (every form) |
| ``tensorrt`` | ``model.onnx`` (explicit quantization) | TensorRT | ``tensorrt`` |
| ``pytorch-quantization`` | ``model_pq.pt`` (a `torch.save`d module) | NVIDIA pytorch-quantization | ``tensorrt`` |
| ``brevitas`` | ``model_qcdq.onnx``, ``model_qonnx.onnx`` | Brevitas / FINN / QONNX | ``brevitas`` |
| ``qnn`` | ``model.onnx`` + ``model.encodings`` | Qualcomm QNN / AIMET | ``qnn`` |

Add your own with `register_target`:

    >>> from eqnet_plugin.adapters import Target, register_target
    >>> def write(frozen, example_inputs, folder, options):
    ...     path = folder / "model.pt"
    ...     torch.save(frozen.graph.state_dict(), path)
    ...     return {"weights": path}
    >>> register_target(Target("my-npu", "Float weights for my NPU's compiler", profile="brevitas",
    ...                        write=write))  # doctest: +SKIP

Each target imports its third-party packages lazily (in `check` and `export`), so the registry itself is cheap.

The export report. `Target.export` writes ``report.json`` next to the files (`eqnet_plugin.adapters.report`: bytes
on disk, the bits the weights are stored in vs the bits the subnet uses, agreement with the subnet on
``ReportConfig.inputs``, latency at batch 1 against the same network in float). A target gets agreement and latency
by setting ``runtime`` to a `Runtime`:

    Runtime(name, load, requires=(module, ...), write_float=None, note="")

* ``load(files, threads) -> run``: `files` is {kind: path} as `write` returned them (inside the export's staging
  folder); ``run(x)`` takes a numpy batch and returns the first output as numpy.
* ``write_float(frozen, example_inputs, folder) -> files``: writes the same network in float for `load` (the latency
  baseline, run interleaved with the export in the same run); None: no latency.
* ``requires``: modules the runtime needs; when one is missing the report says so and measures nothing.

`onnx_runtime(kind)` is the ONNX Runtime one (the float baseline is the marker export with every marker removed).
A target without a runtime here says why in ``runtime_note``; ``storage_note`` is a sentence for targets that
cannot store fewer bits than their containers (TensorRT: INT8 conv weights).
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from eqnet_plugin.files import atomic_files
from eqnet_plugin.export.ir import FrozenSubnet, as_example_inputs, as_frozen
from eqnet_plugin.quant.space import Scheme

from ._policy import UnsignedActivations
from .report import ReportConfig, Runtime, build_report, onnx_runtime, torch_runtime, write_report

__all__ = ["Target", "TargetError", "Runtime", "ReportConfig", "register_target", "unregister_target", "get_target",
           "target_names", "all_targets"]

RulesFn = Callable[[FrozenSubnet, Mapping[str, object]], list]
WriteFn = Callable[[FrozenSubnet, tuple, Path, Mapping[str, object]], Mapping[str, "str | os.PathLike"]]


class TargetError(ValueError):
    """A target cannot run a subnet; `problems` lists every rule it breaks (nothing was written)."""

    def __init__(self, target: str, problems: list[str]) -> None:
        self.target = target
        self.problems = list(problems)
        super().__init__(f"target {target} cannot run this subnet ({len(problems)} problem(s)): "
                         + "; ".join(problems))


@dataclass(frozen=True)
class Target:
    """One export target.

    Attributes:
        name: what users type (``eqnet export --target NAME``).
        description: one line for help texts.
        profile: the search profile (`eqnet_plugin.search.profiles`) whose subnets this target runs.
        write: ``write(frozen, example_inputs, folder, options) -> {kind: path}``: writes the files into `folder`
            (a fresh temporary folder; `export` moves them into place afterwards).
        rules: ``rules(frozen, options) -> [problem, ...]``: every rule the subnet breaks (default: none).
        requires: ``(module, install hint)`` pairs checked before anything else.
        options: option name -> default value, e.g. ``{"encoding_version": "1.0.0"}``.
        scheme: the uniform scheme (`eqnet_plugin.app.pipeline.uniform_config`) of this target's default subnet.
        ort_checkable: kinds of written files that ONNX Runtime runs with the subnet's quantization (the CLI
            reports their top-1 agreement with PyTorch).
        signed_activations: the target runs activations only on the signed grid (TensorRT: INT8, zero point 0):
            the pipeline and the demo calibrate a supernet meant for it with ``signed_activations=True``
            (`eqnet_plugin.app.pipeline.signed_activations_for`), so its export is exact.
        runtime: how the written files run here (`Runtime`: agreement and latency in the report); None: none.
        runtime_note: why there is no runtime here (the report's sentence when `runtime` is None).
        storage_note: a sentence for the report where the target cannot store fewer bits than its containers.
    """

    name: str
    description: str
    profile: str
    write: WriteFn
    rules: RulesFn | None = None
    requires: tuple[tuple[str, str], ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)
    scheme: Scheme = Scheme.SYM
    ort_checkable: tuple[str, ...] = ()
    signed_activations: bool = False
    runtime: Runtime | None = None
    runtime_note: str = ""
    storage_note: str = ""

    def _options(self, options: Mapping[str, object]) -> dict[str, object]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TypeError(f"target {self.name} has no option(s) {unknown}; its options: {known}")
        return {**self.options, **options}

    def missing_packages(self) -> list[str]:
        """A problem line per required package that cannot be imported."""
        out = []
        for module, hint in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as e:
                out.append(f"the {self.name} target needs the {module!r} package ({e}): {hint}")
        return out

    def check(self, model, *, cfg=None, **options) -> list[str]:
        """Every reason this target would refuse the subnet (empty: it can run it); writes nothing.

        Args:
            model: a `FrozenSubnet`, or a `Supernet` with `cfg` (default its active subnet).
        """
        opts = self._options(options)
        missing = self.missing_packages()
        if missing:
            return missing
        frozen = as_frozen(model, cfg)
        return list(self.rules(frozen, opts)) if self.rules is not None else []

    def export(self, model, example_inputs, out_dir: str | os.PathLike, *, cfg=None,
               report: ReportConfig | None = ReportConfig(), **options) -> dict[str, str]:
        """Check the subnet, then write this target's files into `out_dir` (created if needed); returns
        {kind: path}. All files appear together or none do (a failed export leaves `out_dir` as it was).

        Args:
            report: what the export report (``report.json``, kind "report"; module docstring) measures: pass
                ``ReportConfig(inputs=batch)`` for the agreement with the subnet; ``latency_rounds=0`` for no
                latency; None writes no report.

        Raises:
            ImportError: a package the target needs is missing (the message names the install command).
            TargetError: the subnet breaks a rule of this target (`check`); nothing is written.
            TypeError: an option this target does not have.
        """
        opts = self._options(options)
        missing = self.missing_packages()
        if missing:
            raise ImportError("; ".join(missing))
        frozen = as_frozen(model, cfg)
        example_inputs = as_example_inputs(example_inputs)
        problems = list(self.rules(frozen, opts)) if self.rules is not None else []
        if problems:
            raise TargetError(self.name, problems)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=f".tmp-{self.name}-"))
        try:
            written = {k: Path(v) for k, v in self.write(frozen, example_inputs, staging, opts).items()}
            outside = [str(p) for p in written.values() if p.resolve().parent != staging.resolve()]
            if outside:
                raise RuntimeError(f"target {self.name} wrote outside its folder: {outside}")
            if report is not None:
                if "report" in written:
                    raise RuntimeError(f"target {self.name} wrote a file of kind 'report', which the report uses")
                rep = build_report(self, frozen, example_inputs, written, report)
                written["report"] = write_report(rep, staging / "report.json")
            dests = {k: out / p.name for k, p in written.items()}
            with atomic_files(list(dests.values())) as tmps:
                for src, tmp in zip(written.values(), tmps):
                    os.replace(src, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {k: os.fspath(p) for k, p in dests.items()}


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target, *, replace: bool = False) -> Target:
    """Add `target` to the registry (the CLI's ``--target`` choices, ``--target all`` and the pipeline read it).

    Raises:
        ValueError: a target of that name exists (pass ``replace=True`` to override it) or the name is not a
            plain lowercase word (letters, digits, '-').
    """
    if not isinstance(target, Target):
        raise TypeError(f"register_target expects a Target, got {type(target).__name__}")
    name = target.name
    if not name or name == "all" or not all(c.isalnum() or c == "-" for c in name) or name.lower() != name:
        raise ValueError(f"target name {name!r}: use lowercase letters, digits and '-' (not 'all')")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a target named {name!r} is registered already; pass replace=True to override it")
    _REGISTRY[name] = target
    return target


def unregister_target(name: str) -> None:
    """Remove a target (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)


def get_target(name: str) -> Target:
    """The registered target `name`. Raises ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def target_names() -> tuple[str, ...]:
    """Registered target names, in registration order."""
    return tuple(_REGISTRY)


def all_targets() -> tuple[Target, ...]:
    return tuple(_REGISTRY.values())


# --- the built-in targets ------------------------------------------------------------------------------------
_EXPORT_HINT = 'pip install -e ".[export]"'


def _onnx_write(frozen, ex, folder, opts):
    from .onnx_qdq import export_onnx
    return {"onnx": export_onnx(frozen, ex, folder / "model.onnx")}


def _tensorrt_rules(frozen, opts):
    from .tensorrt import tensorrt_subnet_problems
    return tensorrt_subnet_problems(frozen, 17, opts["unsigned_activations"])


def _tensorrt_write(frozen, ex, folder, opts):
    from .tensorrt import export_to_tensorrt        # checks the written graph against TensorRT's rules itself
    return {"onnx": export_to_tensorrt(frozen, ex, folder / "model.onnx",
                                       unsigned_activations=opts["unsigned_activations"])}


def _pq_rules(frozen, opts):
    from .pytorch_quantization import pq_problems
    return pq_problems(frozen)


def _pq_write(frozen, ex, folder, opts):
    import torch

    from .pytorch_quantization import to_pytorch_quantization
    path = folder / "model_pq.pt"
    torch.save(to_pytorch_quantization(frozen), path)
    return {"model": path}


def _brevitas_rules(frozen, opts):
    problems = []
    for g, qp in frozen.qparams.items():
        if qp.per_channel and not frozen.is_weight(g):
            problems.append(f"activation {g!r} is per-channel (the Brevitas adapter quantizes activations "
                            "per-tensor)")
        elif qp.per_channel and qp.axis not in (None, 0):
            problems.append(f"weight {g!r} is per-channel along axis {qp.axis} (the Brevitas adapter supports "
                            "output channels, axis 0)")
    return problems


def _brevitas_write(frozen, ex, folder, opts):
    from .brevitas import export_brevitas_qcdq, export_brevitas_qonnx, to_brevitas
    model = to_brevitas(frozen)
    return {"qcdq": export_brevitas_qcdq(model, ex, folder / "model_qcdq.onnx"),
            "qonnx": export_brevitas_qonnx(model, ex, folder / "model_qonnx.onnx")}


def _qnn_rules(frozen, opts):
    from .qnn import check_encoding_version, qnn_rule_violations
    problems = []
    try:
        check_encoding_version(opts["encoding_version"])
    except ValueError as e:
        problems.append(str(e))
    return problems + qnn_rule_violations(frozen)


def _qnn_write(frozen, ex, folder, opts):
    from .qnn import export_qnn
    res = export_qnn(frozen, ex, folder / "model", encoding_version=opts["encoding_version"])
    return {"onnx": res.onnx_path, "encodings": res.encodings_path}


register_target(Target("onnx", "Q/DQ ONNX for ONNX Runtime (sub-8-bit grids via Clip)", profile="brevitas",
                       write=_onnx_write, requires=(("onnx", _EXPORT_HINT),), ort_checkable=("onnx",),
                       runtime=onnx_runtime("onnx")))
register_target(Target("tensorrt", "TensorRT explicit-quantization ONNX, checked against TensorRT's Q/DQ rules",
                       profile="tensorrt", write=_tensorrt_write, rules=_tensorrt_rules,
                       requires=(("onnx", _EXPORT_HINT),), options={"unsigned_activations": UnsignedActivations.REFUSE},
                       scheme=Scheme.SYM_PC, ort_checkable=("onnx",), signed_activations=True,
                       runtime_note="TensorRT has no runtime here (it needs an NVIDIA GPU): no agreement or latency",
                       storage_note="TensorRT runs conv and linear weights as INT8: weights under 8 bits take "
                                    "as many bytes as 8-bit ones"))
register_target(Target("pytorch-quantization", "NVIDIA pytorch-quantization model (TensorRT's PyTorch toolkit)",
                       profile="tensorrt", write=_pq_write, rules=_pq_rules,
                       requires=(("pytorch_quantization", 'pip install -e ".[tensorrt]"'),), scheme=Scheme.SYM_PC,
                       runtime=torch_runtime("model"), storage_note="pytorch-quantization keeps float weights and "
                       "fake-quantizes them: the file is as large as the float network's"))
register_target(Target("brevitas", "Brevitas model exported as QCDQ and QONNX ONNX", profile="brevitas",
                       write=_brevitas_write, rules=_brevitas_rules,
                       requires=(("brevitas", 'pip install -e ".[brevitas]"'), ("onnx", _EXPORT_HINT),
                                 ("onnxoptimizer", 'pip install -e ".[brevitas]"')), ort_checkable=("qcdq",),
                       runtime=onnx_runtime("qcdq", "ONNX Runtime runs model_qcdq.onnx")))
register_target(Target("qnn", "float ONNX + AIMET encodings for Qualcomm QNN", profile="qnn", write=_qnn_write,
                       rules=_qnn_rules, requires=(("onnx", _EXPORT_HINT),), options={"encoding_version": "1.0.0"},
                       scheme=Scheme.WSYM_PC_AASYM,
                       runtime=onnx_runtime("onnx", "model.onnx holds the float network (QNN applies model.encodings "
                                                    "when it compiles it): ONNX Runtime runs it in float, so agreement "
                                                    "and latency are those of the float network"),
                       storage_note="model.onnx keeps float weights; QNN's converter stores them at the encodings' "
                                    "bit-widths"))


def _openvino_rules(frozen, opts):
    from .openvino import openvino_problems
    return openvino_problems(frozen)


def _openvino_write(frozen, ex, folder, opts):
    from .openvino import export_openvino
    return export_openvino(frozen, ex, folder)


def _openvino_load(files, threads):
    from .openvino import load_openvino
    return load_openvino(files, threads)


def _openvino_float(frozen, ex, folder):
    from .report import write_float_onnx
    return write_float_onnx(frozen, ex, folder)


register_target(Target("openvino", "OpenVINO IR (model.xml/.bin) from our Q/DQ ONNX, INT8 on OpenVINO's CPU plugin",
                       profile="openvino", write=_openvino_write, rules=_openvino_rules,
                       requires=(("onnx", _EXPORT_HINT), ("openvino", 'pip install -e ".[openvino]"')),
                       scheme=Scheme.SYM_PC,
                       runtime=Runtime("OpenVINO", _openvino_load, requires=("openvino",),
                                       write_float=_openvino_float)))


def _executorch_rules(frozen, opts):
    from .executorch import executorch_problems
    return executorch_problems(frozen)


def _executorch_write(frozen, ex, folder, opts):
    from .executorch import export_executorch
    return export_executorch(frozen, ex, folder)


def _executorch_load(files, threads):
    from .executorch import load_executorch
    return load_executorch(files, threads)


def _executorch_float(frozen, ex, folder):
    from .executorch import write_float_executorch
    return write_float_executorch(frozen, ex, folder)


register_target(Target("executorch", "ExecuTorch .pte with the XNNPACK delegate (int8 conv/linear kernels, CPU)",
                       profile="openvino", write=_executorch_write, rules=_executorch_rules,
                       requires=(("executorch", 'pip install -e ".[executorch]"'),), scheme=Scheme.SYM_PC,
                       runtime=Runtime("ExecuTorch (XNNPACK)", _executorch_load, requires=("executorch",),
                                       write_float=_executorch_float)))
