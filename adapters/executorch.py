"""ExecuTorch export: a subnet lowered to a ``.pte`` program with the XNNPACK delegate (CPU integer kernels).

`export_executorch` rewrites the frozen graph (`FrozenSubnet.swap`) into the decomposed quantize ops XNNPACK's
partitioner matches: each activation `QuantPoint` becomes ``quantized_decomposed.quantize_per_tensor`` ->
``dequantize_per_tensor`` on an int8 container, each Quant layer an int8 weight constant ->
``dequantize_per_channel`` / ``dequantize_per_tensor`` -> conv / linear. It captures that graph with
``torch.export``, lowers it with ``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` and writes
``model.pte``. `load_executorch` runs a ``.pte`` with ``executorch.runtime.Runtime``.

Rules (`executorch_problems`, from what XNNPACK's quantized operators take): weights symmetric (zero point 0) on the
signed grid, per-tensor or per output channel (axis 0); activations per-tensor (any zero point). Grids narrower
than 8 bits ride in the int8 container through the ops' ``quant_min`` / ``quant_max``; unsigned activation grids
are shifted by -128 into int8 (same codes minus 128, same numbers).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from eqnet_plugin.export.ir import FrozenSubnet, QParams, QuantPoint

__all__ = ["executorch_problems", "export_executorch", "load_executorch", "write_float_executorch"]


def executorch_problems(frozen: FrozenSubnet) -> list[str]:
    """Every rule of the XNNPACK delegate's quantized path that `frozen` breaks (empty: it can lower it)."""
    problems = []
    for g, qp in frozen.qparams.items():
        weight = frozen.is_weight(g)
        if qp.bits > 8:
            problems.append(f"{'weight' if weight else 'activation'} {g!r} is {qp.bits}-bit: XNNPACK's quantized "
                            "ops take int8 containers; choose at most 8 bits")
        if weight and not (qp.symmetric and qp.signed):
            problems.append(f"weight {g!r} is asymmetric: XNNPACK takes symmetric int8 weights (zero point 0); "
                            "use symmetric weights (e.g. Scheme.SYM_PC)")
        if weight and qp.per_channel and qp.axis != 0:
            problems.append(f"weight {g!r} is per-channel along axis {qp.axis}: XNNPACK scales weights per output "
                            "channel (axis 0) or per tensor")
        if not weight and qp.per_channel:
            problems.append(f"activation {g!r} is per-channel: XNNPACK quantizes activations per tensor")
    return problems


def _int8_grid(qp: QParams) -> tuple[int, int, int]:
    """(zero point, qmin, qmax) of a per-tensor grid in the int8 container (unsigned grids shifted by -128)."""
    shift = 0 if qp.signed else -128
    return int(qp.zero_point.reshape(-1)[0]) + shift, qp.qmin + shift, qp.qmax + shift


class _QDQ(nn.Module):
    """quantize_per_tensor -> dequantize_per_tensor on int8 (the activation pattern XNNPACK matches)."""

    def __init__(self, point: QuantPoint) -> None:
        super().__init__()
        qp = point.qparams
        self.scale = float(qp.scale.reshape(-1)[0])
        self.zp, self.qmin, self.qmax = _int8_grid(qp)

    def forward(self, x):
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor.default(x, self.scale, self.zp, self.qmin, self.qmax, torch.int8)
        return ops.dequantize_per_tensor.default(q, self.scale, self.zp, self.qmin, self.qmax, torch.int8)


_WEIGHT_RANGE = (-127, 127)
"""The range the weight dequantize ops declare (dequantize does not clamp: the codes' values are what counts).
XNNPACK reads a declared 4-bit range as a packed 4-bit weight, which it supports for 2-d (linear) weights only."""


