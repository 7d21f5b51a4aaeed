"""Runners: load a model file and run batches through it, one interface for every runtime.

Used by export validation and by bench. TFLite (ai-edge-litert) and ONNX Runtime runners import
no TensorFlow. Integer input tensors are quantized with the tensor's own scale and zero point and
integer outputs dequantized the same way, so every runner takes and returns float32.

Batches: a model whose batch dimension is dynamic runs any batch in one call (``native``); a TFLite
model exported with a fixed batch is resized with ``resize_tensor_input`` when its graph allows it
(``resized``); otherwise, and for a fixed-batch ONNX or Keras model, a batch runs as a loop of calls
of the model's own batch size (``loop``). :meth:`Runner.batch_mode` says which.

Devices: ``device="gpu"`` runs an ONNX model on ONNX Runtime's CUDA (or a requested TensorRT)
execution provider and a Keras model on TensorFlow's first GPU. A GPU that is requested but not
usable raises :class:`DeviceError`; nothing silently runs on the CPU instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import EdgesmithError, MissingDependencyError, ModelError

KERAS_SUFFIXES = (".keras", ".h5")
DEVICES = ("cpu", "gpu")
CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
GPU_INSTALL_HINT = ("pip install 'edgesmith[gpu]' (onnxruntime-gpu, in place of onnxruntime) on a machine with "
                    "an NVIDIA GPU, its driver and CUDA 12")
RUNTIME_MODULES = {".tflite": "ai_edge_litert.interpreter", ".onnx": "onnxruntime", ".keras": "edgesmith._keras",
                   ".h5": "edgesmith._keras"}
BATCH_MODES = ("native", "resized", "loop")


class DeviceError(EdgesmithError, RuntimeError):
    """A requested device (a GPU) or execution provider is not available here."""


def cpu_threads(threads: int) -> int:
    """``threads`` or, for 0, the number of cores this process may use."""
    return threads or len(os.sched_getaffinity(0))


def import_runtime(path: str | Path | None) -> None:
    """Import the runtime module a model file needs (so its import is not timed as part of a load)."""
    suffix = Path(path).suffix if path is not None and not Path(path).is_dir() else ".keras"
    module = RUNTIME_MODULES.get(suffix)
    if module and importlib.util.find_spec(module.split(".")[0]) is not None:
        importlib.import_module(module)


def fixed_chunks(batch: np.ndarray, size: int) -> list[np.ndarray]:
    """``batch`` cut into slices of ``size`` samples, the last one padded by repeating its last sample."""
    chunks = [batch[start : start + size] for start in range(0, len(batch), size)]
    last = chunks[-1]
    if len(last) < size:
        chunks[-1] = np.concatenate([last, np.repeat(last[-1:], size - len(last), axis=0)])
    return chunks


class Runner:
    """What every runner shares: batch-size handling (native, resized or looped) and predict.

    Subclasses set ``runtime``, ``threads``, ``device``, ``provider``, ``fixed_batch`` (the model's
    batch dimension when it is fixed, else None) and ``sample_shape``, and implement ``_bind`` and
    ``_latency`` for a batch the model accepts as it is.
    """

    runtime = ""
    device = "cpu"
    provider = ""
    fixed_batch: int | None = None
    sample_shape: tuple[Any, ...] = ()

    def batch_mode(self, batch: int) -> str:
        """How a batch of ``batch`` samples runs: ``native``, ``resized`` or ``loop`` (see the module doc)."""
        if self.fixed_batch is None or batch == self.fixed_batch:
            return "native"
        return "resized" if self._try_resize(batch) else "loop"

    def _try_resize(self, batch: int) -> bool:
        return False

    def bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """A zero-argument call that runs ``batch`` once (input copy, run, output read)."""
        return self._looped(batch) if self.batch_mode(len(batch)) == "loop" else self._bind(batch)

    def latency_call(self, batch: np.ndarray) -> Callable[[], Any]:
        """What latency times for ``batch``: the runtime's own call, or the loop of them (``loop`` mode)."""
        return self._looped(batch) if self.batch_mode(len(batch)) == "loop" else self._latency(batch)

    def _looped(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """One call per slice of the model's fixed batch size, the outputs joined (padding dropped)."""
        calls, count = [self._bind(chunk) for chunk in fixed_chunks(batch, self.fixed_batch)], len(batch)
        return lambda: np.concatenate([call() for call in calls])[:count]

    def _bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        raise NotImplementedError

    def _latency(self, batch: np.ndarray) -> Callable[[], Any]:
        return self._bind(batch)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.bind(batch)()


class TFLiteRunner(Runner):
    """A TFLite flatbuffer run by ai-edge-litert on the CPU (its default XNNPACK delegate)."""

    runtime = "ai-edge-litert"
    provider = "XNNPACK"

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.threads = cpu_threads(threads)
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
        except ValueError as exc:
            raise ModelError(f"{self.path}: not a loadable TFLite model ({exc})") from None
        self.interpreter.allocate_tensors()
        self._details()
        self._batch = int(self._input["shape"][0])
        signature = self._input.get("shape_signature", self._input["shape"])
        self.fixed_batch = None if int(signature[0]) == -1 else self._batch
        self.sample_shape = tuple(int(d) for d in self._input["shape"][1:])
        self._resizable: dict[int, bool] = {}

    def _details(self) -> None:
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._input["dtype"]).name

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self._input["index"], [batch, *self._input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._details()
            self._batch = batch

    def _try_resize(self, batch: int) -> bool:
        """Whether ``resize_tensor_input`` can give this fixed-batch graph ``batch`` rows (cached)."""
        if batch not in self._resizable:
            self._resizable[batch] = self._resize_works(batch)
        return self._resizable[batch]

    def _resize_works(self, batch: int) -> bool:
        try:
            self._resize(batch)
            works = int(self._output["shape"][0]) == batch
        except (RuntimeError, ValueError):  # an op with a hard-coded shape refuses the new batch
            works = False
        if not works:  # back to the shape the model was exported with
            self._batch = -1
            self._resize(self.fixed_batch)
        return works

    def _bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        self._resize(len(batch))
        data = quantize(batch, self._input)
        index, out_index, interpreter = self._input["index"], self._output["index"], self.interpreter

        def call() -> np.ndarray:
            interpreter.set_tensor(index, data)
            interpreter.invoke()
            return interpreter.get_tensor(out_index)

        return call

    def _latency(self, batch: np.ndarray) -> Callable[[], Any]:
        """``invoke`` alone, with ``batch`` written into the input tensor once beforehand.

        What latency measures: the interpreter keeps its input tensor between calls, so copying the
        same input again and reading the output would only add Python overhead to the number.
        """
        self._bind(batch)()
        return self.interpreter.invoke

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return dequantize(self.bind(batch)(), self._output)


class OnnxRunner(Runner):
    """An ONNX model run by ONNX Runtime: the CPU provider, or CUDA / TensorRT for ``device="gpu"``."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int = 0, providers: list[str] | None = None,
                 device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = cpu_threads(threads)
        chosen = onnx_providers(device, providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from None
        self.provider = check_provider_started(chosen, self.session.get_providers(), self.path)
        self.device = "gpu" if self.provider in GPU_PROVIDERS else "cpu"
        first = self.session.get_inputs()[0]
        self._input = first.name
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) and first.shape[0] > 0 else None
        self.sample_shape = tuple(first.shape[1:])
        self.input_dtype = "float32"

    def _bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        feed, session = {self._input: np.ascontiguousarray(batch, dtype=np.float32)}, self.session
        return lambda: session.run(None, feed)[0]

    def _latency(self, batch: np.ndarray) -> Callable[[], Any]:
        """``session.run`` on ``batch``, with the feed built once (ONNX Runtime has no separate invoke)."""
        feed, session = {self._input: np.ascontiguousarray(batch, dtype=np.float32)}, self.session
        return functools.partial(session.run, None, feed)


def onnx_providers(device: str, requested: list[str] | None, available: list[str]) -> list[str]:
    """The execution providers to ask ONNX Runtime for, in priority order.

    ``requested`` (e.g. ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``) wins when given;
    otherwise ``cpu`` means the CPU provider and ``gpu`` the CUDA provider (CPU kept for the nodes
    CUDA has no kernel for). TensorRT is only used when requested: building its engine takes minutes.

    Raises:
        DeviceError: a requested provider, or CUDA for ``gpu``, is not in this onnxruntime build.
    """
    _check_device(device)
    wanted = list(requested) if requested else (
        ["CUDAExecutionProvider", CPU_PROVIDER] if device == "gpu" else [CPU_PROVIDER])
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = GPU_INSTALL_HINT if any(p in GPU_PROVIDERS for p in missing) else "choose from the available ones"
        raise DeviceError(f"onnxruntime has no {', '.join(missing)} (available: {', '.join(available)}); {hint}")
    if device == "gpu" and not any(p in GPU_PROVIDERS for p in wanted):
        raise DeviceError(f"device 'gpu' with providers {wanted}: list CUDAExecutionProvider or "
                          "TensorrtExecutionProvider, or use device 'cpu'")
    if device == "cpu" and any(p in GPU_PROVIDERS for p in wanted):
        raise DeviceError(f"device 'cpu' with GPU providers {wanted}: set device = 'gpu' to use them")
    return wanted


def check_provider_started(wanted: list[str], started: list[str], path: Path) -> str:
    """The provider that runs the model; DeviceError when ONNX Runtime dropped the first one asked for.

    ONNX Runtime only logs an error and falls back to the CPU when a GPU provider's libraries (CUDA,
    cuDNN, TensorRT) fail to load; a GPU number must not silently be a CPU number.
    """
    if wanted[0] not in started:
        raise DeviceError(f"{path}: onnxruntime could not start {wanted[0]} (it started {', '.join(started)}); "
                          "check that the CUDA/cuDNN (and TensorRT) libraries onnxruntime-gpu needs are installed")
    return wanted[0]


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is unknown; choose from {', '.join(DEVICES)}")


def keras_device(device: str, gpus: list[Any]) -> str:
    """The TensorFlow device string for ``device`` given the GPUs TensorFlow sees (DeviceError if none)."""
    _check_device(device)
    if device == "cpu":
        return "/CPU:0"
    if not gpus:
        raise DeviceError("device 'gpu': TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty); "
                          "install a CUDA build (pip install 'tensorflow[and-cuda]') on a machine with an "
                          "NVIDIA GPU, or use device 'cpu'")
    return "/GPU:0"


def tensorflow_threads(threads: int) -> int:
    """Ask TensorFlow for ``threads`` intra-op threads; the count it really uses.

    TensorFlow has one thread pool per process, fixed when its runtime starts: once a model has run
    (training in the same process, an earlier artifact), the request cannot change it any more.
    """
    from edgesmith._keras import tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpu_threads(threads))
    except RuntimeError:  # "... cannot be modified after initialization"
        pass
    return cpu_threads(tf.config.threading.get_intra_op_parallelism_threads())


class KerasRunner(Runner):
    """A Keras 2 model (``.keras`` or ``.h5``) compiled in a ``tf.function``, on the CPU or the first GPU."""

    runtime = "tensorflow"

    def __init__(self, path_or_model: Any, *, threads: int = 0, device: str = "cpu") -> None:
        from edgesmith._keras import tf

        self.threads = tensorflow_threads(threads)
        self.provider = keras_device(device, tf.config.list_physical_devices("GPU"))
        self.device = device
        is_path = isinstance(path_or_model, str | Path)
        with tf.device(self.provider):
            self.model = load_keras_model(path_or_model) if is_path else path_or_model
        self.path = Path(path_or_model) if is_path else None
        placement = self.provider

        def run(x: Any) -> Any:
            with tf.device(placement):
                return self.model(x, training=False)

        self._call = tf.function(run, reduce_retracing=True)
        shape = self.model.input_shape
        self.fixed_batch = shape[0]
        self.sample_shape = tuple(shape[1:])
        self.input_dtype = "float32"

    def _bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """The compiled call with its output copied to NumPy: that copy is what waits for the result."""
        data = np.asarray(batch, dtype=np.float32)
        return lambda: self._call(data).numpy()


def load_keras_model(path: str | Path, *, trust: bool = False) -> Any:
    """Load a Keras 2 model saved by edgesmith (QAT scope included).

    ``.keras`` files load in Keras's safe mode: a Lambda layer (arbitrary Python code) is refused
    unless ``trust`` is set.
    """
    from edgesmith._keras import keras

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if path.suffix not in KERAS_SUFFIXES:
        raise ModelError(f"{path}: not a Keras model file (expected {' or '.join(KERAS_SUFFIXES)})")
    import tensorflow_model_optimization as tfmot

    from edgesmith.safety import trusted

    trust = trusted(trust)
    try:
        with tfmot.quantization.keras.quantize_scope():
            if path.suffix == ".keras":
                return keras.models.load_model(path, compile=False, safe_mode=not trust)
            return keras.models.load_model(path, compile=False)
    except Exception as exc:  # tf_keras raises OSError, ValueError, KeyError, TypeError, ... on foreign files
        if "Lambda" in str(exc) and "safe_mode" in str(exc):
            raise ModelError(
                f"{path}: holds a Lambda layer (arbitrary Python code), refused in safe mode; pass --trust "
                "(trust=True) only for a file from a source you trust"
            ) from None
        raise ModelError(
            f"{path}: cannot be loaded as a Keras 2 model ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None


def load_runner(path: str | Path, *, threads: int = 0, device: str = "cpu",
                providers: list[str] | None = None) -> TFLiteRunner | OnnxRunner | KerasRunner:
    """The runner for a model file, chosen by its suffix.

    Args:
        path: ``.tflite``, ``.onnx``, ``.keras`` or ``.h5``.
        threads: CPU threads (0: every core this process may use).
        device: ``cpu`` or ``gpu`` (ONNX and Keras; TFLite runs on the CPU only and refuses ``gpu``).
        providers: ONNX Runtime execution providers, overriding the device's default.

    Raises:
        ModelError: unknown suffix or unloadable file. DeviceError: the device cannot be used.
    """
    suffix = Path(path).suffix
    runners = {".tflite": TFLiteRunner, ".onnx": OnnxRunner, ".keras": KerasRunner, ".h5": KerasRunner}
    if suffix not in runners:
        raise ModelError(f"{path}: unknown model format {suffix!r}; expected one of {', '.join(runners)}")
    _check_device(device)
    if suffix == ".onnx":
        _require("onnxruntime", "pip install onnxruntime")
        return OnnxRunner(path, threads=threads, device=device, providers=providers)
    if suffix == ".tflite":
        if device != "cpu":
            raise DeviceError(f"{path}: ai-edge-litert runs TFLite on the CPU only here (no GPU delegate in its "
                              "Linux wheel); bench it with device 'cpu'")
        return TFLiteRunner(path, threads=threads)
    return KerasRunner(path, threads=threads, device=device)


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{module} is not installed; {hint}")


def quantize(batch: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float input -> the tensor's dtype, using its scale and zero point when it is an integer tensor."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return np.ascontiguousarray(batch, dtype=dtype)
    scale, zero = _quant_params(detail)
    info = np.iinfo(dtype)
    return np.clip(np.round(batch / scale + zero), info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An integer output tensor -> float32 with its scale and zero point (float passes through)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero = _quant_params(detail)
    return ((values.astype(np.float32) - zero) * scale).astype(np.float32)


def _quant_params(detail: dict[str, Any]) -> tuple[float, int]:
    params = detail.get("quantization_parameters", {})
    scales = params.get("scales", [])
    if len(scales) > 1:
        raise ModelError(
            f"tensor {detail['name']!r} is quantized per channel ({len(scales)} scales); "
            "per-channel input/output quantization is not supported, export with float I/O"
        )
    scale, zero = detail.get("quantization", (0.0, 0))
    if not scale:
        dtype = np.dtype(detail["dtype"]).name
        raise ModelError(f"tensor {detail['name']!r} is {dtype} but has no quantization scale")
    return float(scale), int(zero)
