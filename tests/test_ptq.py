"""Post-training quantization: full-integer TFLite variants, representative data checks, the
integer-only check on the flatbuffer and the quantization debugger, on the tiny digits model."""

from __future__ import annotations

import numpy as np
import pytest

from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import DataError, ExportValidationError
from edgesmith.export import EXPORTERS, export
from edgesmith.export import convert as convert_module
from edgesmith.export.debug import debug_quantization, gap_exceeds
from edgesmith.export.inspect import check_integer_only, float_ops, read_ops
from edgesmith.export.representative import check_representative, expected_range
from edgesmith.recipe import ExportConfig
from edgesmith.runtime import TFLiteRunner

# format -> dtype of the file's input and output tensors
INTEGER_FORMATS = {"tflite-int8": "int8", "tflite-int8-float-io": "float32", "tflite-uint8": "uint8",
                   "tflite-int16x8": "int16"}


@pytest.mark.parametrize(("fmt", "io_dtype"), list(INTEGER_FORMATS.items()))
def test_integer_formats_have_their_io_types_and_no_float_op(fmt, io_dtype, tiny_exports):
    result = tiny_exports[fmt]
    runner = TFLiteRunner(result.path)
    output = runner.interpreter.get_output_details()[0]
    assert runner.input_dtype == io_dtype and np.dtype(output["dtype"]).name == io_dtype
    assert float_ops(result.path) == []
    assert any(note.startswith("integer only: none of the") for note in result.notes)
    assert result.validation.passed


def test_int16x8_keeps_int16_activations_and_int8_weights(tiny_exports):
    def conv_output_types(fmt):
        return {t for op in read_ops(tiny_exports[fmt].path) if op.name == "CONV_2D" for t in op.output_types}

    assert conv_output_types("tflite-int16x8") == {"INT16"}
    assert conv_output_types("tflite-int8") == {"INT8"}
    # 16-bit activations lose less than 8-bit ones on the same inputs
    assert tiny_exports["tflite-int16x8"].validation.max_abs_diff < tiny_exports["tflite-int8"].validation.max_abs_diff


def test_integer_io_is_quantized_with_each_tensors_own_scale(tiny_exports, tiny_test_inputs):
    """uint8, int8 and float-I/O files of the same calibration give nearly the same probabilities."""
    inputs = tiny_test_inputs[0][:50]
    float_io = TFLiteRunner(tiny_exports["tflite-int8-float-io"].path).predict(inputs)
    for fmt in ("tflite-uint8", "tflite-int8"):
        runner = TFLiteRunner(tiny_exports[fmt].path)
        scale, zero = runner.interpreter.get_input_details()[0]["quantization"]
        assert scale > 0 and (zero == -128 if fmt == "tflite-int8" else zero == 0)  # the [0, 1] range of 'unit'
        np.testing.assert_allclose(runner.predict(inputs), float_io, atol=0.02)


def test_float_ops_are_named(tiny_exports):
    with pytest.raises(ExportValidationError, match=r"not integer only: \d+ of \d+ operators compute in float: "
                       r"CONV_2D \(operator 0, writes '.*' float32\)"):
        check_integer_only(tiny_exports["tflite-float32"].path)
    hybrid = {op.name for op in float_ops(tiny_exports["tflite-dynamic"].path)}
    assert "FULLY_CONNECTED" in hybrid  # dynamic range: int8 weights, float compute
    dequantized = {op.name for op in float_ops(tiny_exports["tflite-float16"].path)}
    assert "DEQUANTIZE" in dequantized  # float16 weights are turned into float32 at run time


def test_float_io_boundary_ops_are_not_counted(tiny_exports):
    ops = read_ops(tiny_exports["tflite-int8-float-io"].path)
    assert ops[0].name == "QUANTIZE" and ops[-1].name == "DEQUANTIZE" and ops[-1].io_boundary
    assert check_integer_only(tiny_exports["tflite-int8-float-io"].path) == len(ops)


def test_export_refuses_an_int8_file_with_float_ops(trained_tiny, tiny_train_inputs, tmp_path, monkeypatch):
    """A converter that quietly leaves float ops behind is caught from the file itself."""
    monkeypatch.setitem(EXPORTERS, "tflite-int8", convert_module._tflite_exporter("dynamic"))
    with pytest.raises(ExportValidationError, match=r"broken\.failed\.tflite: not integer only: .*FULLY_CONNECTED"):
        export(trained_tiny.model, "tflite-int8", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path,
               name="broken", calibration=tiny_train_inputs[0][:50])
    assert not (tmp_path / "broken.tflite").exists() and (tmp_path / "broken.failed.tflite").is_file()


# --- representative data ---------------------------------------------------------------------------

