"""The export report: what a target's written files store, how well they agree with the subnet, how fast they run.

`Target.export` writes ``report.json`` next to its files (`build_report`). Its keys:

* ``target``: the target name; ``files``: kind -> ``{"file": name, "bytes": size on disk}``; ``total_bytes``.
* ``weights``: ``elements`` (weight values of the subnet), ``used_bits`` (bits -> elements, from the subnet's grids),
  ``stored`` (data type -> elements, read from the written files: ONNX initializer types, a `torch.save`d module's
  tensors), ``stored_bytes`` (bytes of those weight tensors), ``used_bytes`` (what the used bits take packed) and
  ``note`` (a plain sentence where the files store more bits than the subnet uses).
* ``agreement`` (None without `ReportConfig.inputs`): ``inputs`` (batch size), ``max_lsb`` (largest output error
  in LSBs of the subnet's output quantizer; None when the output is not quantized), ``within_1lsb`` (fraction of
  outputs), ``top1`` (top-1 agreement), ``max_abs`` (largest output error).
* ``latency`` (None when not measured): ``runtime``, ``threads``, ``ms`` and ``float_ms`` (medians at batch 1 of the
  written files and of the same network in float, interleaved in one run), ``ratio`` (ms / float_ms), ``samples``.
* ``notes``: sentences on what was not measured and why (no runtime installed, no runtime for this target here).

A target opts into agreement and latency by giving a `Runtime`: ``load(files) -> run`` turns the written files
({kind: path}) into ``run(x: np.ndarray) -> np.ndarray`` (the first output), and ``write_float(frozen,
example_inputs, folder) -> files`` writes the same network in float for the same runtime (the latency baseline).
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from eqnet_plugin.export.ir import FrozenSubnet, QuantPoint

__all__ = ["Runtime", "ReportConfig", "build_report", "onnx_runtime", "write_float_onnx", "stored_weights",
           "report_table"]

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Runtime:
    """How the files of a target run on this machine (`Target.runtime`).

    Attributes:
        name: the runtime's name in reports (e.g. "ONNX Runtime").
        load: ``load(files, threads) -> run``: files {kind: path} as the target wrote them; ``run(x)`` maps a numpy
            batch to the first output as numpy.
        requires: modules the runtime needs; when one is missing the report says so instead of measuring.
        write_float: ``write_float(frozen, example_inputs, folder) -> files``: the same network in float for `load`
            (None: no latency baseline, so no latency).
        note: a sentence the report carries (e.g. what the runtime runs of the files).
    """

    name: str
    load: Callable[[Mapping[str, Path], int], Runner]
    requires: tuple[str, ...] = ()
    write_float: Callable[[FrozenSubnet, tuple, Path], Mapping[str, Path]] | None = None
    note: str = ""

    def missing(self) -> list[str]:
        out = []
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                out.append(module)
        return out


@dataclass(frozen=True)
class ReportConfig:
    """What `build_report` measures (validated).

    Attributes:
        inputs: a batch (tensor, first dimension the batch) for the agreement with the subnet; None: not measured.
        latency_rounds: interleaved rounds of the latency at batch 1 (0: no latency).
        latency_runs: runs per variant per round.
        threads: the runtime's intra-op threads.
    """

    inputs: torch.Tensor | None = None
    latency_rounds: int = 5
    latency_runs: int = 10
    threads: int = 1

    def __post_init__(self) -> None:
        if self.inputs is not None and (not isinstance(self.inputs, torch.Tensor) or self.inputs.dim() < 1
                                        or len(self.inputs) == 0):
            raise ValueError("ReportConfig.inputs: pass a non-empty tensor batch (or None)")
        for k in ("latency_rounds", "latency_runs", "threads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "latency_rounds" else 1):
                raise ValueError(f"ReportConfig.{k}={v!r}: use an integer >= {0 if k == 'latency_rounds' else 1}")


# --- storage --------------------------------------------------------------------------------------------------
_ONNX_BITS = {"FLOAT": 32, "DOUBLE": 64, "FLOAT16": 16, "BFLOAT16": 16, "INT8": 8, "UINT8": 8, "INT4": 4,
              "UINT4": 4, "INT16": 16, "UINT16": 16, "INT32": 32, "INT2": 2, "UINT2": 2}
_PASS = ("DequantizeLinear", "QuantizeLinear", "Clip", "Identity", "Quant", "BipolarQuant", "Transpose", "Reshape",
         "Cast", "Mul", "Unsqueeze")
_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "QLinearConv": 3}


def _onnx_weights(path: Path) -> dict[str, int]:
    """Data type -> elements of the weight tensors of an ONNX file: the constant each Conv/Gemm/MatMul weight input
    is computed from (through Q/DQ, Clip, Quant and shape ops)."""
    import onnx
    from onnx import TensorProto

    from ._onnx import constant_tensors

    graph = onnx.load(os.fspath(path)).graph
    tensor = constant_tensors(graph)
    producers = {o: n for n in graph.node for o in n.output}
    out: dict[str, int] = {}
    seen: set[str] = set()
    for node in graph.node:
        i = _WEIGHTED.get(node.op_type)
        if i is None or len(node.input) <= i:
            continue
        name = node.input[i]
        for _ in range(12):
            t = tensor(name)
            if t is not None:
                if t.name not in seen and len(t.dims) >= 2:
                    seen.add(t.name)
                    dtype = TensorProto.DataType.Name(t.data_type)
                    out[dtype] = out.get(dtype, 0) + int(np.prod(t.dims))
                break
            p = producers.get(name)
            if p is None or p.op_type not in _PASS or not p.input:
                break
            name = p.input[0]
    return out


def _torch_weights(path: Path) -> dict[str, int]:
    """Data type -> elements of the weight tensors (2+ dimensions) a `torch.save`d module or state dict holds."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj if isinstance(obj, Mapping) else {}
    out: dict[str, int] = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and k.endswith("weight"):
            dtype = str(t.dtype).replace("torch.", "").upper()
            out[dtype] = out.get(dtype, 0) + t.numel()
    return out