class _DQLayer(nn.Module):
    """A conv / linear whose weight is int8 codes -> dequantize (the weight pattern XNNPACK matches)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        qp = layer.weight_quant.qparams
        self.layer = copy.deepcopy(layer)
        del self.layer.weight_quant
        # plain tensor attributes, not buffers: torch.export lifts them as constants, which XNNPACK packs
        self.codes = qp.quantize(layer.weight.detach()).to(torch.int8)
        del self.layer.weight
        self.scales = qp.scale.detach().float().clone().reshape(-1)
        self.zps = torch.zeros(self.scales.numel(), dtype=torch.int64)
        self.per_channel, self.qmin, self.qmax = qp.per_channel, qp.qmin, qp.qmax
        self.scale_value = float(self.scales[0])       # per-tensor: a constant (export cannot read a tensor's value)

    def fold_batchnorm(self, bn: nn.BatchNorm2d) -> bool:
        """Fold an eval-mode BatchNorm that follows this conv into the per-channel weight scales and the bias
        (the same integer codes; a channel with a negative factor negates its codes). False (nothing changed)
        when a negated code would leave the grid."""
        k = (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).float()
        scales = self.scales.expand(k.numel()) if self.scales.numel() == 1 else self.scales
        view = (-1,) + (1,) * (self.codes.dim() - 1)
        neg = k < 0
        codes = torch.where(neg.view(view), -self.codes.to(torch.int32), self.codes.to(torch.int32))
        if int(codes.min()) < self.qmin or int(codes.max()) > self.qmax:
            return False
        bias = self.layer.bias.detach() if self.layer.bias is not None else torch.zeros_like(k)
        self.codes = codes.to(torch.int8)
        self.scales = (scales * k.abs()).contiguous()
        self.zps = torch.zeros(k.numel(), dtype=torch.int64)
        self.per_channel = True
        self.layer.bias = nn.Parameter((bias - bn.running_mean) * k + bn.bias.detach())
        return True

    def forward(self, x):
        ops = torch.ops.quantized_decomposed
        if self.per_channel:
            w = ops.dequantize_per_channel.default(self.codes, self.scales, self.zps, 0, *_WEIGHT_RANGE,
                                                   torch.int8)
        else:
            w = ops.dequantize_per_tensor.default(self.codes, self.scale_value, 0, *_WEIGHT_RANGE,
                                                  torch.int8)
        if isinstance(self.layer, nn.Linear):
            if x.dim() == 2:                  # a 1x1 conv: XNNPACK's quantized linear misread the lifted scales
                return nn.functional.conv2d(x[:, :, None, None], w[:, :, None, None], self.layer.bias).flatten(1)
            return nn.functional.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def executorch_graph(frozen: FrozenSubnet) -> torch.fx.GraphModule:
    """The frozen graph with the decomposed quantize ops `export_executorch` lowers (CPU, eval mode)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
    gm = frozen.swap(_DQLayer, _QDQ).cpu()
    for node in list(gm.graph.nodes):          # conv -> BatchNorm (PT2E subnets keep BN a module): fold it
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = gm.get_submodule(src.target)
        if isinstance(conv, _DQLayer) and isinstance(conv.layer, nn.Conv2d) and \
                conv.fold_batchnorm(gm.get_submodule(node.target)):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _lower(module: nn.Module, example_inputs: tuple, path: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.kernels import quantized  # noqa: F401  (out variants of the quantize ops XNNPACK leaves)

    ex = tuple(t.detach().cpu()[:1] for t in example_inputs)
    exported = torch.export.export(module.eval(), ex)
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    return path


def export_executorch(frozen: FrozenSubnet, example_inputs: tuple, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``model.pte`` (XNNPACK-delegated ExecuTorch program, batch 1: ExecuTorch programs have static shapes
    here) of `frozen` into `folder`; returns {"pte": path}.

    Raises:
        ValueError: `frozen` breaks a rule of `executorch_problems`.
    """
    problems = executorch_problems(frozen)
    if problems:
        raise ValueError("ExecuTorch/XNNPACK cannot run this subnet: " + "; ".join(problems))
    return {"pte": _lower(executorch_graph(frozen), example_inputs, Path(folder) / "model.pte")}


def write_float_executorch(frozen: FrozenSubnet, example_inputs: tuple, folder: str | os.PathLike
                           ) -> dict[str, Path]:
    """The same network in float (every quantize op removed), lowered with XNNPACK: the latency baseline."""
    gm = frozen.swap(lambda lay: _float_layer(lay), lambda p: nn.Identity()).cpu()
    return {"pte": _lower(gm, example_inputs, Path(folder) / "model_float.pte")}


def _float_layer(layer: nn.Module) -> nn.Module:
    base = {nn.Linear: nn.Linear, nn.Conv1d: nn.Conv1d, nn.Conv2d: nn.Conv2d, nn.Conv3d: nn.Conv3d}
    cls = next(b for b in base if isinstance(layer, b))
    out = copy.deepcopy(layer)
    del out.weight_quant
    out.__class__ = cls
    return out


def load_executorch(files: Mapping[str, os.PathLike] | str | os.PathLike, threads: int = 1
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """Load a written ``.pte`` (``{"pte": path}`` or a path) with ``executorch.runtime.Runtime``; returns
    ``run(x: np.ndarray) -> np.ndarray`` (the first output; batch 1 per call, larger batches run row by row).
    `threads` is accepted for the `Runtime` interface (XNNPACK's thread pool is set by ExecuTorch)."""
    from executorch.runtime import Runtime

    path = files if isinstance(files, (str, os.PathLike)) else files.get("pte")
    if path is None:
        raise ValueError(f"load_executorch needs a 'pte' file, got {sorted(files)}")
    method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return np.concatenate([method.execute([x[i:i + 1]])[0].numpy() for i in range(len(x))])

    return run