UNIT = PreprocessSpec((16, 16), "unit")


def _good(n=20, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)


def test_good_representative_data_passes():
    check_representative(_good(), UNIT, input_shape=(16, 16, 3))


@pytest.mark.parametrize(("make", "message"), [
    (lambda x: x.astype(np.float64), r"representative data is float64; expected float32"),
    (lambda x: list(x), r"representative data is list; expected float32"),
    (lambda x: x[:, :8], r"has shape \(20, 8, 16, 3\); the model expects \(N, 16, 16, 3\)"),
    (lambda x: x[:0], r"has shape \(0, 16, 16, 3\)"),
    (lambda x: np.concatenate([x, x[3:5]]), r"2 of 22 samples are duplicates \(sample 20 = 3, 21 = 4\)"),
    (lambda x: x * 255, r"values span \[.*\], which goes outside the training range \[0, 1\] of preprocessing "
                        r"mode 'unit'"),
    (lambda x: x * 0.5, r"which covers only part of the training range \[0, 1\]"),
    (lambda x: np.where(np.arange(20)[:, None, None, None] == 7, np.nan, x).astype(np.float32),
     r"samples 7 hold NaN or infinite values"),
])
def test_bad_representative_data_is_named(make, message):
    with pytest.raises(DataError, match=message):
        check_representative(make(_good()), UNIT, input_shape=(16, 16, 3))


def test_tf_mode_rejects_unit_range_samples():
    """[0, 1] samples for a [-1, 1] model: inside the range, but preprocessed differently from training."""
    spec = PreprocessSpec((16, 16), "tf")
    check_representative(_good() * 2 - 1, spec, input_shape=(16, 16, 3))
    with pytest.raises(DataError, match=r"covers only part of the training range \[-1, 1\] of preprocessing mode 'tf'"):
        check_representative(_good(), spec, input_shape=(16, 16, 3))


@pytest.mark.parametrize("mode", ["tf", "unit", "caffe", "torch", "raw"])
def test_expected_range_is_what_normalize_gives_for_0_and_255(mode):
    spec = PreprocessSpec((1, 1), mode)
    pixels = np.array([[[[0, 0, 0]], [[255, 255, 255]], [[255, 0, 0]], [[0, 0, 255]]]], dtype=np.float32)
    values = spec.normalize(pixels)
    low, high = expected_range(spec)
    assert values.min() == pytest.approx(low, abs=1e-4) and values.max() == pytest.approx(high, abs=1e-4)


def test_export_checks_the_representative_data_first(trained_tiny, tiny_train_inputs, tmp_path):
    raw_pixels = tiny_train_inputs[0][:50] * 255  # not normalized like training
    with pytest.raises(DataError, match=r"goes outside the training range \[0, 1\]"):
        export(trained_tiny.model, "tflite-uint8", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path,
               calibration=raw_pixels)
    assert list(tmp_path.iterdir()) == []


# --- quantization debugger -----------------------------------------------------------------------

def test_gap_exceeds():
    assert gap_exceeds(0.86, 0.84, 1.0) and not gap_exceeds(0.86, 0.851, 1.0)
    assert not gap_exceeds(0.86, 0.85, 1.0)  # exactly 1 point is within
    assert gap_exceeds(1.0, 0.98, 1.0) and not gap_exceeds(1.0, 0.5, 0.0)  # 0 disables


def test_debugger_ranks_layers_by_error(trained_tiny, tiny_train_inputs, tiny_test_inputs):
    report = debug_quantization(trained_tiny.model, tiny_train_inputs[0][:20], tiny_test_inputs[0][:8], top=3)
    layers = report["layers"]
    assert 1 <= len(layers) <= 3
    errors = [layer["rmse_over_scale"] for layer in layers]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0
    assert all(layer["scale"] > 0 and layer["tensor"] for layer in layers)


def test_export_records_the_debugger_when_too_many_predictions_change(
        trained_tiny, tiny_train_inputs, tiny_test_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr("edgesmith.export.debug.gap_exceeds", lambda *args: True)
    result = export(trained_tiny.model, "tflite-int8", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path,
                    calibration=tiny_train_inputs[0][:50], validation_inputs=tiny_test_inputs[0][:20])
    assert result.details["quantization_debug"]["layers"]
    assert "quantization_debug" in result.to_dict()["details"]


@pytest.mark.parametrize("fmt", ["tflite-int8", "tflite-int8-float-io", "tflite-uint8"])
def test_debugger_runs_exactly_when_the_gap_is_exceeded(fmt, tiny_exports):
    result = tiny_exports[fmt]
    exceeded = gap_exceeds(1.0, result.validation.top1_agreement, ExportConfig().debug_gap_points)
    assert ("quantization_debug" in result.details) == exceeded
