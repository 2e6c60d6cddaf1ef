"""QNN export: a float ONNX model with stable tensor names plus an AIMET-style encodings file.

Qualcomm's QNN converter (``qnn-onnx-converter --quantization_overrides``) and AIMET read a float model together
with a JSON file that maps tensor names to quantization encodings. `export_qnn` writes both from a `FrozenSubnet`:

* ``<prefix>.onnx``: the frozen graph as float ONNX (BN folded, float weights). Every tensor that the subnet
  quantizes gets a stable name: the weight initializer of layer ``L`` is ``"L.weight"``; an activation is named
  after its quantizer group (``"activation_post_process_3"``; non ``[0-9A-Za-z_.]`` characters become ``_``; a
  group that quantizes several tensors, as torch.ao does for a pool output after the ReLU it follows, names the
  second one ``"<group>__1"``, ...). The graph input and output keep their names (``"input"``, ``"output"``).
* ``<prefix>.encodings``: the encodings, version 0.6.1, 1.0.0 or 2.0.0, one entry per quantized tensor, names
  matching the ONNX file exactly. AIMET's grid conventions (checked against aimet-onnx 2.42 ``_encoding.py``):
  ``offset`` in 0.6.1 / 1.0.0 is minus the zero point on the UNSIGNED grid, also for signed tensors (a signed
  grid with zero point z is the unsigned grid with zero point ``z + 2^(b-1)``, so symmetric int8 has offset
  -128); ``min = offset * scale``, ``max = (offset + 2^b - 1) * scale``; ``is_symmetric`` / ``is_sym`` means a
  signed dtype. 2.0.0 states the dtype (``int8``, ``uint4``, ...) and ``y_zero_point`` on that dtype's own grid
  (omitted when 0, as AIMET writes it), with ``axis`` for per-channel tensors. Per-channel 0.6.1 entries are one
  dict per channel.

Dtypes: symmetric weights are signed (``int<b>``, zero point 0), the form QNN HTP runs. Asymmetric weights and
ALL activations are written on the unsigned grid (``uint<b>``): the numbers are identical to our signed-grid
QParams and unsigned activations are what HTP runs (AIMET's own 2.0.0 exporter forces activations unsigned for the
same reason). A symmetric activation of signed data is thus the uint8 grid with zero point 128.

Placement: AIMET's QuantizationSimModel puts a quantizer on the graph input, on every op output (except
data-movement ops such as Flatten/Reshape) and on every weight and bias, while torch.ao (and so the frozen subnet)
quantizes only some tensors: not a conv output that feeds a ReLU, not biases, but both a ReLU output and the
average-pool output after it (one shared quantizer), and a Flatten output. The encodings file lists exactly the
subnet's tensors. `aimet_quantsim` builds the sim without AIMET's quantizer tying (which can make the output of a
Relu / AveragePool / Concat reuse its input's quantizer object, so loading or disabling one tensor's quantizer would
change another's; it did not trigger on the models tested, but the file is meant per tensor), adds the
quantizers AIMET omits on data-movement outputs (as AIMET itself does for 0.6.1/1.0.0 files loaded with
strict=False; 2.0.0 files otherwise fail with "Encodings were provided for missing quantizers"), loads the file
and disables every quantizer that has no entry (``load_encodings_to_sim(..., disable_missing_quantizers=True)``).
What QNN itself does with unlisted tensors is its own business (it computes or propagates encodings for them).

QNN HTP runs weights at 4 or 8 bits symmetric (per-channel or per-tensor) and activations at 8 or 16 bits
per-tensor (unsigned, any zero point; a symmetric activation is the special case zero point 0 or 2^(b-1)).
``strict=True`` refuses other subnets with an error naming the rule; ``strict=False`` writes any bit-width
(2..8), for AIMET simulation (``encodings_to_onnx_qdq`` only converts 4/8/16-bit files: ONNX has no other types).

`tests/toolchains/test_adapters_qnn.py` loads every version in aimet-onnx and compares its simulation with the
FrozenSubnet; docs/targets.md (section Qualcomm QNN / AIMET) records the measured agreement and its two limits, both about
rounding (AIMET rounds .5 ties away from zero where torch rounds to even; float summation order in deep nets).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from eqnet_plugin.files import atomic_files
from eqnet_plugin.export.ir import PRODUCER, FrozenSubnet, QParams, as_frozen

from ._onnx import export_marked, replace_markers

__all__ = ["ENCODING_VERSIONS", "QnnExport", "qnn_rule_violations", "encoding_entry", "build_encodings",
           "export_qnn", "aimet_quantsim", "check_encoding_version"]

ENCODING_VERSIONS = ("0.6.1", "1.0.0", "2.0.0")
HTP_WEIGHT_BITS = (4, 8)
HTP_ACT_BITS = (8, 16)
_NAME_OK = re.compile(r"[^0-9A-Za-z_.]")


def check_encoding_version(version: str) -> None:
    """Raise ValueError naming the supported AIMET encoding versions unless `version` is one of them."""
    if version not in ENCODING_VERSIONS:
        raise ValueError(f"encoding_version={version!r} is not supported; choose one of {ENCODING_VERSIONS}")


class QnnExport(NamedTuple):
    """What `export_qnn` wrote: the two paths and, per quantizer group, the ONNX tensor names it quantizes."""

    onnx_path: str
    encodings_path: str
    tensors: dict[str, tuple[str, ...]]


# --- subnet checks --------------------------------------------------------------------------------------------
def qnn_rule_violations(frozen: FrozenSubnet) -> list[str]:
    """The QNN HTP rules that `frozen` breaks (empty list: HTP runs it).

    Rules: weights 4 or 8 bits, symmetric (zero point 0), per-channel or per-tensor; activations 8 or 16 bits,
    per-tensor (written unsigned, any zero point).
    """
    out = []
    for g, qp in frozen.qparams.items():
        if frozen.is_weight(g):
            if qp.bits not in HTP_WEIGHT_BITS:
                out.append(f"weight {g!r}: {qp.bits}-bit (rule: QNN HTP weights are 4 or 8 bit)")
            if not (qp.signed and bool((qp.zero_point == 0).all())):
                out.append(f"weight {g!r}: asymmetric (rule: QNN HTP weights are symmetric, zero point 0)")
        else:
            if qp.bits not in HTP_ACT_BITS:
                out.append(f"activation {g!r}: {qp.bits}-bit (rule: QNN HTP activations are 8 or 16 bit)")
            if qp.per_channel:
                out.append(f"activation {g!r}: per-channel (rule: QNN HTP activations are per-tensor)")
    return out


# --- encodings (pure) -----------------------------------------------------------------------------------------
def _signed_dtype(qp: QParams, is_param: bool) -> bool:
    """Symmetric weights keep the signed dtype; everything else is written on the unsigned grid."""
    return is_param and qp.signed and bool((qp.zero_point == 0).all())


def _unsigned_offset(qp: QParams) -> np.ndarray:
    """AIMET's legacy offset: minus the zero point on the unsigned grid, one per channel (int64)."""
    zp = qp.zero_point.detach().cpu().numpy().astype(np.int64).reshape(-1)
    return -(zp - qp.qmin)


