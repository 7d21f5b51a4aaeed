"""Bench stage: accuracy, size and latency of every model and artifact, and the reports."""

from edgesmith.bench.measure import BenchReport, bench, environment, measure_latency
from edgesmith.bench.report import write_reports

__all__ = ["BenchReport", "bench", "environment", "measure_latency", "write_reports"]
