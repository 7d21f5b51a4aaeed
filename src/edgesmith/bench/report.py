"""Reports: report.md (a table for people), report.json (for scripts), results.csv, PNG plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from edgesmith.bench.report_schema import ReportError, validate_report
from edgesmith.runs import write_json, write_text

COLUMNS = ("name", "format", "runtime", "device", "provider", "input_dtype", "top1", "bytes", "gzip_bytes", "params",
           "latency_batch", "threads", "batch_mode", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
           "latency_mean_ms", "latency_std_ms", "latency_runs", "throughput_ips", "cold_start_ms", "peak_rss_bytes",
           "rss_before_load_bytes", "eval_samples", "note")
QUANTIZED_DTYPES = ("int8", "uint8", "int16")


def _human_bytes(n: Any) -> str:
    if n in (None, ""):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _ms(value: Any) -> str:
    """Milliseconds with enough digits for a fast model (0.0123) and few for a slow one (123.4)."""
    if value is None:
        return "-"
    return f"{value:.4f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per artifact: top-1, size, gzip size, parameters, headline latency, cold start, peak memory."""
    header = ("| model | format | runtime | top-1 % | agrees % | size | gzip | params | p50 ms | p90 ms | p99 ms | "
              "img/s | cold start ms | threads | peak RSS MB |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ips, agrees = r.get("throughput_ips"), r.get("top1_agreement")
        lines.append(
            f"| {r['name']} | {r['format']} | {r['runtime']} | {100 * r['top1']:.2f} | "
            f"{'ref' if agrees is None else f'{100 * agrees:.2f}'} | "
            f"{_human_bytes(r.get('bytes'))} | {_human_bytes(r.get('gzip_bytes'))} | {r['params']:,} | "
            f"{_ms(r['latency_p50_ms'])} | {_ms(r['latency_p90_ms'])} | {_ms(r.get('latency_p99_ms'))} | "
            f"{'-' if ips is None else f'{ips:,.0f}'} | {_ms(r.get('cold_start_ms'))} | {r['threads']} | "
            f"{_memory(r)} |"
        )
    return "\n".join(lines)


def _memory(row: dict[str, Any]) -> str:
    """Peak RSS in MB and, in brackets, what loading and running the model added to the process."""
    peak, before = row.get("peak_rss_bytes"), row.get("rss_before_load_bytes")
    if peak is None:
        return "-"
    return _mb(peak) + ("" if before is None else f" (+{_mb(peak - before)})")


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def latency_table(entries: list[dict[str, Any]]) -> str:
    """One row per (artifact, batch size, thread count), then the notes of the rows that have one."""
    lines = ["| model | device | provider | batch | threads | mode | p50 ms | p90 ms | p99 ms | img/s | "
             "peak RSS MB |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    notes: dict[str, list[str]] = {}
    for e in entries:
        ips = e.get("throughput_ips")
        lines.append(
            f"| {e['name']} | {e['device']} | {e['provider']} | {e['latency_batch']} | {e['threads']} | "
            f"{e['batch_mode']} | {_ms(e['latency_p50_ms'])} | {_ms(e['latency_p90_ms'])} | "
            f"{_ms(e.get('latency_p99_ms'))} | {'-' if ips is None else f'{ips:,.0f}'} | "
            f"{_mb(e.get('peak_rss_bytes'))} |"
        )
        if e.get("note"):
            where = f"{e['name']} (batch {e['latency_batch']}, threads {e['threads']})"
            notes.setdefault(e["note"], []).append(where)
    lines += [f"\n{', '.join(where)}: {note}." for note, where in notes.items()]
    return "\n".join(lines)


def latency_notes(rows: list[dict[str, Any]]) -> list[str]:
    """A note for every quantized artifact that is slower (p50) than the float model of its runtime.

    The float reference is the largest unquantized artifact run by the same runtime.
    """
    notes = []
    for row in rows:
        if not _quantized(row):
            continue
        floats = [r for r in rows if r["runtime"] == row["runtime"] and not _quantized(r) and r.get("bytes")]
        if not floats:
            continue
        ref = max(floats, key=lambda r: r["bytes"])
        if row["latency_p50_ms"] > ref["latency_p50_ms"]:
            slower, faster = _ms(row["latency_p50_ms"]), _ms(ref["latency_p50_ms"])
            notes.append(f"Note: {row['name']} is slower than {ref['name']} at p50 ({slower} vs {faster} ms "
                         f"on {row['runtime']}): quantized kernels are not faster on every CPU; "
                         "the measurement is reported as taken.")
    return notes


def _quantized(row: dict[str, Any]) -> bool:
    return row.get("input_dtype") in QUANTIZED_DTYPES or "int8" in row["name"]


def render_markdown(report: dict[str, Any], title: str, extra_sections: list[str] = ()) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    rows = report["rows"]
    parts = [
        f"# {title}",
        "",
        markdown_table(rows),
        "",
        f"Accuracy: top-1 on {rows[0]['eval_samples'] if rows else 0} held-out images; "
        f"'agrees' is the share of them on which a model predicts the same class as "
        f"{rows[0]['name'] if rows else 'the first row'} (ref). "
        f"Latency: {_latency_method(rows)}",
        *[f"\n{note}" for note in latency_notes(rows)],
        *_latency_section(report.get("latency")),
        "",
        f"Environment: {env['cpu']} ({env['cores']} cores, {_threads_text(env)}; "
        f"flags {' '.join(env['cpu_flags']) or '-'}), Python {env['python']}; {versions}{_gpu_text(env)}.",
        *[f"\n{s}" for s in extra_sections],
        "",
        "![accuracy vs size](accuracy_vs_size.png) ![accuracy vs latency](accuracy_vs_latency.png)",
        "",
    ]
    return "\n".join(parts)


def _latency_section(entries: list[dict[str, Any]] | None) -> list[str]:
    if not entries:
        return []
    return ["", "## Latency by batch size and threads", "",
            "p50/p90/p99 are per call of `batch` images; img/s = batch x calls / time. Mode: native (one call), "
            "resized (a fixed-batch TFLite model resized), loop (a fixed-batch model called once per sample).",
            "", latency_table(entries)]


def _threads_text(env: dict[str, Any]) -> str:
    counts = env.get("thread_counts")
    if counts and len(counts) > 1:
        return f"threads measured: {', '.join(map(str, counts))}, headline {env['threads']}"
    return f"{env['threads']} threads"


def _gpu_text(env: dict[str, Any]) -> str:
    gpus = "; ".join(env.get("gpus") or []) or "none"
    device = env.get("device")
    return f"; GPUs: {gpus}" + (f"; device {device}" if device else "")


def _latency_method(rows: list[dict[str, Any]]) -> str:
    runs = [r["latency_runs"] for r in rows]
    if not rows or "latency_warmup" not in rows[0]:
        return "batch 1, warm-up then timed runs of the runtime alone."
    return (f"batch {rows[0].get('latency_batch', 1)}, {rows[0]['latency_warmup']} warm-up calls, then timed "
            f"calls of the runtime alone ({min(runs):,} to {max(runs):,} per model, until both the minimum "
            "count and the minimum time were reached); cold start is loading plus the first inference; "
            "peak RSS is the resident memory of a fresh process that loaded and ran the model (in brackets: "
            "what the model added to the runtime's own).")


def results_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The flat rows of results.csv: one per latency entry, each with its artifact's accuracy and size.

    A report without latency entries (written before they existed) gives its rows as they are.
    """
    entries = report.get("latency")
    if not entries:
        return report["rows"]
    rows = {row["name"]: row for row in report["rows"]}
    return [{**_without_latency(rows[e["name"]]), **e} for e in entries]


def _without_latency(row: dict[str, Any]) -> dict[str, Any]:
    measured = {"device", "provider", "batch_mode", "note", "threads", "peak_rss_bytes", "throughput_ips"}
    return {k: v for k, v in row.items() if not k.startswith("latency_") and k not in measured}


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def pareto_front(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both counts (smaller ``key``, higher top-1), by ascending ``key``."""
    front, best = [], float("-inf")
    for row in sorted((r for r in rows if r.get(key)), key=lambda r: (r[key], -r["top1"])):
        if row["top1"] > best:
            front.append(row)
            best = row["top1"]
    return front


def plot_tradeoffs(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Accuracy against size and against p50 latency, one labelled point per artifact, the Pareto
    front (the artifacts nothing beats on both axes) drawn as a line."""
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
            ax.annotate(r["name"], (x, 100 * r["top1"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        front = pareto_front(points, key)
        if front:
            xs = [r[key] / 1e6 if key == "bytes" else r[key] for r in front]
            ax.plot(xs, [100 * r["top1"] for r in front], drawstyle="steps-post", color="tab:red", alpha=0.6,
                    linewidth=1.2, label="Pareto front")
            ax.legend(fontsize=8, loc="lower right")
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
        "results_csv": write_text(out_dir / "results.csv", csv_text(results_rows(report))),
    }
    for path in plot_tradeoffs(report["rows"], out_dir):
        written[path.stem] = path
    written["report_md"] = write_text(out_dir / "report.md", render_markdown(report, title, extra_sections))
    return written


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json, given the file or the run directory that holds it.

    Raises:
        ReportError: the file is missing, is not JSON, or does not follow the report schema.
    """
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} holds no report.json" if path.is_dir() else f"{path} does not exist"
        raise ReportError(f"{where}; run `edgesmith bench RUN_DIR` first, or pass a report.json file")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{file}: not valid JSON ({exc}); re-run `edgesmith bench` to rewrite it") from None
    validate_report(report, origin=str(file))
    return report


def report_title(report: dict[str, Any], fallback: str = "run") -> str:
    return f"edgesmith report: {report.get('run', {}).get('name') or fallback}"


def rewrite_markdown(report: dict[str, Any], out_dir: str | Path, *, title: str | None = None,
                     extra_sections: list[str] = ()) -> Path:
    """Render report.md again from a report.json (e.g. after edgesmith's table layout changed)."""
    out_dir = Path(out_dir)
    text = render_markdown(report, title or report_title(report, out_dir.name), extra_sections)
    return write_text(out_dir / "report.md", text)


def run_labels(reports: list[dict[str, Any]], sources: list[str | Path]) -> list[str]:
    """A short, unique label per report: its run name, or the folder it came from when names repeat."""
    names = [r.get("run", {}).get("name") or _folder_name(s) for r, s in zip(reports, sources, strict=True)]
    if len(set(names)) < len(names):
        names = [str(s) for s in sources]
    return names


def _folder_name(source: str | Path) -> str:
    path = Path(source)
    return path.parent.name if path.suffix == ".json" else path.name


def compare_markdown(reports: list[dict[str, Any]], labels: list[str]) -> str:
    """Runs side by side: rows matched by name; top-1, size and p50 of each run and the change
    of each later run against the first."""
    first = labels[0]
    names = list(dict.fromkeys(row["name"] for report in reports for row in report["rows"]))
    tables = [{row["name"]: row for row in report["rows"]} for report in reports]
    header, align = ["model"], ["---"]
    for title, _, _ in _COMPARED:
        header += [f"{title} {label}" for label in labels] + [f"Δ {title} {label}" for label in labels[1:]]
        align += ["---:"] * (2 * len(labels) - 1)
    lines = [f"# edgesmith comparison: {' vs '.join(labels)}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(align) + "|"]
    for name in names:
        rows = [table.get(name) for table in tables]
        cells = [name]
        for _, key, show in _COMPARED:
            values = [row.get(key) if row else None for row in rows]
            cells += [show(v) for v in values] + [_delta(key, values[0], v) for v in values[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Δ: each run against {first}; top-1 in percentage points, size and p50 in percent. "
              "'-': the run has no such artifact or did not measure it."]
    lines += _environment_notes(reports, labels)
    return "\n".join(lines) + "\n"


_COMPARED = (
    ("top-1 %", "top1", lambda v: "-" if v is None else f"{100 * v:.2f}"),
    ("size", "bytes", _human_bytes),
    ("p50 ms", "latency_p50_ms", _ms),
)


def _delta(key: str, before: Any, after: Any) -> str:
    if before is None or after is None:
        return "-"
    if key == "top1":
        return f"{100 * (after - before):+.2f} pp"
    return f"{100 * (after - before) / before:+.1f}%" if before else "-"


def _environment_notes(reports: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """A warning when latency was measured on different CPUs or thread counts."""
    seen = {label: (r["environment"].get("cpu"), r["environment"].get("threads"))
            for r, label in zip(reports, labels, strict=True)}
    if len(set(seen.values())) == 1:
        cpu, threads = next(iter(seen.values()))
        return ["", f"All runs measured on {cpu} with {threads} threads."]
    listed = "; ".join(f"{label}: {cpu}, {threads} threads" for label, (cpu, threads) in seen.items())
    return ["", f"Note: latency was measured on different CPUs or thread counts ({listed}); "
            "compare p50 with care."]
