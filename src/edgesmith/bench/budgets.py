"""Budgets and regression gates: limits per artifact (or glob) checked against a run's report.json.

A ``budgets.toml`` holds one table per artifact name or glob; the glob is matched (``fnmatch``,
case-sensitive) against each report row's name and against its file name::

    ["*_int8"]              # every int8 artifact
    max_bytes = "150 KB"    # bytes on disk (an integer, or a string with B/KB/MB/KiB/MiB)
    max_gzip_bytes = 120000
    max_growth_pct = 5      # bytes growth against --baseline, in percent
    max_p50_growth_pct = 20 # p50 latency growth against --baseline, in percent

    [float_keras]
    min_top1 = 0.95         # a fraction, 0..1
    max_p50_ms = 4.0

:func:`check` returns one :class:`CheckResult` per artifact and rule. A table that matches no
artifact fails (a misspelt name must not pass silently); a growth rule is skipped, visibly, when no
baseline is given or the baseline has no row of that name.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError


class BudgetError(EdgesmithError, ValueError):
    """A budgets file is missing or malformed, or a budget key or value is not allowed."""


@dataclass(frozen=True)
class Rule:
    """What one budget key limits: the report field it reads and whether the limit is a ceiling."""

    key: str
    field: str
    ceiling: bool
    unit: str
    growth: bool = False


RULES: dict[str, Rule] = {
    r.key: r
    for r in (
        Rule("max_bytes", "bytes", True, "B"),
        Rule("max_gzip_bytes", "gzip_bytes", True, "B"),
        Rule("min_top1", "top1", False, ""),
        Rule("max_p50_ms", "latency_p50_ms", True, "ms"),
        Rule("max_growth_pct", "bytes", True, "%", growth=True),
        Rule("max_p50_growth_pct", "latency_p50_ms", True, "%", growth=True),
    )
}
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


@dataclass(frozen=True)
class Budget:
    """The limits of one ``budgets.toml`` table: ``pattern`` and ``{rule key: limit}``."""

    pattern: str
    limits: dict[str, float] = field(default_factory=dict)

    def matches(self, row: dict[str, Any]) -> bool:
        """True if the pattern matches the row's name or its file name."""
        names = [str(row.get("name", "")), Path(str(row.get("path") or "")).name]
        return any(name and fnmatch.fnmatchcase(name, self.pattern) for name in names)


@dataclass(frozen=True)
class CheckResult:
    """One artifact checked against one rule. ``status`` is ``pass``, ``fail`` or ``skip``."""

    artifact: str
    rule: str
    pattern: str
    measured: float | None
    limit: float | str
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "fail"


def load_budgets(path: str | Path) -> list[Budget]:
    """Read and validate a ``budgets.toml``.

    Raises:
        BudgetError: the file is missing, is not valid TOML, or holds an unknown key or a bad value.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BudgetError(f"budgets file {path} does not exist; pass an existing --budget file") from None
    except tomllib.TOMLDecodeError as exc:
        raise BudgetError(f"{path}: not valid TOML ({exc}); fix the syntax and retry") from None
    return parse_budgets(raw, origin=str(path))


def parse_budgets(raw: dict[str, Any], *, origin: str = "budgets") -> list[Budget]:
    """Validated budgets from plain data (as parsed from TOML), in file order."""
    if not raw:
        raise BudgetError(f"{origin}: holds no budgets; add a table such as [\"*_int8\"] "
                          "with max_bytes = ...")
    budgets = []
    for pattern, table in raw.items():
        if not isinstance(table, dict):
            raise BudgetError(
                f"{origin}: {pattern!r} = {table!r} is not a table; write [\"ARTIFACT-OR-GLOB\"] and put "
                f"rules under it ({', '.join(RULES)})"
            )
        if not table:
            raise BudgetError(f"{origin}: [{_quote(pattern)}] has no rules; add one of {', '.join(RULES)}")
        limits = {key: _parse_limit(origin, pattern, key, value) for key, value in table.items()}
        budgets.append(Budget(pattern, limits))
    return budgets


def _quote(pattern: str) -> str:
    return pattern if re.fullmatch(r"[A-Za-z0-9_-]+", pattern) else f'"{pattern}"'


def _parse_limit(origin: str, pattern: str, key: str, value: Any) -> float:
    where = f"{origin}: [{_quote(pattern)}].{key}"
    if key not in RULES:
        close = difflib.get_close_matches(key, RULES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BudgetError(f"{where}: unknown budget key; {hint}allowed keys: {', '.join(RULES)}")
    if key in ("max_bytes", "max_gzip_bytes"):
        return _parse_bytes(where, value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BudgetError(f"{where}: expected a number, got {value!r}")
    if key == "min_top1" and not 0 <= value <= 1:
        raise BudgetError(f"{where}: top-1 is a fraction from 0 to 1, got {value!r} (write 0.925 for 92.5%)")
    if value < 0 or (key == "max_p50_ms" and value == 0):
        raise BudgetError(f"{where}: expected a {'positive' if key == 'max_p50_ms' else 'non-negative'} "
                          f"number, got {value!r}")
    return float(value)


def _parse_bytes(where: str, value: Any) -> float:
    """An integer byte count or a string such as ``"150 KB"`` / ``"1.5 MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B|B)\s*", value, flags=re.IGNORECASE)
        if match and float(match[1]) > 0:
            return float(round(float(match[1]) * _SIZE_UNITS[match[2].lower()]))
    raise BudgetError(f"{where}: expected a positive whole number of bytes or a size such as \"150 KB\" "
                      f"or \"1.5 MiB\", got {value!r}")


