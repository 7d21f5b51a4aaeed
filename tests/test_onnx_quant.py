"""ONNX Runtime int8: variants by name, CPU-dependent defaults, selection, and no ConvInteger."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgesmith.errors import ExportValidationError, ModelError, RecipeError
from edgesmith.export.onnx_quant import (
    DYNAMIC,
    VariantResult,
    _pick,
    check_no_conv_integer,
    default_variants,
    parse_variant,
    quantize_onnx,
    to_input_layout,
)
from edgesmith.recipe import ONNX_INT8_VARIANTS, ExportConfig, recipe_from_dict
from edgesmith.runtime import load_runner


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_variant_names_parse():
    v = parse_variant("qoperator-tensor-entropy-s8s8-rr")
    assert (v.format, v.per_channel, v.calibration, v.activations, v.weights, v.reduce_range) == (
        "qoperator", False, "entropy", "int8", "int8", True)
    v = parse_variant("qdq-channel-percentile-u8s8")
    assert (v.format, v.per_channel, v.activations, v.reduce_range) == ("qdq", True, "uint8", False)
    assert parse_variant(DYNAMIC).dynamic
    assert all(parse_variant(name).name == name for name in ONNX_INT8_VARIANTS)  # the recipe's list parses


@pytest.mark.parametrize("name", ["qdq-channel-minmax", "qdq-row-minmax-u8s8", "qdq-channel-kl-u8s8",
                                  "qdq-channel-minmax-s8u8-xx", "dynamic"])
def test_bad_variant_names_say_how_to_write_one(name):
    with pytest.raises(ModelError, match=rf"ONNX int8 variant '{name}' is not valid; write <qdq\|qoperator>-"):
        parse_variant(name)


def test_recipe_rejects_unknown_variants():
    with pytest.raises(RecipeError, match=r"export.onnx_int8_variants = 'qdq-channel-kl-u8s8' is not allowed"):
        recipe_from_dict({"export": {"onnx_int8_variants": ["qdq-channel-kl-u8s8"]}})


def test_defaults_depend_on_the_cpu():
    with_vnni = default_variants({"avx2", "avx512_vnni"})
    without = default_variants({"avx2", "fma"})
    assert with_vnni and not any(name.endswith("-rr") for name in with_vnni)
    assert without == [name + "-rr" for name in with_vnni]  # 7-bit weights where int16 sums would saturate
    assert all(parse_variant(name).per_channel for name in with_vnni)
    assert DYNAMIC not in with_vnni and DYNAMIC in default_variants({"avx_vnni"}, has_conv=False)


def test_nhwc_samples_follow_the_model_layout():
    samples = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    assert to_input_layout(samples, ["N", 4, 5, 3]).shape == (2, 4, 5, 3)
    nchw = to_input_layout(samples, ["N", 3, 4, 5])
    assert nchw.shape == (2, 3, 4, 5) and nchw[1, 2, 3, 4] == samples[1, 3, 4, 2]


def test_pick_prefers_agreement_then_speed():
    results = [VariantResult("a", 0.95, 0.01, 1.0), VariantResult("b", 0.99, 0.01, 2.0),
               VariantResult("c", 0.985, 0.01, 1.5), VariantResult("d", outcome="failed: boom")]
    chosen = _pick(results, slack=0.01)
    assert chosen.name == "c" and chosen.outcome.startswith("kept: fastest of 2")
    assert results[0].outcome.startswith("lost: agreement 95.00% more than 1.0% below the best 99.00%")
    assert results[1].outcome.startswith("lost: slower (2.00 ms vs 1.50 ms)")
    assert results[3].outcome == "failed: boom"
    assert _pick(results, slack=0.0).name == "b"


def test_pick_with_no_variant_left():
    with pytest.raises(ExportValidationError, match=r"no ONNX int8 variant could be made: x: failed: boom"):
        _pick([VariantResult("x", outcome="failed: boom")], slack=0.01)


def test_onnx_int8_export_keeps_the_best_variant(tiny_exports):
    result = tiny_exports["onnx-int8"]
    report = result.details
    names = [v["name"] for v in report["variants"]]
    assert names == default_variants(has_conv=True) and report["chosen"] in names
    assert report["calibration_samples"] + report["held_out_samples"] == 100
    kept = [v for v in report["variants"] if v["outcome"].startswith("kept")]
    assert [v["name"] for v in kept] == [report["chosen"]]
    assert all(v["outcome"].startswith(("lost", "failed")) for v in report["variants"] if v not in kept)
    assert "QuantizeLinear" in op_types(result.path) or "QLinearConv" in op_types(result.path)
    assert "ConvInteger" not in op_types(result.path)
    assert result.bytes == next(v["bytes"] for v in kept)
    assert result.validation.passed and result.validation.top1_agreement >= 0.9


def test_every_static_kind_quantizes_the_convolutions(tiny_exports, tiny_train_inputs, tmp_path):
    variants = ["qdq-tensor-entropy-s8s8", "qoperator-channel-percentile-u8s8-rr", "qdq-channel-minmax-u8u8"]
    report = quantize_onnx(tiny_exports["onnx-float32"].path, tmp_path / "int8.onnx", tiny_train_inputs[0][:40],
                           ExportConfig(), variants=variants, keep_dir=tmp_path / "all")
    assert [v.outcome.split(":")[0] for v in report.variants].count("kept") == 1
    assert all(v.top1_agreement is not None and v.top1_agreement > 0.5 for v in report.variants)
    assert "QLinearConv" in op_types(tmp_path / "all" / "qoperator-channel-percentile-u8s8-rr.onnx")
    for name in ("qdq-tensor-entropy-s8s8", "qdq-channel-minmax-u8u8"):
        assert "QuantizeLinear" in op_types(tmp_path / "all" / f"{name}.onnx")


def test_dynamic_quantizes_matmul_only_and_never_conv(tiny_exports, tiny_train_inputs, tmp_path):
    report = quantize_onnx(tiny_exports["onnx-float32"].path, tmp_path / "dyn.onnx", tiny_train_inputs[0][:30],
                           ExportConfig(), variants=[DYNAMIC])
    assert report.chosen == DYNAMIC
    ops = op_types(tmp_path / "dyn.onnx")
    assert "MatMulInteger" in ops and "Conv" in ops and "ConvInteger" not in ops
    got = load_runner(tmp_path / "dyn.onnx").predict(tiny_train_inputs[0][:5])
    assert got.shape == (5, 10)


def test_conv_integer_is_refused(tiny_exports, tmp_path):
    """What an unrestricted quantize_dynamic makes of a CNN, and why edgesmith restricts it."""
    from onnxruntime.quantization import quantize_dynamic

    path = tmp_path / "conv_integer.onnx"
    quantize_dynamic(tiny_exports["onnx-float32"].path, path)
    assert "ConvInteger" in op_types(path)
    with pytest.raises(ExportValidationError, match=r"conv_integer\.onnx: \d+ ConvInteger nodes .* quantize "
                       r"convolutions statically \(QDQ\) instead"):
        check_no_conv_integer(path)


def test_onnx_int8_needs_calibration(trained_tiny, tmp_path):
    from edgesmith.export import export

    with pytest.raises(ModelError, match=r"full-integer export needs calibration data"):
        export(trained_tiny.model, "onnx-int8", ExportConfig(), spec=trained_tiny.spec, out_dir=tmp_path)
    assert not list(tmp_path.glob("*.onnx"))
