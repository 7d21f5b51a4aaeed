"""Runners: load a model file and run batches through it, one interface for every runtime.

Used by export validation and by bench. TFLite (ai-edge-litert) and ONNX Runtime runners import
no TensorFlow. Integer input tensors are quantized with the tensor's own scale and zero point and
integer outputs dequantized the same way, so every runner takes and returns float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import MissingDependencyError, ModelError

KERAS_SUFFIXES = (".keras", ".h5")


def cpu_threads(threads: int) -> int:
    """``threads`` or, for 0, the number of cores this process may use."""
    return threads or len(os.sched_getaffinity(0))


class TFLiteRunner:
    """A TFLite flatbuffer run by ai-edge-litert (XNNPACK on CPU)."""

    runtime = "ai-edge-litert"

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.threads = cpu_threads(threads)
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
        except ValueError as exc:
            raise ModelError(f"{self.path}: not a loadable TFLite model ({exc})") from None
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = int(self._input["shape"][0])

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._input["dtype"]).name

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            shape = [batch, *self._input["shape"][1:]]
            self.interpreter.resize_tensor_input(self._input["index"], shape)
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._batch = batch

    def bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """A zero-argument call that runs ``batch`` once (input copy, invoke, output read)."""
        self._resize(len(batch))
        data = quantize(batch, self._input)
        index, out_index, interpreter = self._input["index"], self._output["index"], self.interpreter

        def call() -> np.ndarray:
            interpreter.set_tensor(index, data)
            interpreter.invoke()
            return interpreter.get_tensor(out_index)

        return call

    def latency_call(self, batch: np.ndarray) -> Callable[[], Any]:
        """``invoke`` alone, with ``batch`` written into the input tensor once beforehand.

        What latency measures: the interpreter keeps its input tensor between calls, so copying the
        same input again and reading the output would only add Python overhead to the number.
        """
        self.bind(batch)()
        return self.interpreter.invoke

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return dequantize(self.bind(batch)(), self._output)


class OnnxRunner:
    """An ONNX model run by ONNX Runtime on the CPU execution provider."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int = 0, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = cpu_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from None
        self._input = self.session.get_inputs()[0].name
        self.input_dtype = "float32"

    def bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        feed, session = {self._input: np.ascontiguousarray(batch, dtype=np.float32)}, self.session
        return lambda: session.run(None, feed)[0]

    def latency_call(self, batch: np.ndarray) -> Callable[[], Any]:
        """``session.run`` on ``batch``, with the feed built once (ONNX Runtime has no separate invoke)."""
        feed, session = {self._input: np.ascontiguousarray(batch, dtype=np.float32)}, self.session
        return functools.partial(session.run, None, feed)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.bind(batch)()


class KerasRunner:
    """A Keras 2 model (``.keras`` or ``.h5``) run eagerly-compiled in a ``tf.function``."""

    runtime = "tensorflow"

    def __init__(self, path_or_model: Any, *, threads: int = 0) -> None:
        from edgesmith._keras import tf

        self.threads = cpu_threads(threads)
        is_path = isinstance(path_or_model, str | Path)
        self.model = load_keras_model(path_or_model) if is_path else path_or_model
        self.path = Path(path_or_model) if is_path else None
        self._call = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        self.input_dtype = "float32"

    def bind(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        data = np.asarray(batch, dtype=np.float32)
        return lambda: self._call(data).numpy()

    def latency_call(self, batch: np.ndarray) -> Callable[[], Any]:
        """The compiled call with its output copied to NumPy: that copy is what waits for the result."""
        return self.bind(batch)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.bind(batch)()


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


def load_runner(path: str | Path, *, threads: int = 0) -> TFLiteRunner | OnnxRunner | KerasRunner:
    """The runner for a model file, chosen by its suffix."""
    suffix = Path(path).suffix
    runners = {".tflite": TFLiteRunner, ".onnx": OnnxRunner, ".keras": KerasRunner, ".h5": KerasRunner}
    if suffix not in runners:
        raise ModelError(f"{path}: unknown model format {suffix!r}; expected one of {', '.join(runners)}")
    if suffix == ".onnx":
        _require("onnxruntime", "pip install onnxruntime")
    return runners[suffix](path, threads=threads)


def _require(module: str, hint: str) -> None:
    import importlib.util

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