def check(report: dict[str, Any], budgets: list[Budget],
          baseline: dict[str, Any] | None = None) -> list[CheckResult]:
    """Every budget rule against every row of ``report`` it matches.

    Args:
        report: a report.json as a dict (``{"rows": [...], ...}``).
        budgets: from :func:`load_budgets` or :func:`parse_budgets`.
        baseline: an older report.json for the growth rules, or None (growth rules are then skipped).

    Returns:
        One result per (artifact, rule), in budget order; a budget that matches no row gives one
        failed result with rule ``match``.
    """
    rows = report.get("rows", [])
    base_rows = {r.get("name"): r for r in (baseline or {}).get("rows", [])}
    results = []
    for budget in budgets:
        matched = [row for row in rows if budget.matches(row)]
        if not matched:
            results.append(_no_match(budget, rows))
        for row in matched:
            for key, limit in budget.limits.items():
                base_row = base_rows.get(row["name"]) if baseline is not None else None
                results.append(evaluate(RULES[key], row, limit, pattern=budget.pattern,
                                        baseline_row=base_row, has_baseline=baseline is not None))
    return results


def _no_match(budget: Budget, rows: list[dict[str, Any]]) -> CheckResult:
    names = ", ".join(str(r.get("name")) for r in rows) or "none"
    return CheckResult("-", "match", budget.pattern, None, budget.pattern, "fail",
                       f"no artifact matches {budget.pattern!r} (artifacts: {names})")


def evaluate(rule: Rule, row: dict[str, Any], limit: float, *, pattern: str = "",
             baseline_row: dict[str, Any] | None = None, has_baseline: bool = False) -> CheckResult:
    """One rule on one report row (``baseline_row`` for the growth rules)."""
    name = str(row.get("name", "?"))
    measured = row.get(rule.field)
    if measured is None:
        return CheckResult(name, rule.key, pattern, None, limit, "fail",
                           f"not measured: the row has no {rule.field}")
    if rule.growth:
        return _evaluate_growth(rule, name, float(measured), limit, pattern, baseline_row, has_baseline)
    ok = measured <= limit if rule.ceiling else measured >= limit
    return CheckResult(name, rule.key, pattern, measured, limit, "pass" if ok else "fail",
                       "" if ok else over_by(rule, measured, limit))


def _evaluate_growth(rule: Rule, name: str, measured: float, limit: float, pattern: str,
                     baseline_row: dict[str, Any] | None, has_baseline: bool) -> CheckResult:
    if not has_baseline:
        return CheckResult(name, rule.key, pattern, None, limit, "skip", "no --baseline given")
    before = (baseline_row or {}).get(rule.field)
    if not before:
        return CheckResult(name, rule.key, pattern, None, limit, "skip",
                           f"baseline has no {rule.field} for {name}")
    growth = 100.0 * (measured - before) / before
    ok = growth <= limit
    shown = f"{_fmt(measured, rule.field)} vs baseline {_fmt(before, rule.field)}"
    return CheckResult(name, rule.key, pattern, round(growth, 3), limit, "pass" if ok else "fail",
                       shown if ok else f"{shown}: over by {growth - limit:.2f} percentage points")


def over_by(rule: Rule, measured: float, limit: float) -> str:
    """How far a measurement is past its limit, in the rule's unit and in percent of the limit."""
    diff = abs(measured - limit)
    if rule.field == "top1":
        return f"under by {100 * diff:.2f} percentage points"
    pct = f" ({100 * diff / limit:+.1f}%)" if limit else ""
    return f"{'over' if rule.ceiling else 'under'} by {_fmt(diff, rule.field)}{pct}"


def _fmt(value: float | None, fieldname: str) -> str:
    if value is None:
        return "-"
    if fieldname in ("bytes", "gzip_bytes"):
        return f"{value:,.0f} B"
    if fieldname == "top1":
        return f"{100 * value:.2f}%"
    return f"{value:.3f} ms"


def format_value(result: CheckResult, value: float | str | None, *, limit: bool = False) -> str:
    """A measured value or limit as shown in the table (bytes with separators, top-1 in %)."""
    rule = RULES.get(result.rule)
    if value is None or isinstance(value, str) or rule is None:
        return "-" if value is None else str(value)
    if rule.growth:
        return f"{value:g}%" if limit else f"{value:+.2f}%"
    return _fmt(value, rule.field)


def format_results(results: list[CheckResult]) -> str:
    """A plain-text pass/fail table and a one-line summary."""
    header = ("status", "artifact", "rule", "measured", "limit", "detail")
    table = [header] + [
        (r.status.upper(), r.artifact, r.rule, format_value(r, r.measured),
         format_value(r, r.limit, limit=True), r.detail)
        for r in results
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in table]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    verdict = "FAILED" if counts["fail"] else "OK"
    lines.append(f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(line.rstrip() for line in lines)
