"""Reports: report.md (a table for people), report.json (for scripts), results.csv, PNG plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from edgesmith.runs import write_json, write_text

COLUMNS = ("name", "format", "runtime", "input_dtype", "top1", "bytes", "gzip_bytes", "params",
           "latency_p50_ms", "latency_p90_ms", "threads", "eval_samples")


def _human_bytes(n: Any) -> str:
    if n in (None, ""):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One table: top-1, size, gzip size, parameters, p50/p90 latency."""
    header = "| model | format | runtime | top-1 % | size | gzip | params | p50 ms | p90 ms | threads |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['format']} | {r['runtime']} | {100 * r['top1']:.2f} | "
            f"{_human_bytes(r.get('bytes'))} | {_human_bytes(r.get('gzip_bytes'))} | {r['params']:,} | "
            f"{r['latency_p50_ms']:.2f} | {r['latency_p90_ms']:.2f} | {r['threads']} |"
        )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], title: str, extra_sections: list[str] = ()) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    parts = [
        f"# {title}",
        "",
        markdown_table(report["rows"]),
        "",
        f"Accuracy: top-1 on {report['rows'][0]['eval_samples'] if report['rows'] else 0} held-out images. "
        "Latency: batch 1, warm-up then timed runs of the runtime alone.",
        "",
        f"Environment: {env['cpu']} ({env['cores']} cores, {env['threads']} threads; "
        f"flags {' '.join(env['cpu_flags']) or '-'}), Python {env['python']}; {versions}.",
        *[f"\n{s}" for s in extra_sections],
        "",
        "![accuracy vs size](accuracy_vs_size.png) ![accuracy vs latency](accuracy_vs_latency.png)",
        "",
    ]
    return "\n".join(parts)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_tradeoffs(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Accuracy against size and against p50 latency, one labelled point per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, filename in (
        ("bytes", "size on disk (MB)", "accuracy_vs_size.png"),
        ("latency_p50_ms", "p50 latency, batch 1 (ms)", "accuracy_vs_latency.png"),
    ):
        points = [r for r in rows if r.get(key)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in points:
            x = r[key] / 1e6 if key == "bytes" else r[key]
            ax.scatter(x, 100 * r["top1"], s=40)
            ax.annotate(r["name"], (x, 100 * r["top1"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out_dir / filename
        tmp = path.with_name(f".{filename}.tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_reports(report: dict[str, Any], out_dir: str | Path, *, title: str,
                  extra_sections: list[str] = ()) -> dict[str, Path]:
    """Write report.json, results.csv, the plots and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    written = {
        "report_json": write_json(out_dir / "report.json", report),
        "results_csv": write_text(out_dir / "results.csv", csv_text(report["rows"])),
    }
    for path in plot_tradeoffs(report["rows"], out_dir):
        written[path.stem] = path
    written["report_md"] = write_text(out_dir / "report.md", render_markdown(report, title, extra_sections))
    return written