def _dtype_bits(dtype: str) -> int:
    if dtype in _ONNX_BITS:
        return _ONNX_BITS[dtype]
    return torch.empty(0, dtype=getattr(torch, dtype.lower())).element_size() * 8


def stored_weights(files: Mapping[str, str | os.PathLike]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """(file kind -> {data type -> weight elements}, problems) for the written files this report reads (.onnx,
    .pt); a file it cannot read adds a problem line instead."""
    out, problems = {}, []
    for kind, p in files.items():
        p = Path(p)
        read = _onnx_weights if p.suffix == ".onnx" else _torch_weights if p.suffix in (".pt", ".pth") else None
        if read is None:
            continue
        try:
            out[kind] = read(p)
        except Exception as e:         # e.g. a target's own binary format under a .pt name
            problems.append(f"the weights of {p.name} could not be read ({type(e).__name__})")
    return out, problems


def _weights_section(frozen: FrozenSubnet, files: Mapping[str, Path], storage_note: str) -> dict:
    used: dict[int, int] = {}
    for g, lay in frozen.weight_groups().items():
        n = frozen.layer_module(lay.name).weight.numel()
        used[frozen.qparams[g].bits] = used.get(frozen.qparams[g].bits, 0) + n
    elements = sum(used.values())
    per_file, notes = stored_weights(files)
    # the file holding the most weight elements stands for the target (e.g. QCDQ for brevitas)
    kind, stored = max(per_file.items(), key=lambda kv: sum(kv[1].values()), default=(None, {}))
    stored_bytes = sum(n * _dtype_bits(d) for d, n in stored.items()) // 8
    used_bytes = sum(n * b for b, n in used.items()) // 8
    if stored:
        widest = max(_dtype_bits(d) for d in stored)
        fewer = sorted(b for b in used if b < widest)
        if fewer:
            notes.append(f"{files[kind].name} stores the subnet's {'/'.join(map(str, fewer))}-bit weights as "
                         f"{'/'.join(sorted(stored))} ({widest} bits each): fewer bits do not make this file smaller.")
    if storage_note:
        notes.append(storage_note)
    return {"elements": elements, "used_bits": {str(b): used[b] for b in sorted(used)},
            "stored": dict(sorted(stored.items())), "stored_in": None if kind is None else files[kind].name,
            "stored_bytes": stored_bytes if stored else None, "used_bytes": used_bytes,
            "note": " ".join(notes) or None}


# --- agreement and latency ------------------------------------------------------------------------------------
def output_scale(frozen: FrozenSubnet) -> float | None:
    """The scale of the quantizer on the subnet's output (None when the output is not quantized per-tensor)."""
    gm = frozen.graph
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, (tuple, list)) and node:
        node = node[0]
    for _ in range(8):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantPoint):
            qp = frozen.qparams.get(gm.get_submodule(node.target).name)
            return float(qp.scale) if qp is not None and qp.scale.numel() == 1 else None
        if node.op not in ("call_module", "call_function", "call_method") or not node.args:
            return None
        if node.op == "call_module" or node.target not in (torch.flatten, "flatten", "view", "reshape", "squeeze"):
            return None
        node = node.args[0]
    return None


