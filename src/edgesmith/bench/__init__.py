"""Bench stage: accuracy, size and latency of every model and artifact, the reports, and budgets."""

from edgesmith.bench.budgets import BudgetError, check, load_budgets
from edgesmith.bench.measure import BenchReport, bench, environment, measure_latency
from edgesmith.bench.report import load_report, write_reports
from edgesmith.bench.report_schema import ReportError, validate_report

__all__ = ["BenchReport", "BudgetError", "ReportError", "bench", "check", "environment", "load_budgets",
           "load_report", "measure_latency", "validate_report", "write_reports"]
