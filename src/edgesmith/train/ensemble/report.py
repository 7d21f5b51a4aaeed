"""The ensemble report: every member and every ensemble with top-1, size and latency side by side, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.bench.report import _human_bytes, _ms
from edgesmith.runs import atomic_path, write_json, write_text

FAMILY_MARKERS = {"member": "o", "averaging": "s", "bagging": "^", "boosting": "D", "stacking": "P"}


def markdown(rows: list[dict[str, Any]], *, eval_samples: int) -> str:
    """A table; ``gain`` is top-1 minus the best single member's, in points."""
    best_member = max((r["top1"] for r in rows if r["family"] == "member"), default=0.0)
    lines = [f"Top-1 on {eval_samples:,} held-out images; size and latency of the deployable artifact "
             "(batch 1, CPU).", "",
             "| model | family | members | top-1 % | gain | artifact | size | p50 ms | agrees % | fit s |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        gain = 100 * (r["top1"] - best_member)
        agrees = r.get("export_agreement")
        lines.append(
            f"| {r['name']} | {r['family']} | {'+'.join(r['members'])} | {100 * r['top1']:.2f} | "
            f"{'' if r['family'] == 'member' else f'{gain:+.2f}'} | {r.get('artifact', '-')} | "
            f"{_human_bytes(r.get('bytes'))} | {_ms(r.get('latency_p50_ms'))} | "
            f"{'-' if agrees is None else f'{100 * agrees:.2f}'} | {r.get('fit_seconds', 0):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Top-1 against size and against latency, one marker per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "bytes", "size (MB)"), (axes[1], "latency_p50_ms", "p50 latency (ms)")):
        for r in rows:
            if r.get(key) is None:
                continue
            x = r[key] / 1e6 if key == "bytes" else r[key]
            ax.scatter(x, 100 * r["top1"], marker=FAMILY_MARKERS.get(r["family"], "x"), s=50)
            ax.annotate(r["name"], (x, 100 * r["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(True, alpha=0.3)
    fig.suptitle("members and ensembles: accuracy against cost (o member, s averaging, ^ bagging, "
                 "D boosting, P stacking)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def write(rows: list[dict[str, Any]], out_dir: str | Path, *, eval_samples: int, extra: str = "") -> dict[str, Path]:
    """``ensemble.md``, ``ensemble.json`` and ``ensemble.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    text = "# Ensembles\n\n" + markdown(rows, eval_samples=eval_samples) + ("\n\n" + extra if extra else "") + "\n"
    return {"report": write_text(out_dir / "ensemble.md", text),
            "report_json": write_json(out_dir / "ensemble.json", {"eval_samples": eval_samples, "rows": rows}),
            "plot": plot(rows, out_dir / "ensemble.png")}
