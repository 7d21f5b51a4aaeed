"""edgesmith.testing: assert_within_budget on model files and report rows, with readable failures."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest

from edgesmith.bench.budgets import BudgetError
from edgesmith.testing import assert_within_budget
from tiny_artifacts import make_report, make_row, standard_report, tiny_tflite, write_run


@pytest.fixture
def blob(tmp_path):
    """A 10,000-byte 'model' file of which gzip keeps very little."""
    path = tmp_path / "model_int8.tflite"
    path.write_bytes(b"\0" * 10_000)
    return path


def test_sizes_are_measured_from_the_file(blob):
    gz = len(gzip.compress(blob.read_bytes(), compresslevel=9))
    row = assert_within_budget(blob, max_bytes=10_000, max_gzip_bytes=gz)
    assert row["bytes"] == 10_000 and row["gzip_bytes"] == gz
    assert_within_budget(str(blob), max_bytes="10 KB")


def test_over_max_bytes_says_by_how_much(blob):
    expected = (r"model_int8\.tflite is over budget:\n"
                r"  bytes 10,000 B > max_bytes 9,000 B: over by 1,000 B \(\+11\.1%\)$")
    with pytest.raises(AssertionError, match=expected):
        assert_within_budget(blob, max_bytes=9000)


def test_every_violation_is_listed(blob):
    with pytest.raises(AssertionError) as info:
        assert_within_budget(blob, max_bytes=9000, max_gzip_bytes=10)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("  bytes 10,000 B > max_bytes 9,000 B")
    assert lines[2].startswith("  gzip_bytes ") and "> max_gzip_bytes 10 B: over by" in lines[2]


def test_top1_and_p50_come_from_the_report(tmp_path, blob):
    run = write_run(tmp_path / "run", make_report(make_row("model_int8", bytes_=1, top1=0.88, p50=2.5)))
    row = assert_within_budget(blob, report=run, max_bytes=10_000, min_top1=0.85, max_p50_ms=3)
    assert (row["bytes"], row["top1"], row["latency_p50_ms"]) == (10_000, 0.88, 2.5)  # bytes from the file
    with pytest.raises(AssertionError, match=r"top1 88\.00% < min_top1 90\.00%: under by 2\.00 percentage"):
        assert_within_budget(blob, report=run / "report.json", min_top1=0.9)
    with pytest.raises(AssertionError, match=r"latency_p50_ms 2\.500 ms > max_p50_ms 2\.000 ms: over by 0"):
        assert_within_budget(blob, report=run, max_p50_ms=2)


def test_a_report_row_can_be_checked_directly():
    row = standard_report(int8_bytes=130_000)["rows"][1]
    assert_within_budget(row, min_top1=0.9)
    with pytest.raises(AssertionError, match=r"^pruned_int8 is over budget:\n  bytes 130,000 B > max_bytes"):
        assert_within_budget(row, max_bytes=120_000)
    keras_row = make_row("float_keras", fmt="keras", bytes_=None)
    with pytest.raises(AssertionError, match=r"max_bytes: not measured: the row has no bytes"):
        assert_within_budget(keras_row, max_bytes=1)


def test_the_report_row_is_found_by_file_name(tmp_path, blob):
    report = make_report(make_row("quantized", top1=0.5, path="export/model_int8.tflite"))
    with pytest.raises(AssertionError, match=r"top1 50\.00% < min_top1"):
        assert_within_budget(blob, report=report, min_top1=0.6)
    with pytest.raises(LookupError, match=r"no single report row for model_int8\.tflite \(rows: quantized\)"):
        assert_within_budget(blob, report=make_report(make_row("quantized")), min_top1=0.6)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({}, TypeError, r"needs at least one limit: max_bytes, max_gzip_bytes, min_top1"),
        ({"min_top1": 0.5}, TypeError, r"pass report=RUN_DIR"),
        ({"min_top1": 85}, BudgetError, r"min_top1: top-1 is a fraction from 0 to 1, got 85"),
        ({"max_bytes": "big"}, BudgetError, r"max_bytes: expected a positive whole number of bytes"),
    ],
    ids=["no-limit", "no-report", "top1-percent", "bad-size"],
)
def test_misuse_is_an_error_not_a_failed_budget(blob, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        assert_within_budget(blob, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model file .*gone\.tflite does not exist"):
        assert_within_budget(tmp_path / "gone.tflite", max_bytes=1)


def test_importing_the_helpers_imports_no_tensorflow(tmp_path, blob):
    code = ("import sys; from edgesmith.testing import assert_within_budget; "
            f"assert_within_budget({str(blob)!r}, max_bytes=10_000, max_gzip_bytes=10_000); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_on_a_real_tflite_file(tmp_path):
    model = tiny_tflite(tmp_path / "dense_int8.tflite", hidden=16)
    size = model.stat().st_size
    assert_within_budget(model, max_bytes=size)
    expected = (rf"dense_int8\.tflite is over budget:\n"
                rf"  bytes {size:,} B > max_bytes {size - 100:,} B: over by 100 B")
    with pytest.raises(AssertionError, match=expected):
        assert_within_budget(model, max_bytes=size - 100)
