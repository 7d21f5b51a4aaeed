"""Devices: choosing ONNX Runtime providers and TensorFlow devices, refusing a GPU that is not there,
and (on a machine with a GPU) running on it. The GPU tests are marked ``gpu`` and skip without one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesmith.bench import bench
from edgesmith.recipe import BenchConfig
from edgesmith.runtime import (
    CPU_PROVIDER,
    DeviceError,
    KerasRunner,
    OnnxRunner,
    check_provider_started,
    keras_device,
    load_runner,
    onnx_providers,
)
from tiny_artifacts import tiny_data, tiny_tflite

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def ort_has_cuda() -> bool:
    import onnxruntime

    return CUDA in onnxruntime.get_available_providers()


def tf_gpus() -> list:
    from edgesmith._keras import tf

    return tf.config.list_physical_devices("GPU")


NO_GPU_REASON = "needs an NVIDIA GPU (nvidia-smi) and onnxruntime-gpu's CUDAExecutionProvider: pip install '.[gpu]'"
HAS_GPU = bool(shutil.which("nvidia-smi")) and ort_has_cuda()
gpu = pytest.mark.gpu


# --- selection logic (runs everywhere) -----------------------------------------------------------


def test_cpu_uses_the_cpu_provider():
    assert onnx_providers("cpu", None, [CPU_PROVIDER]) == [CPU_PROVIDER]
    assert onnx_providers("cpu", None, [TENSORRT, CUDA, CPU_PROVIDER]) == [CPU_PROVIDER]


def test_gpu_uses_cuda_with_the_cpu_as_fallback_for_missing_kernels():
    assert onnx_providers("gpu", None, [TENSORRT, CUDA, CPU_PROVIDER]) == [CUDA, CPU_PROVIDER]
    assert onnx_providers("gpu", [TENSORRT, CUDA], [TENSORRT, CUDA, CPU_PROVIDER]) == [TENSORRT, CUDA]


@pytest.mark.parametrize(("device", "requested", "available", "message"), [
    ("gpu", None, [CPU_PROVIDER], r"onnxruntime has no CUDAExecutionProvider \(available: CPUExecutionProvider\); "
                                  r"pip install 'edgesmith\[gpu\]'"),
    ("gpu", [TENSORRT], [CUDA, CPU_PROVIDER], r"onnxruntime has no TensorrtExecutionProvider"),
    ("gpu", [CPU_PROVIDER], [CUDA, CPU_PROVIDER], r"device 'gpu' with providers \['CPUExecutionProvider'\]"),
    ("cpu", [CUDA], [CUDA, CPU_PROVIDER], r"device 'cpu' with GPU providers .*set device = 'gpu'"),
    ("tpu", None, [CPU_PROVIDER], r"device 'tpu' is unknown; choose from cpu, gpu"),
])
def test_provider_choice_errors(device, requested, available, message):
    with pytest.raises(DeviceError, match=message):
        onnx_providers(device, requested, available)


def test_a_gpu_provider_that_did_not_start_is_an_error_not_a_cpu_number():
    assert check_provider_started([CUDA, CPU_PROVIDER], [CUDA, CPU_PROVIDER], Path("m.onnx")) == CUDA
    with pytest.raises(DeviceError, match=r"m\.onnx: onnxruntime could not start CUDAExecutionProvider "
                                          r"\(it started CPUExecutionProvider\)"):
        check_provider_started([CUDA, CPU_PROVIDER], [CPU_PROVIDER], Path("m.onnx"))


def test_keras_device_placement():
    assert keras_device("cpu", []) == "/CPU:0" and keras_device("cpu", ["gpu0"]) == "/CPU:0"
    assert keras_device("gpu", ["gpu0"]) == "/GPU:0"
    with pytest.raises(DeviceError, match=r"device 'gpu': TensorFlow sees no GPU"):
        keras_device("gpu", [])


@pytest.fixture(scope="module")
def tiny_pair(tiny_exports):
    return {"tflite": tiny_exports["tflite-float32"].path, "onnx": tiny_exports["onnx-float32"].path}


def test_tflite_refuses_the_gpu(tiny_pair):
    with pytest.raises(DeviceError, match=r"ai-edge-litert runs TFLite on the CPU only"):
        load_runner(tiny_pair["tflite"], device="gpu")


def test_runners_record_the_cpu_device(tiny_pair, tiny_keras_file):
    onnx = load_runner(tiny_pair["onnx"], threads=1)
    assert (onnx.device, onnx.provider) == ("cpu", CPU_PROVIDER)
    keras = load_runner(tiny_keras_file, threads=1)
    assert isinstance(keras, KerasRunner) and (keras.device, keras.provider) == ("cpu", "/CPU:0")


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where there is no GPU")
def test_requesting_a_gpu_without_one_is_a_clear_error(tiny_pair, tiny_keras_file):
    inputs, labels = tiny_data()
    with pytest.raises(DeviceError, match=r"onnxruntime has no CUDAExecutionProvider"):
        OnnxRunner(tiny_pair["onnx"], device="gpu")
    if not tf_gpus():
        with pytest.raises(DeviceError, match=r"TensorFlow sees no GPU"):
            KerasRunner(tiny_keras_file, device="gpu")


def test_gpu_bench_keeps_tflite_on_the_cpu_and_says_so(tmp_path):
    inputs, labels = tiny_data()
    path = tiny_tflite(tmp_path / "f.tflite", int8=False)
    cfg = BenchConfig(min_seconds=0, warmup=1, runs=2, threads=[1], device="gpu", memory=False)
    report = bench({"f": path}, inputs, labels, cfg).to_dict()
    entry = report["latency"][0]
    assert entry["device"] == "cpu" and entry["provider"] == "XNNPACK"
    assert entry["note"].startswith("measured on the CPU: ai-edge-litert has no GPU delegate")
    assert report["rows"][0]["note"] == entry["note"] and report["environment"]["device"] == "gpu"


# --- on a GPU ------------------------------------------------------------------------------------


@gpu
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)
def test_onnx_runs_on_cuda_like_on_the_cpu(tiny_pair, tiny_test_inputs):
    batch = tiny_test_inputs[0][:16]
    on_gpu = OnnxRunner(tiny_pair["onnx"], device="gpu")
    assert (on_gpu.device, on_gpu.provider) == ("gpu", CUDA)
    np.testing.assert_allclose(on_gpu.predict(batch), OnnxRunner(tiny_pair["onnx"]).predict(batch), atol=1e-4)


@gpu
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)
def test_bench_on_the_gpu_records_it(tiny_pair, tiny_test_inputs):
    inputs, labels = tiny_test_inputs
    cfg = BenchConfig(min_seconds=0, warmup=2, runs=5, threads=[1], batch_sizes=[1, 8], device="gpu", memory=False)
    report = bench({"onnx": tiny_pair["onnx"]}, inputs, labels, cfg).to_dict()
    assert {(e["device"], e["provider"]) for e in report["latency"]} == {("gpu", CUDA)}
    assert report["environment"]["gpus"] and CUDA in report["environment"]["onnx_providers"]


@gpu
@pytest.mark.skipif(not (shutil.which("nvidia-smi") and tf_gpus()), reason="needs a GPU TensorFlow can see")
def test_keras_runs_on_the_gpu(tiny_keras_file, trained_tiny, tiny_test_inputs):
    batch = tiny_test_inputs[0][:16]
    runner = KerasRunner(tiny_keras_file, device="gpu")
    assert (runner.device, runner.provider) == ("gpu", "/GPU:0")
    np.testing.assert_allclose(runner.predict(batch), trained_tiny.model.predict(batch, verbose=0), atol=1e-4)
