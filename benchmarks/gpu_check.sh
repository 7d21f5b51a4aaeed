#!/usr/bin/env bash
# GPU check: bench one model on the CPU and on the GPU with edgesmith and print both side by side.
#
#   benchmarks/gpu_check.sh                      # a small generated ONNX conv net (96x96x3 -> 10)
#   benchmarks/gpu_check.sh runs/cifar10/export/float_onnx.onnx [runs/cifar10/train/model.keras]
#
# Needs an NVIDIA GPU (exits 1 when nvidia-smi lists none). Installs edgesmith's [gpu] extra
# (onnxruntime-gpu in place of onnxruntime: both wheels ship the same `onnxruntime` module) when
# ONNX Runtime has no CUDAExecutionProvider yet. Exits nonzero if the GPU bench fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi is missing or lists no GPU); nothing to check" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

has_cuda_provider() {
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    2>/dev/null
}
if ! has_cuda_provider; then
  echo "gpu_check: installing edgesmith[gpu] (onnxruntime-gpu)"
  "$PY" -m pip install -q -e '.[gpu]'
  "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu
  "$PY" -m pip install -q 'onnxruntime-gpu>=1.32,<1.33'
  has_cuda_provider || { echo "gpu_check: onnxruntime-gpu offers no CUDAExecutionProvider" >&2; exit 1; }
fi

"$PY" - "$@" <<'EOF'
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgesmith.bench import bench
from edgesmith.recipe import BenchConfig
from edgesmith.runtime import load_runner


def small_convnet(path: Path) -> Path:
    """Conv(3->32, s2) ReLU Conv(32->64, s2) ReLU GlobalAveragePool Gemm(64->10) Softmax, NCHW, dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": (32, 3, 3, 3), "w2": (64, 32, 3, 3), "fc": (64, 10)}
    inits = [numpy_helper.from_array((rng.normal(size=s) * 0.1).astype(np.float32), n) for n, s in weights.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["m"]), helper.make_node("Softmax", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 96, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


paths = [Path(p) for p in sys.argv[1:]] or [small_convnet(Path(tempfile.mkdtemp()) / "convnet.onnx")]
artifacts = {p.stem: p for p in paths}
shape = [d if isinstance(d, int) and d > 0 else 1 for d in load_runner(paths[0]).sample_shape]
inputs = np.random.default_rng(1).normal(size=(64, *shape)).astype(np.float32)
labels = np.zeros(len(inputs), int)
reports = {}
for device in ("cpu", "gpu"):
    cfg = BenchConfig(warmup=20, runs=100, min_seconds=1.0, threads=[0], batch_sizes=[1, 32], device=device,
                      memory=False)
    reports[device] = bench(artifacts, inputs, labels, cfg).to_dict()
cpu, gpu = reports["cpu"], reports["gpu"]
print(f"\nGPUs: {'; '.join(gpu['environment']['gpus'])}; onnxruntime providers: "
      f"{', '.join(gpu['environment']['onnx_providers'])}; CPU: {cpu['environment']['cpu']} "
      f"({cpu['environment']['threads']} threads)")
print(f"{'model':<24}{'batch':>6}{'cpu p50 ms':>12}{'gpu p50 ms':>12}{'cpu img/s':>12}{'gpu img/s':>12}  gpu provider")
for c, g in zip(cpu["latency"], gpu["latency"], strict=True):
    print(f"{c['name']:<24}{c['latency_batch']:>6}{c['latency_p50_ms']:>12.3f}{g['latency_p50_ms']:>12.3f}"
          f"{c['throughput_ips']:>12,.0f}{g['throughput_ips']:>12,.0f}  {g['provider']} ({g['device']})")
formats = {row["name"]: row["format"] for row in gpu["rows"]}
sys.exit(0 if all(e["device"] == "gpu" for e in gpu["latency"] if formats[e["name"]] != "tflite") else 1)
EOF