def encoding_entry(qp: QParams, *, is_param: bool, version: str, name: str | None = None) -> Any:
    """One tensor's encoding in AIMET format `version`.

    Args:
        qp: the tensor's QParams (full-range grid).
        is_param: True for weights (symmetric weights stay signed); activations are written unsigned.
        version: "0.6.1" (list of per-channel dicts), "1.0.0" or "2.0.0" (one dict carrying `name`).
        name: the tensor name (1.0.0 and 2.0.0 entries carry it).
    Returns:
        list (0.6.1) or dict.
    Raises:
        ValueError: unknown version.
    """
    check_encoding_version(version)
    b = qp.bits
    scale = qp.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)    # (C,) or (1,)
    offset = _unsigned_offset(qp)                                              # (C,) or (1,)
    signed = _signed_dtype(qp, is_param)
    if version == "0.6.1":
        return [{"bitwidth": b, "dtype": "int", "is_symmetric": str(signed),
                 "min": float(o) * float(s), "max": float(o + (1 << b) - 1) * float(s),
                 "offset": int(o), "scale": float(s)} for s, o in zip(scale, offset)]
    if version == "1.0.0":
        return {"name": name, "dtype": "INT", "enc_type": "PER_CHANNEL" if qp.per_channel else "PER_TENSOR",
                "is_sym": signed, "bw": b, "scale": [float(s) for s in scale], "offset": [int(o) for o in offset]}
    # 2.0.0: zero point on the dtype's own grid
    zp = -offset - (1 << (b - 1)) if signed else -offset
    entry: dict[str, Any] = {"name": name, "output_dtype": f"{'' if signed else 'u'}int{b}"}
    if qp.per_channel:
        entry["y_scale"] = [float(s) for s in scale]
        if (zp != 0).any():
            entry["y_zero_point"] = [int(z) for z in zp]
        entry["axis"] = int(qp.axis)
    else:
        entry["y_scale"] = float(scale[0])
        if zp[0] != 0:
            entry["y_zero_point"] = int(zp[0])
    return entry


