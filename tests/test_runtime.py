"""Runners: one float32-in, float32-out interface over TFLite (int8 I/O included), ONNX Runtime and Keras."""

from __future__ import annotations

import numpy as np
import pytest

from edgesmith.errors import ModelError
from edgesmith.runtime import (
    KerasRunner,
    OnnxRunner,
    TFLiteRunner,
    dequantize,
    load_keras_model,
    load_runner,
    quantize,
)


def int8_detail(scale=0.5, zero=-3, name="x"):
    return {
        "name": name,
        "dtype": np.int8,
        "quantization": (scale, zero),
        "quantization_parameters": {"scales": np.array([scale]), "zero_points": np.array([zero])},
    }


def test_quantize_uses_scale_and_zero_point():
    x = np.array([[-1000.0, -1.0, 0.0, 0.24, 0.26, 10.0, 1000.0]], np.float32)
    q = quantize(x, int8_detail())
    assert q.dtype == np.int8
    assert q.tolist() == [[-128, -5, -3, -3, -2, 17, 127]]  # round(x / 0.5 - 3), clipped to int8
    np.testing.assert_array_equal(dequantize(q, int8_detail()), (q.astype(np.float32) + 3) * 0.5)
    assert dequantize(q, int8_detail()).dtype == np.float32


def test_float_tensors_pass_through():
    detail = {"name": "x", "dtype": np.float32, "quantization": (0.0, 0)}
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert quantize(x, detail).dtype == np.float32 and np.array_equal(quantize(x, detail), x)
    assert np.array_equal(dequantize(x, detail), x)


def test_quantization_parameter_errors():
    per_channel = int8_detail(name="input_1")
    per_channel["quantization_parameters"] = {"scales": np.array([0.1, 0.2]), "zero_points": np.array([0, 0])}
    with pytest.raises(ModelError, match=r"tensor 'input_1' is quantized per channel \(2 scales\)"):
        quantize(np.zeros((1, 2), np.float32), per_channel)
    with pytest.raises(ModelError, match=r"tensor 'y' is int8 but has no quantization scale"):
        dequantize(np.zeros(3, np.int8), int8_detail(scale=0.0, name="y"))


def test_int8_runner_quantizes_inputs_and_dequantizes_outputs(tiny_exports, trained_tiny, tiny_test_inputs):
    runner = TFLiteRunner(tiny_exports["tflite-int8"].path)
    assert runner.input_dtype == "int8"
    inputs = tiny_test_inputs[0][:100]
    # The bound input is the float batch quantized with the input tensor's own scale and zero point.
    scale, zero = runner._input["quantization"]
    assert scale > 0
    call = runner.bind(inputs[:4])
    raw = call()
    assert raw.dtype == np.int8
    np.testing.assert_array_equal(
        runner.interpreter.get_tensor(runner._input["index"]),
        np.clip(np.round(inputs[:4] / scale + zero), -128, 127).astype(np.int8),
    )
    # predict() returns dequantized probabilities close to the float model's.
    got = runner.predict(inputs)
    expected = trained_tiny.model.predict(inputs, verbose=0)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=0.05)
    assert np.abs(got - expected).max() < 0.15
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.9
    out_scale, out_zero = runner._output["quantization"]
    np.testing.assert_allclose(runner.predict(inputs[:4]), (raw.astype(np.float32) - out_zero) * out_scale)


def test_tflite_runner_resizes_for_any_batch(tiny_exports, trained_tiny, tiny_test_inputs):
    runner = TFLiteRunner(tiny_exports["tflite-float32"].path, threads=1)
    assert runner.threads == 1 and runner.input_dtype == "float32"
    for n in (1, 5, 2):
        batch = tiny_test_inputs[0][:n]
        np.testing.assert_allclose(
            runner.predict(batch), trained_tiny.model.predict(batch, verbose=0), atol=1e-5
        )


def test_keras_runner_from_file_and_model(tiny_keras_file, trained_tiny, tiny_test_inputs):
    batch = tiny_test_inputs[0][:8]
    expected = trained_tiny.model.predict(batch, verbose=0)
    from_file = load_runner(tiny_keras_file)
    assert isinstance(from_file, KerasRunner) and from_file.path == tiny_keras_file
    np.testing.assert_allclose(from_file.predict(batch), expected, atol=1e-6)
    np.testing.assert_allclose(KerasRunner(trained_tiny.model).predict(batch), expected, atol=1e-6)


def test_load_runner_picks_by_suffix(tiny_exports):
    assert isinstance(load_runner(tiny_exports["onnx-float32"].path), OnnxRunner)
    assert isinstance(load_runner(tiny_exports["tflite-float16"].path), TFLiteRunner)


def test_load_runner_errors(tmp_path):
    with pytest.raises(
        ModelError, match=r"unknown model format '\.pb'; expected one of \.tflite, \.onnx, \.keras, \.h5"
    ):
        load_runner(tmp_path / "model.pb")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelError, match=r"junk\.tflite: not a loadable TFLite model"):
        load_runner(tmp_path / "junk.tflite")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match=r"junk\.onnx: ONNX Runtime cannot load it"):
        load_runner(tmp_path / "junk.onnx")


def test_load_keras_model_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model file .*missing\.keras does not exist"):
        load_keras_model(tmp_path / "missing.keras")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model\.onnx: not a Keras model file \(expected \.keras or \.h5\)"):
        load_keras_model(tmp_path / "model.onnx")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match=r"broken\.h5: cannot be loaded as a Keras 2 model"):
        load_keras_model(tmp_path / "broken.h5")
