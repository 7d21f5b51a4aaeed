"""The search's report: search.json, a markdown table (search.md) and a plot of accuracy against the objective
(search.png) with the Pareto front, the budget line and the pick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.optimize.search import OBJECTIVE_KEYS, SearchResult
from edgesmith.runs import atomic_path, write_json, write_text

AXIS_LABELS = {"size": "gzip size (KB, log scale)", "latency": "p50 latency, batch 1 (ms, log scale)"}


def write_search_report(result: SearchResult, out_dir: str | Path, *, title: str = "accuracy-budgeted search"
                        ) -> dict[str, Path]:
    """Write search.json, search.md and search.png into ``out_dir``; their paths by output name."""
    out_dir = Path(out_dir)
    return {"search_json": write_json(out_dir / "search.json", result.to_dict()),
            "search_md": write_text(out_dir / "search.md", search_markdown(result, title)),
            "search_plot": plot_search(result, out_dir / "search.png")}


def search_markdown(result: SearchResult, title: str = "accuracy-budgeted search") -> str:
    """The budget, the pick (or why there is none) and one table row per candidate with its verdict."""
    lines = [f"# {title}\n",
             f"Float model top-1 {100 * result.float_top1:.2f}% on {result.eval_samples} held-out images "
             f"({result.held_out} split); budget: at most {result.max_accuracy_drop:g} points below it; "
             f"objective: {result.objective}.\n",
             f"**{result.reason}**\n",
             "| candidate | technique | format | top-1 | drop (points) | bytes | gzip bytes | p50 ms | Pareto "
             "| verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|:---:|---|"]
    lines += [_row(c) for c in result.candidates]
    return "\n".join(lines) + "\n"


def _row(c: dict[str, Any]) -> str:
    if "error" in c:
        return f"| {c['name']} | {c['technique']} | {c['format']} | | | | | | | {c['reason']} |"
    name = f"**{c['name']}**" if c["picked"] else c["name"]
    return (f"| {name} | {c['technique']} | {c['format']} | {100 * c['top1']:.2f}% | {c['drop_points']:.2f} | "
            f"{c['bytes']:,} | {c['gzip_bytes']:,} | {c['latency_p50_ms']:.4g} | {'yes' if c['pareto'] else ''} "
            f"| {c['reason']} |")


def _x(c: dict[str, Any], objective: str) -> float:
    value = c[OBJECTIVE_KEYS[objective]]
    return value / 1e3 if objective == "size" else value


def plot_search(result: SearchResult, path: Path) -> Path:
    """Top-1 against the objective: every candidate, the Pareto front, the budget line, the pick starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    measured = [c for c in result.candidates if "error" not in c]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in measured:
        ax.scatter(_x(c, result.objective), 100 * c["top1"], s=40, color="tab:blue" if c["pareto"] else "tab:gray")
        ax.annotate(c["name"], (_x(c, result.objective), 100 * c["top1"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    _draw_front(ax, result)
    _draw_pick(ax, result)
    ax.axhline(100 * result.float_top1, color="tab:gray", linestyle=":", linewidth=1, label="float model")
    ax.axhline(100 * result.float_top1 - result.max_accuracy_drop, color="tab:orange", linestyle="--",
               linewidth=1, label=f"budget: float top-1 - {result.max_accuracy_drop:g} points")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(AXIS_LABELS[result.objective])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _draw_front(ax: Any, result: SearchResult) -> None:
    by_name = {c["name"]: c for c in result.candidates}
    front = [by_name[name] for name in result.pareto]
    if front:
        ax.plot([_x(c, result.objective) for c in front], [100 * c["top1"] for c in front], drawstyle="steps-post",
                color="tab:red", alpha=0.6, linewidth=1.2, label="Pareto front")


def _draw_pick(ax: Any, result: SearchResult) -> None:
    pick = result.pick_row
    if pick is not None:
        ax.scatter(_x(pick, result.objective), 100 * pick["top1"], s=160, marker="*", color="tab:green", zorder=3,
                   label=f"pick: {pick['name']}")