def build_encodings(params: Mapping[str, QParams], activations: Mapping[str, QParams], version: str) -> dict:
    """The whole encodings document: tensor name -> QParams for weights (`params`) and activations.

    Returns a JSON-ready dict: ``{"version", "producer", "activation_encodings", "param_encodings"}`` for 0.6.1
    (sections keyed by name) and 1.0.0 (lists), ``{"version", "producer", "encodings"}`` for 2.0.0.
    """
    check_encoding_version(version)
    shared = set(params) & set(activations)
    if shared:
        raise ValueError(f"tensors {sorted(shared)} are both weights and activations; each tensor has one encoding")
    doc: dict[str, Any] = {"version": version, "producer": dict(PRODUCER)}
    p = [encoding_entry(q, is_param=True, version=version, name=n) for n, q in params.items()]
    a = [encoding_entry(q, is_param=False, version=version, name=n) for n, q in activations.items()]
    if version == "0.6.1":
        doc["activation_encodings"] = dict(zip(activations, a))
        doc["param_encodings"] = dict(zip(params, p))
    elif version == "1.0.0":
        doc["activation_encodings"] = a
        doc["param_encodings"] = p
    else:
        doc["encodings"] = a + p
    return doc


# --- ONNX graph with stable names -----------------------------------------------------------------------------
def _fold_output_identities(model, carried: set[str]) -> dict[str, str]:
    """Remove ``Identity(t) -> graph output`` where `t` is a carried tensor used only there: the producer writes
    the output directly, so the output tensor itself carries the encoding. Returns old -> new tensor names."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    uses: dict[str, int] = {}
    for n in graph.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
    producer = {t: n for n in graph.node for t in n.output}
    renames, drop = {}, []
    for n in graph.node:
        if n.op_type != "Identity" or n.output[0] not in outputs:
            continue
        src = n.input[0]
        if src in carried and src in producer and uses.get(src) == 1 and src not in outputs | inputs:
            out = list(producer[src].output)
            producer[src].output[out.index(src)] = n.output[0]
            renames[src] = n.output[0]
            drop.append(n)
    for n in drop:
        graph.node.remove(n)
    return renames


def _tensor_names(model) -> set[str]:
    g = model.graph
    names = {t for n in g.node for t in (*n.input, *n.output) if t}
    return names | {i.name for i in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}


def _rename_tensors(model, mapping: Mapping[str, str]) -> None:
    """Rename tensors everywhere in the (flat) graph; a target already used by another tensor is moved aside."""
    g = model.graph
    mapping = {k: v for k, v in mapping.items() if k != v}
    io = {i.name for i in g.input} | {o.name for o in g.output}
    existing = _tensor_names(model)
    targets = set(mapping.values())
    for t in sorted((targets & existing) - set(mapping)):
        if t in io:
            raise ValueError(f"a quantizer group would rename a tensor to {t!r}, the name of a graph input/output; "
                             "export with other input_names/output_names")
        k = 1
        while f"{t}__{k}" in existing | targets:
            k += 1
        mapping[t] = f"{t}__{k}"
    for n in g.node:
        for i, t in enumerate(n.input):
            n.input[i] = mapping.get(t, t)
        for i, t in enumerate(n.output):
            n.output[i] = mapping.get(t, t)
    for coll in (g.initializer, g.value_info, g.input, g.output):
        for v in coll:
            v.name = mapping.get(v.name, v.name)


def _stable_graph(frozen: FrozenSubnet, example_inputs: tuple, opset: int, dynamic_batch: bool):
    """Float ONNX model with stable names; returns (model, group -> tensor names)."""
    model = export_marked(frozen, example_inputs, opset=opset, dynamic_batch=dynamic_batch)
    seen: list[tuple[str, str]] = []
    replace_markers(model, lambda group, src, dst: seen.append((group, src)) or [])
    renames = _fold_output_identities(model, {t for _, t in seen})
    seen = [(g, renames.get(t, t)) for g, t in seen]

    owner: dict[str, str] = {}
    per_group: dict[str, list[str]] = {}
    for g, t in seen:
        if owner.setdefault(t, g) != g:
            raise ValueError(f"tensor {t!r} is quantized by two groups ({owner[t]!r}, {g!r}) in a row; an encodings "
                             "file holds one encoding per tensor (please report the model)")
        if t not in per_group.setdefault(g, []):
            per_group[g].append(t)
    missing = set(frozen.qparams) - set(per_group)
    if missing:
        raise RuntimeError(f"groups {sorted(missing)} have no tensor in the exported graph (please report the model)")

    g_io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    layer_of = {lay.weight_group: lay.name for lay in frozen.layers}
    mapping: dict[str, str] = {}
    for g, tensors in per_group.items():
        if frozen.is_weight(g):
            bad = [t for t in tensors if t not in inits]
            if bad or len(tensors) != 1:
                raise RuntimeError(f"weight group {g!r} is carried by {tensors}, not one initializer (the exporter "
                                   "shared or computed the weight; please report the model)")
            mapping[tensors[0]] = _NAME_OK.sub("_", layer_of.get(g, g)) + ".weight"
        else:
            base = _NAME_OK.sub("_", g)
            k = 0
            for t in tensors:
                if t in g_io:
                    continue
                mapping[t] = base if k == 0 else f"{base}__{k}"
                k += 1
    _rename_tensors(model, mapping)
    tensors = {g: tuple(mapping.get(t, t) for t in ts) for g, ts in per_group.items()}
    return model, tensors


# --- files ----------------------------------------------------------------------------------------------------
def _paths(out_dir_or_prefix) -> tuple[str, str]:
    s = os.fspath(out_dir_or_prefix)
    if os.path.isdir(s) or s.endswith(("/", os.sep)):
        s = os.path.join(s, "model")
    if s.endswith(".onnx"):
        s = s[:-5]
    return s + ".onnx", s + ".encodings"


def _write_pair(model, doc: dict, onnx_path: str, enc_path: str) -> None:
    """Write both files as one unit (`eqnet_plugin.files.atomic_files`): on any error neither new file is left
    behind and earlier files are restored."""
    import onnx

    onnx.checker.check_model(model)
    with atomic_files([onnx_path, enc_path]) as (t_onnx, t_enc):
        onnx.save(model, t_onnx)
        with open(t_enc, "w") as f:
            json.dump(doc, f, indent=1)


def export_qnn(frozen, example_inputs: tuple, out_dir_or_prefix, *, cfg=None, encoding_version: str = "1.0.0",
               opset: int = 17, strict: bool = True, dynamic_batch: bool = True) -> QnnExport:
    """Write ``<prefix>.onnx`` (float, stable tensor names) and ``<prefix>.encodings`` (AIMET JSON) for QNN.

    Args:
        frozen: a `FrozenSubnet`, or a `Supernet` with `cfg` (default: its active subnet), as every exporter
            takes.
        example_inputs: a tensor or a tuple of example input tensors for the ONNX export.
        cfg: the subnet to freeze when `frozen` is a Supernet.
        out_dir_or_prefix: an existing folder or a path ending in "/" (files ``model.onnx`` / ``model.encodings``
            in it), or a path prefix (a trailing ".onnx" is dropped); missing parent folders are created.
        encoding_version: "0.6.1", "1.0.0" or "2.0.0" (see module docstring).
        opset: ONNX opset.
        strict: refuse subnets QNN HTP cannot run (`qnn_rule_violations`); False writes any bit-width.
        dynamic_batch: export the batch axis as dynamic (AIMET simulation with any batch); False fixes the shapes
            of `example_inputs`, which is what qnn-onnx-converter wants without ``--input_dim``.
    Returns:
        `QnnExport(onnx_path, encodings_path, tensors)`.
    Raises:
        ValueError: unknown encoding version, or a rule broken under strict=True.
    Example:
        >>> out = export_qnn(freeze(sn, sn.uniform(8, 8, act_symmetric=False)), (x,), "artifacts/qnn/resnet")
        ... # doctest: +SKIP
    """
    check_encoding_version(encoding_version)
    frozen = as_frozen(frozen, cfg)
    if strict:
        bad = qnn_rule_violations(frozen)
        if bad:
            raise ValueError("QNN HTP cannot run this subnet:\n  " + "\n  ".join(bad) +
                             "\nchoose a subnet within the rules (e.g. sn.uniform(8, 8, symmetric=True, "
                             "act_symmetric=False)) or pass strict=False to write the encodings anyway (AIMET "
                             "simulation)")
    model, tensors = _stable_graph(frozen, example_inputs, opset, dynamic_batch)
    params = {t: frozen.qparams[g] for g, ts in tensors.items() if frozen.is_weight(g) for t in ts}
    acts = {t: frozen.qparams[g] for g, ts in tensors.items() if not frozen.is_weight(g) for t in ts}
    doc = build_encodings(params, acts, encoding_version)
    names = _tensor_names(model)
    unknown = sorted((set(params) | set(acts)) - names)
    if unknown:
        raise RuntimeError(f"encodings name tensors missing from the ONNX graph: {unknown[:5]} (please report)")
    onnx_path, enc_path = _paths(out_dir_or_prefix)
    _write_pair(model, doc, onnx_path, enc_path)
    return QnnExport(onnx_path, enc_path, tensors)


# --- AIMET simulation -----------------------------------------------------------------------------------------
def _encoding_names(doc: Mapping) -> list[str]:
    """Tensor names of an encodings document (any version)."""
    if doc["version"] == "2.0.0":
        return [e["name"] for e in doc["encodings"]]
    secs = (doc["param_encodings"], doc["activation_encodings"])
    if doc["version"] == "0.6.1":
        return [n for sec in secs for n in sec]
    return [e["name"] for sec in secs for e in sec]


def aimet_quantsim(onnx_path: str | os.PathLike, encodings_path: str | os.PathLike, *, strict: bool = False,
                   providers: Sequence[str] | None = None, threads: int | None = None):
    """aimet-onnx's QuantizationSimModel of the exported float model with our encodings loaded.

    Quantizers AIMET places where the encodings have no entry are disabled, quantizers it omits where the file has
    an entry (data-movement outputs) are added, and its quantizer tying is off (module docstring). Relies on two
    aimet-onnx 2.42 internals (``_apply_constraints``, ``_add_missing_quantizers``). Run it with
    ``sim.session.run(None, {"input": x})``.

    Args:
        onnx_path, encodings_path: the files `export_qnn` wrote.
        strict: passed to `load_encodings_to_sim`: True raises when AIMET's default settings for a quantizer
            (enabled, bit-width, symmetry, granularity) differ from the file; False adopts the file's settings.
        providers: ONNX Runtime providers (default CPU).
        threads: intra-op threads of the sim's session.
    Returns:
        `(sim, mismatches)`: the sim and AIMET's list of quantizers whose default settings the file changed.
    """
    import onnx
    from aimet_onnx import quantsim as aq

    model = onnx.load(os.fspath(onnx_path))
    with open(os.fspath(encodings_path)) as f:
        doc = json.load(f)
    if doc.get("version") not in ENCODING_VERSIONS:
        raise ValueError(f"{os.fspath(encodings_path)!r} has encoding version {doc.get('version')!r}; expected one "
                         f"of {ENCODING_VERSIONS} (write it with export_qnn)")
    names = _encoding_names(doc)
    apply_constraints = getattr(aq, "_apply_constraints", None)
    add_missing = getattr(aq, "_add_missing_quantizers", None)
    if apply_constraints is None or add_missing is None:
        raise RuntimeError("aimet_quantsim uses aimet_onnx.quantsim._apply_constraints and _add_missing_quantizers "
                           "(aimet-onnx 2.42), which this aimet-onnx lacks; install aimet-onnx==2.42")
    kw = {"session_options_kwargs": {"intra_op_num_threads": threads}} if threads else {}
    with apply_constraints(False):
        sim = aq.QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                                      providers=list(providers) if providers else None, **kw)
    # AIMET never quantizes data-movement outputs (Flatten, Reshape, ...), where torch.ao may: add those
    # quantizers (as AIMET itself does for 0.6.1/1.0.0 files loaded with strict=False) so that every version,
    # 2.0.0 included, loads; they are enabled because the file gives them an encoding.
    inits = {i.name for i in model.graph.initializer}
    missing = [n for n in names if n not in sim.qc_quantize_op_dict]
    if missing:
        add_missing(sim, [n for n in missing if n in inits], [n for n in missing if n not in inits])
        for n in missing:
            sim.qc_quantize_op_dict[n].enabled = True
    mismatches = aq.load_encodings_to_sim(sim, doc, strict=strict, disable_missing_quantizers=True)
    return sim, mismatches