@torch.no_grad()
def agreement(run: Runner, frozen: FrozenSubnet, inputs: torch.Tensor) -> dict:
    """The runtime's outputs against the frozen subnet's on `inputs` (keys in the module docstring)."""
    device = next(iter(frozen.parameters())).device
    want = frozen(inputs.to(device)).float().cpu().numpy()
    got = np.asarray(run(inputs.cpu().numpy()), dtype=np.float32).reshape(want.shape)
    err = np.abs(got.astype(np.float64) - want)
    scale = output_scale(frozen)
    lsb = err / scale if scale else None
    top1 = float((got.reshape(len(want), -1).argmax(1) == want.reshape(len(want), -1).argmax(1)).mean())
    return {"inputs": int(len(inputs)), "max_lsb": None if lsb is None else float(lsb.max()),
            "within_1lsb": None if lsb is None else float((lsb <= 1.001).mean()), "top1": top1,
            "max_abs": float(err.max())}


def _latency(runs: dict[str, Runner], x: np.ndarray, cfg: ReportConfig) -> dict[str, float]:
    for run in runs.values():                        # warm-up
        for _ in range(3):
            run(x)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(cfg.latency_rounds):              # interleaved: both variants see the same machine load
        for k, run in runs.items():
            for _ in range(cfg.latency_runs):
                t = time.perf_counter()
                run(x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def build_report(target, frozen: FrozenSubnet, example_inputs: tuple, files: Mapping[str, Path],
                 cfg: ReportConfig) -> dict:
    """The report of `target`'s written `files` (keys in the module docstring); loads them with `target.runtime`."""
    files = {k: Path(v) for k, v in files.items()}
    report: dict = {"target": target.name,
                    "files": {k: {"file": p.name, "bytes": p.stat().st_size} for k, p in files.items()},
                    "total_bytes": sum(p.stat().st_size for p in files.values()),
                    "weights": _weights_section(frozen, files, target.storage_note),
                    "agreement": None, "latency": None, "notes": []}
    rt = target.runtime
    if rt is None:
        report["notes"].append(target.runtime_note or f"no runtime for the {target.name} target here")
        return report
    missing = rt.missing()
    if missing:
        report["notes"].append(f"{rt.name} is not installed here ({', '.join(missing)}): no agreement or latency")
        return report
    if len(example_inputs) != 1:
        report["notes"].append(f"the report runs models of one input (this one has {len(example_inputs)}): "
                               "no agreement or latency")
        return report
    if rt.note:
        report["notes"].append(rt.note)
    try:
        _measure(report, rt, frozen, example_inputs, files, cfg)
    except Exception as e:            # a runtime that cannot run the files: the files stand, the report says why
        report["notes"].append(f"{rt.name} could not run the files: {type(e).__name__}: {e}")
    return report


def _measure(report: dict, rt: Runtime, frozen: FrozenSubnet, example_inputs: tuple, files: Mapping[str, Path],
             cfg: ReportConfig) -> None:
    run = rt.load(files, cfg.threads)
    if cfg.inputs is not None:
        report["agreement"] = agreement(run, frozen, cfg.inputs)
    if cfg.latency_rounds and rt.write_float is not None:
        x1 = (cfg.inputs[:1] if cfg.inputs is not None else example_inputs[0][:1]).cpu().numpy()
        with tempfile.TemporaryDirectory() as tmp:
            frun = rt.load({k: Path(v) for k, v in rt.write_float(frozen, example_inputs, Path(tmp)).items()},
                           cfg.threads)
            ms = _latency({"subnet": run, "float": frun}, x1, cfg)
        report["latency"] = {"runtime": rt.name, "threads": cfg.threads, "ms": ms["subnet"], "float_ms": ms["float"],
                             "ratio": ms["subnet"] / ms["float"], "samples": cfg.latency_rounds * cfg.latency_runs}


def write_report(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


# --- ONNX Runtime ---------------------------------------------------------------------------------------------
def write_float_onnx(frozen: FrozenSubnet, example_inputs: tuple, folder: Path) -> dict[str, Path]:
    """The subnet's network in float as ONNX (the marker export with every marker removed), in `folder`."""
    from ._onnx import export_marked, replace_markers, save_model_atomic

    model = export_marked(frozen, example_inputs)
    replace_markers(model, lambda group, src, dst: [])
    return {"onnx": Path(save_model_atomic(model, folder / "model_float.onnx"))}


def onnx_runtime(kind: str, note: str = "") -> Runtime:
    """A `Runtime` that runs the written file `kind` (and the float baseline) in ONNX Runtime on the CPU."""

    def load(files: Mapping[str, Path], threads: int) -> Runner:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        path = files.get(kind, files.get("onnx"))
        sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]

    return Runtime("ONNX Runtime", load, requires=("onnxruntime",), write_float=write_float_onnx, note=note)


def torch_runtime(kind: str) -> Runtime:
    """A `Runtime` that runs a `torch.save`d module (file `kind`) in PyTorch; no float baseline."""

    def load(files: Mapping[str, Path], threads: int) -> Runner:
        model = torch.load(os.fspath(files[kind]), map_location="cpu", weights_only=False).eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
        return run

    return Runtime("PyTorch", load)


# --- table ----------------------------------------------------------------------------------------------------
REPORT_HEADERS = ["target", "bytes", "weights used / stored", "weight bytes used / stored", "max LSB", "top-1",
                  "latency vs float", "notes"]


def report_row(r: Mapping) -> list:
    """One table row of a report (`REPORT_HEADERS`)."""
    w, a, lat = r["weights"], r.get("agreement"), r.get("latency")
    used = "/".join(f"{b}b" for b in w["used_bits"])
    stored = "/".join(w["stored"]) or "-"
    wb = f"{w['used_bytes']} / {w['stored_bytes'] if w['stored_bytes'] is not None else '-'}"
    lsb = "-" if not a or a["max_lsb"] is None else f"{a['max_lsb']:.2f}"
    top1 = "-" if not a else f"{a['top1']:.4f}"
    latency = "-" if not lat else f"{lat['ms']:.3f} / {lat['float_ms']:.3f} ms ({lat['ratio']:.2f}x, {lat['runtime']})"
    notes = " ".join(n if n.endswith(".") else n + "." for n in [w.get("note")] + list(r.get("notes", [])) if n)
    return [r["target"], r["total_bytes"], f"{used} / {stored}", wb, lsb, top1, latency, notes or "-"]


def report_table(reports: Mapping[str, Mapping]) -> list[list]:
    return [report_row(r) for r in reports.values()]
