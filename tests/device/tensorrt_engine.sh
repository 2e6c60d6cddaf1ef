#!/usr/bin/env bash
# TensorRT device check (GPU machine with the `tensorrt` Python package): exports subnets with export_to_tensorrt,
# builds strongly typed engines and compares outputs with ONNX Runtime and with the supernet in torch.
# Prints "SKIP: ..." and exits 0 when tensorrt or CUDA is missing. Usage: tests/device/tensorrt_engine.sh [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
OUT="${1:-${OUT:-$ROOT/artifacts/device_tensorrt}}"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
if [ -z "$PY" ]; then echo "SKIP: no python3 on this machine"; exit 0; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
for mod in torch onnx onnxruntime; do
  if ! "$PY" -c "import $mod" >/dev/null 2>&1; then echo "SKIP: python module '$mod' is not installed"; exit 0; fi
done
exec "$PY" "$ROOT/tests/device/tensorrt_engine.py" --out "$OUT"
