"""ONNX Runtime facts the parity tests depend on."""
from __future__ import annotations

import platform


def ort_int8_kernels_exact() -> bool:
    """Does ONNX Runtime's CPU int8 convolution compute without int16 saturation on this machine?

    True on x86 with VNNI (avx512_vnni / avx_vnni / AMX) and on other architectures. False on AVX2-only x86, where
    ONNX Runtime's u8s8 kernels add pairs of uint8 x int8 products in int16 with saturation (VPMADDUBSW): 8-bit
    weights near full range then overflow, and the default (optimized) session computes something else than the
    graph (measured on an AMD EPYC with AVX2 only: 59-70% of outputs within 1 LSB, 61-70% top-1, for W8A8 exports
    whose unoptimized session is within 1 LSB everywhere). That is ONNX Runtime's documented limitation on such
    CPUs, not the exporters'.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
