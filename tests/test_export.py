"""Export: every format writes a file that is validated against its source model before it counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ExportValidationError, ModelError
from edgesmith.export import EXPORTERS, export, validate_artifact
from edgesmith.export.validate import predict_in_batches
from edgesmith.recipe import EXPORT_FORMATS, ExportConfig
from edgesmith.runtime import OnnxRunner, load_runner
from edgesmith.zoo import build_classifier

FLOAT_FORMATS = {"tflite-float32", "onnx-float32"}


def test_exporters_cover_the_recipe_formats():
    assert list(EXPORTERS) == list(EXPORT_FORMATS)


@pytest.mark.parametrize("fmt", list(EXPORTERS))
def test_export_writes_a_validated_file(fmt, tiny_exports, trained_tiny, tiny_test_inputs):
    result = tiny_exports[fmt]
    assert result.format == fmt
    assert result.path.is_file()
    assert result.path.suffix == (".onnx" if fmt.startswith("onnx") else ".tflite")
    assert result.bytes == result.path.stat().st_size > 1000
    assert PreprocessSpec.load_beside(result.path) == trained_tiny.spec  # the spec travels with the artifact
    v = result.validation
    assert v.passed and v.samples == 200
    cfg = ExportConfig()
    if fmt in FLOAT_FORMATS:
        assert v.max_abs_diff_limit == cfg.max_abs_diff_float and v.max_abs_diff <= 1e-4
        assert v.top1_agreement == 1.0 and v.min_top1_agreement == cfg.min_top1_agreement
    else:
        assert v.max_abs_diff_limit is None
        assert v.top1_agreement >= v.min_top1_agreement
        assert 0 < v.max_abs_diff < 0.2  # quantized: different, but not wildly
    # The recorded numbers are what the artifact really does on those inputs.
    inputs = tiny_test_inputs[0][:200]
    expected = trained_tiny.model.predict(inputs, verbose=0)
    got = predict_in_batches(load_runner(result.path), inputs)
    assert float(np.abs(expected - got).max()) == pytest.approx(v.max_abs_diff, rel=1e-3, abs=1e-6)
    assert float(np.mean(expected.argmax(-1) == got.argmax(-1))) == v.top1_agreement
    json.dumps(result.to_dict())  # manifest-ready


# (onnx-int8 is left out: on a model this tiny, QDQ's scale and zero-point tensors outweigh the saved bytes)
@pytest.mark.parametrize("fmt", [f for f in EXPORTERS if f.startswith("tflite") and f not in FLOAT_FORMATS])
def test_quantized_formats_are_smaller(fmt, tiny_exports):
    assert tiny_exports[fmt].bytes < tiny_exports["tflite-float32"].bytes


def test_unknown_format_lists_the_formats(trained_tiny, tmp_path):
    with pytest.raises(
        ModelError, match=r"unknown export format 'tflite-int4'; choose from " + ", ".join(EXPORTERS)
    ):
        export(trained_tiny.model, "tflite-int4", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_int8_without_calibration_data(trained_tiny, tmp_path):
    with pytest.raises(ModelError, match=r"full-integer export needs calibration data"):
        export(trained_tiny.model, "tflite-int8", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path)
    assert not (tmp_path / "model.tflite").exists()  # atomic: nothing half-written is left


def test_export_without_validation_inputs(trained_tiny, tmp_path):
    result = export(
        trained_tiny.model, "tflite-float32", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path
    )
    assert result.validation is None and result.path == tmp_path / "model.tflite" and result.path.is_file()


def test_failed_validation_raises_and_keeps_the_file_aside(
    trained_tiny, tiny_test_inputs, tmp_path, monkeypatch
):
    """An exporter that writes a different model's artifact is caught by validation."""
    other, _ = build_classifier("tiny_cnn", num_classes=10, input_size=16, dense_units=32)
    real = EXPORTERS["tflite-float32"]
    monkeypatch.setitem(EXPORTERS, "tflite-float32", lambda model, path, *args: real(other, path, *args))
    with pytest.raises(
        ExportValidationError,
        match=r"failed validation on 100 inputs: max \|difference\| .* > 0\.001; "
        r"top-1 agreement 0\.\d+ < 0\.9800",
    ) as info:
        export(
            trained_tiny.model,
            "tflite-float32",
            ExportConfig(),
            spec=trained_tiny.spec,
            out_dir=tmp_path,
            name="broken",
            validation_inputs=tiny_test_inputs[0][:100],
        )
    assert str(tmp_path / "broken") in str(info.value)
    assert (tmp_path / "broken.failed.tflite").is_file()
    assert not (tmp_path / "broken.tflite").exists()
    assert (tmp_path / "preprocess.json").is_file()


def test_failed_validation_error_names_the_kept_file(trained_tiny, tiny_test_inputs, tmp_path, monkeypatch):
    other, _ = build_classifier("tiny_cnn", num_classes=10, input_size=16, dense_units=32)
    real = EXPORTERS["onnx-float32"]
    monkeypatch.setitem(EXPORTERS, "onnx-float32", lambda model, path, *args: real(other, path, *args))
    with pytest.raises(ExportValidationError) as info:
        export(
            trained_tiny.model,
            "onnx-float32",
            ExportConfig(),
            spec=trained_tiny.spec,
            out_dir=tmp_path,
            name="broken",
            validation_inputs=tiny_test_inputs[0][:50],
        )
    assert (tmp_path / "broken.failed.onnx").is_file()
    assert "broken.failed.onnx" in str(info.value)


def test_validate_artifact_collects_every_failure(tiny_exports, tiny_test_inputs):
    other, _ = build_classifier("tiny_cnn", num_classes=10, input_size=16, dense_units=32)
    artifact = tiny_exports["onnx-float32"].path
    with pytest.raises(ExportValidationError, match=r"max \|difference\| .*; top-1 agreement"):
        validate_artifact(
            other, artifact, tiny_test_inputs[0][:50], max_abs_diff=1e-3, min_top1_agreement=0.98
        )
    assert artifact.is_file()  # validate_artifact itself never moves files


def test_onnx_has_a_dynamic_batch_dimension(tiny_exports, trained_tiny, tiny_test_inputs):
    runner = OnnxRunner(tiny_exports["onnx-float32"].path)
    batch_dim = runner.session.get_inputs()[0].shape[0]
    assert not isinstance(batch_dim, int), f"batch dimension is fixed to {batch_dim}"
    for batch in (tiny_test_inputs[0][:3], tiny_test_inputs[0][:1], tiny_test_inputs[0][:17]):
        got = runner.predict(batch)
        assert got.shape == (len(batch), 10)
        np.testing.assert_allclose(got, trained_tiny.model.predict(batch, verbose=0), atol=1e-5)
