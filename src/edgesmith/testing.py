"""pytest helpers: size, accuracy and latency budgets as plain assertions in a project's own tests.

    from edgesmith.testing import assert_within_budget

    def test_int8_model_fits_the_device():
        assert_within_budget("export/qat_int8.tflite", max_bytes=150_000, max_gzip_bytes="120 KB")

    def test_int8_model_is_accurate_and_fast():
        assert_within_budget("runs/cifar10/export/qat_int8.tflite", report="runs/cifar10",
                             min_top1=0.85, max_p50_ms=5.0)

Sizes are measured from the file itself; top-1 and p50 latency are read from a report.json row.
Importing this module imports no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.bench.budgets import RULES, CheckResult, evaluate, format_value, parse_budgets

__all__ = ["assert_within_budget"]
_REPORT_RULES = ("min_top1", "max_p50_ms")


def assert_within_budget(
    path_or_row: str | Path | dict[str, Any],
    *,
    max_bytes: int | str | None = None,
    max_gzip_bytes: int | str | None = None,
    min_top1: float | None = None,
    max_p50_ms: float | None = None,
    report: str | Path | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assert that a model file (or a report.json row) is within every limit given.

    Args:
        path_or_row: a model file or folder (sizes are measured from it), or a row of a report.json.
        max_bytes: bytes on disk, as a number or a size string such as ``"150 KB"``.
        max_gzip_bytes: bytes after gzip -9.
        min_top1: top-1 accuracy, a fraction (read from the report row).
        max_p50_ms: median latency in ms (read from the report row).
        report: a report.json (dict, file or run directory) holding the file's row, needed for
            ``min_top1`` and ``max_p50_ms`` when ``path_or_row`` is a path.

    Returns:
        The measured values (the row the limits were checked against).

    Raises:
        AssertionError: one or more limits are exceeded; the message lists each with the artifact,
            the measured value, the limit and by how much it is over.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this function's
    given = {"max_bytes": max_bytes, "max_gzip_bytes": max_gzip_bytes, "min_top1": min_top1,
             "max_p50_ms": max_p50_ms}
    given = {key: value for key, value in given.items() if value is not None}
    if not given:
        raise TypeError("assert_within_budget() needs at least one limit: " + ", ".join(RULES) + "=...")
    (budget,) = parse_budgets({_label(path_or_row): given}, origin="assert_within_budget")
    row = measured_row(path_or_row, report, need_gzip="max_gzip_bytes" in given,
                       need_report=any(key in given for key in _REPORT_RULES))
    failures = [r for r in (evaluate(RULES[k], row, v) for k, v in budget.limits.items()) if not r.passed]
    if failures:
        raise AssertionError(failure_message(_label(path_or_row), failures))
    return row


def _label(path_or_row: str | Path | dict[str, Any]) -> str:
    if isinstance(path_or_row, dict):
        return str(path_or_row.get("name", "report row"))
    return str(path_or_row)


def measured_row(path_or_row: str | Path | dict[str, Any], report: str | Path | dict[str, Any] | None, *,
                 need_gzip: bool, need_report: bool) -> dict[str, Any]:
    """The values to check: a report row as given, or sizes measured from a file plus its report row."""
    if isinstance(path_or_row, dict):
        return dict(path_or_row)
    from edgesmith.bench.measure import gzip_size
    from edgesmith.runs import disk_bytes

    path = Path(path_or_row)
    if not path.exists():
        raise FileNotFoundError(f"assert_within_budget: model file {path} does not exist")
    row: dict[str, Any] = {}
    if need_report:
        if report is None:
            raise TypeError("assert_within_budget: min_top1 and max_p50_ms are read from a report.json row; "
                            "pass report=RUN_DIR (or the report.json path, or its dict)")
        row.update(find_row(report, path))
    row.update(name=row.get("name", path.name), path=str(path), bytes=disk_bytes(path))
    if need_gzip:  # gzip -9 of a large model takes seconds: only when a limit needs it
        row["gzip_bytes"] = gzip_size(path)
    return row


def find_row(report: str | Path | dict[str, Any], path: Path) -> dict[str, Any]:
    """The report row of a model file: the row named like the file's stem, or whose file has its name."""
    from edgesmith.bench.report import load_report

    rows = (report if isinstance(report, dict) else load_report(report)).get("rows", [])
    by_name = [r for r in rows if r.get("name") == path.stem]
    by_file = [r for r in rows if Path(r.get("path") or "").name == path.name]
    for found in (by_name, by_file):
        if len(found) == 1:
            return found[0]
    names = ", ".join(str(r.get("name")) for r in rows) or "none"
    raise LookupError(f"assert_within_budget: no single report row for {path.name} (rows: {names}); "
                      "name the row by the file's stem, or pass the row itself")


def failure_message(label: str, failures: list[CheckResult]) -> str:
    lines = [f"{label} is over budget:"]
    for r in failures:
        rule = RULES[r.rule]
        sign = ">" if rule.ceiling else "<"
        lines.append(f"  {rule.field} {format_value(r, r.measured)} {sign} {r.rule} "
                     f"{format_value(r, r.limit, limit=True)}: {r.detail}"
                     if r.measured is not None else f"  {r.rule}: {r.detail}")
    return "\n".join(lines)
