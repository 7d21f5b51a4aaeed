"""The accuracy-budgeted search: a ladder of candidates, each measured as the file that would ship.

Each rung of ``cfg.search.ladder`` is a (technique, export format) pair: post-training quantization of
the float model (dynamic range, float16, int8 with two calibration sets), or pruning / QAT / clustering
and their chains (run with :func:`edgesmith.optimize.optimize`) followed by an int8 export. Every
candidate is exported with :func:`edgesmith.export.export` and its file measured on the same held-out
images (:class:`~edgesmith.optimize.check.CheckData`, the val split): top-1, bytes, gzip bytes and
batch-1 latency (:func:`edgesmith.bench.measure.measure_latency`). :func:`select` then keeps the Pareto
set (accuracy against the objective) and picks the best objective among the candidates whose top-1 is
at most ``max_accuracy_drop`` points below the float model's, or says that none is, and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.datasets import ImageDataset
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.optimize.check import CheckData, predict, preprocessed, top1
from edgesmith.recipe import SEARCH_OBJECTIVES, ExportConfig, OptimizeConfig, SearchConfig

log = logging.getLogger(__name__)
QAT_TECHNIQUES = ("qat", "prune_qat", "cluster_qat")
SPARSE_TECHNIQUES = ("prune", "prune_qat")  # run once per value of search.sparsities
# ladder entry -> (optimize technique or None for the float model, export format, calibration set)
RUNGS: dict[str, tuple[str | None, str, str]] = {
    "float32": (None, "tflite-float32", "none"),
    "float16": (None, "tflite-float16", "none"),
    "dynamic": (None, "tflite-dynamic", "none"),
    "int8": (None, "tflite-int8", "default"),
    "int8_more_calibration": (None, "tflite-int8", "more"),
    "int8_float_io": (None, "tflite-int8-float-io", "default"),
    "prune_int8": ("prune", "tflite-int8", "default"),
    "qat_int8": ("qat", "tflite-int8", "none"),
    "cluster_int8": ("cluster", "tflite-int8", "default"),
    "prune_qat_int8": ("prune_qat", "tflite-int8", "none"),
    "cluster_qat_int8": ("cluster_qat", "tflite-int8", "none"),
    "onnx_float32": (None, "onnx-float32", "none"),
    "onnx_int8": (None, "onnx-int8", "default"),
}
OBJECTIVE_KEYS = {"size": "gzip_bytes", "latency": "latency_p50_ms"}
OBJECTIVE_WORDS = {"size": ("smallest gzip size", "larger"), "latency": ("lowest batch-1 p50 latency", "slower")}
DECISION_KEYS = ("objective_value", "within_budget", "pareto", "dominated_by", "picked", "reason")


@dataclass(frozen=True)
class Rung:
    """One candidate of the ladder: what to optimize (if anything), how to export it, which calibration."""

    name: str
    entry: str
    technique: str | None
    fmt: str
    calibration: str
    sparsity: float | None = None

    @property
    def quantized(self) -> bool:
        return self.technique in QAT_TECHNIQUES


@dataclass
class SearchResult:
    """Every candidate measured (one dict each, in ladder order), the Pareto set and the pick.

    ``pick`` is None when no candidate is within the budget; ``reason`` then says why, and what to do.
    Each candidate carries its measurements and why it won or lost (``reason``).
    """

    objective: str
    max_accuracy_drop: float
    float_top1: float
    eval_samples: int
    candidates: list[dict[str, Any]]
    pareto: list[str]
    pick: str | None
    reason: str
    held_out: str = "val"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def pick_row(self) -> dict[str, Any] | None:
        return next((c for c in self.candidates if c["name"] == self.pick), None)

    def reselect(self, *, max_accuracy_drop: float | None = None, objective: str | None = None) -> SearchResult:
        """The same measurements judged with another budget or objective (nothing is measured again)."""
        budget = self.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
        result = select(self.candidates, float_top1=self.float_top1, max_accuracy_drop=budget,
                        objective=objective or self.objective, eval_samples=self.eval_samples)
        result.held_out, result.settings = self.held_out, self.settings
        return result

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_ladder(cfg: SearchConfig) -> list[Rung]:
    """The ladder's entries as candidates, in order; ``prune_*`` entries once per sparsity.

    Raises:
        RecipeError: an empty ladder, an unknown entry, or a ``prune_*`` entry with no sparsities.
    """
    entries = list(dict.fromkeys(cfg.ladder))
    if not entries:
        raise RecipeError(f"optimize.search.ladder is empty; give at least one of {', '.join(RUNGS)}")
    rungs = []
    for entry in entries:
        if entry not in RUNGS:
            raise RecipeError(f"optimize.search.ladder = {entry!r} is not allowed; choose from {', '.join(RUNGS)}")
        rungs.extend(_expand(entry, cfg.sparsities))
    return rungs


def _expand(entry: str, sparsities: list[float]) -> list[Rung]:
    technique, fmt, calibration = RUNGS[entry]
    if technique not in SPARSE_TECHNIQUES:
        return [Rung(entry, entry, technique, fmt, calibration)]
    if not sparsities:
        raise RecipeError(f"optimize.search.sparsities is empty but the ladder holds {entry!r}; "
                          "give at least one sparsity, e.g. [0.5, 0.8]")
    levels = {f"prune{round(100 * s)}": s for s in sparsities}  # 0.5 -> prune50
    return [Rung(entry.replace("prune", label, 1), entry, technique, fmt, calibration, sparsity)
            for label, sparsity in levels.items()]


def check_objective(objective: str) -> None:
    if objective not in SEARCH_OBJECTIVES:
        raise RecipeError(f"optimize.search.objective = {objective!r} is not allowed; "
                          f"choose from {', '.join(SEARCH_OBJECTIVES)}")


def search(model: Any, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec, seed: int = 0,
           mirror: bool = True, export_cfg: ExportConfig | None = None, out_dir: str | Path | None = None
           ) -> SearchResult:
    """Export and measure every candidate of ``cfg.search.ladder``; the Pareto set and the pick.

    Args:
        model: the trained float Keras 2 model (left unchanged); the reference top-1.
        data: fine-tunes draw from ``data.train``, calibration too; candidates are measured on
            ``cfg.search.eval_samples`` images of ``data.val`` (``data.test`` when there is no val split).
        cfg: ``cfg.search`` holds the budget, objective and ladder; the rest of ``cfg`` the fine-tunes'
            epochs, samples and learning rates.
        spec: the model's preprocessing.
        seed: seeds samples and fine-tunes.
        mirror: left-right mirrored images are valid examples (fine-tunes).
        export_cfg: ONNX opset and ONNX int8 variants (tolerances are not used: accuracy is measured).
        out_dir: where the candidates' files are written and kept; None: a temporary folder.

    Raises:
        RecipeError: an empty ladder or sparsities list, or an unknown objective.
    """
    settings = cfg.search
    check_objective(settings.objective)
    rungs = resolve_ladder(settings)
    held_out = "val" if data.val is not None else "test"
    if held_out == "test":
        log.warning("search: no validation split; candidates are measured on the test split (set data.val_fraction)")
    check = CheckData.draw(data, spec, settings.eval_samples, seed, settings.calibration_samples)
    reference = predict(model, check.inputs)
    calibrations = _calibrations(rungs, data, spec, check, settings, seed)
    sources = _sources(rungs, model, data, cfg, spec=spec, seed=seed, mirror=mirror)
    with _folder(out_dir) as folder:
        rows = [measure_candidate(rung, sources[rung.name], folder, spec=spec, check=check, reference=reference,
                                  calibration=calibrations[rung.calibration], settings=settings,
                                  export_cfg=export_cfg or ExportConfig(), keep=out_dir is not None)
                for rung in rungs]
    result = select(rows, float_top1=top1(reference, check.labels), max_accuracy_drop=settings.max_accuracy_drop,
                    objective=settings.objective, eval_samples=len(check.labels))
    result.held_out, result.settings = held_out, dataclasses.asdict(settings)
    log.info("search: %s", result.reason)
    return result


@contextlib.contextmanager
def _folder(out_dir: str | Path | None) -> Iterator[Path]:
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="edgesmith-search-") as tmp:
        yield Path(tmp)


def _calibrations(rungs: list[Rung], data: ImageDataset, spec: PreprocessSpec, check: CheckData,
                  settings: SearchConfig, seed: int) -> dict[str, np.ndarray | None]:
    """The calibration sets the rungs use: none, the default one, and (if needed) the larger one."""
    calibrations: dict[str, np.ndarray | None] = {"none": None, "default": check.calibration}
    if any(rung.calibration == "more" for rung in rungs):
        calibrations["more"], _ = preprocessed(data, spec, "train", settings.more_calibration_samples, seed)
    return calibrations


def _sources(rungs: list[Rung], model: Any, data: ImageDataset, cfg: OptimizeConfig, **kwargs: Any
             ) -> dict[str, Any]:
    """The model each rung exports, by rung name: the float model, an optimized copy, or the error
    (an :class:`EdgesmithError`) that stopped its technique.

    One :func:`optimize` call per sparsity (pruning and its QAT chain share the pruned model) and one
    for the other techniques (QAT, clustering and its chain).
    """
    groups: dict[float | None, list[Rung]] = {}
    for rung in rungs:
        if rung.technique is not None:
            groups.setdefault(rung.sparsity, []).append(rung)
    sources: dict[str, Any] = {rung.name: model for rung in rungs if rung.technique is None}
    for sparsity, members in groups.items():
        sources.update(_optimized(members, sparsity, model, data, cfg, **kwargs))
    return sources


def _optimized(rungs: list[Rung], sparsity: float | None, model: Any, data: ImageDataset, cfg: OptimizeConfig,
               **kwargs: Any) -> dict[str, Any]:
    from edgesmith.optimize.techniques import optimize

    techniques = list(dict.fromkeys(rung.technique for rung in rungs))
    step = dataclasses.replace(cfg, techniques=techniques, check_samples=0,
                               sparsity=cfg.sparsity if sparsity is None else sparsity)
    try:
        models = optimize(model, data, step, **kwargs).models
    except EdgesmithError as exc:  # recorded on its candidates; the other rungs still count
        log.error("search: %s failed: %s", ", ".join(techniques), exc)
        return {rung.name: exc for rung in rungs}
    return {rung.name: models[rung.technique] for rung in rungs}


def measure_candidate(rung: Rung, source: Any, folder: Path, *, spec: PreprocessSpec, check: CheckData,
                      reference: np.ndarray, calibration: np.ndarray | None, settings: SearchConfig,
                      export_cfg: ExportConfig, keep: bool = True) -> dict[str, Any]:
    """Export one candidate and measure its file: top-1 on the held-out images, sizes, batch-1 latency.

    A candidate whose technique or export failed is returned with ``error`` (and no measurements).
    """
    from edgesmith.export import export

    row = _describe(rung, calibration)
    if isinstance(source, EdgesmithError):
        return {**row, "error": f"{rung.technique}: {source}"}
    try:
        exported = export(source, rung.fmt, export_cfg, spec=spec, out_dir=folder, name=rung.name,
                          calibration=calibration, quantized=rung.quantized)
    except EdgesmithError as exc:
        log.error("search: %s failed: %s", rung.name, exc)
        return {**row, "error": str(exc)}
    row.update(measure_file(exported.path, check, reference, settings))
    row["export_seconds"] = round(exported.seconds, 1)
    row["path"] = exported.path.name if keep else None
    log.info("search: %s top-1 %.4f, %d gzip bytes, p50 %.3f ms", rung.name, row["top1"], row["gzip_bytes"],
             row["latency_p50_ms"])
    return row


def _describe(rung: Rung, calibration: np.ndarray | None) -> dict[str, Any]:
    return {"name": rung.name, "ladder_entry": rung.entry, "technique": rung.technique or "none",
            "format": rung.fmt, "sparsity": rung.sparsity,
            "calibration_samples": None if rung.quantized or calibration is None else len(calibration)}


def measure_file(path: Path, check: CheckData, reference: np.ndarray, settings: SearchConfig) -> dict[str, Any]:
    """Top-1 and agreement with the float model on the held-out images, bytes, gzip bytes, latency."""
    from edgesmith.bench.measure import gzip_size
    from edgesmith.runs import disk_bytes

    predictions = predict(path, check.inputs)
    agreement = float(np.mean(predictions.argmax(-1) == reference.argmax(-1)))
    return {"top1": top1(predictions, check.labels), "top1_agreement_with_float": round(agreement, 4),
            "bytes": disk_bytes(path), "gzip_bytes": gzip_size(path),
            **batch1_latency(path, check.inputs[:1], settings)}


def batch1_latency(path: Path, sample: np.ndarray, settings: SearchConfig) -> dict[str, Any]:
    """Batch-1 latency of the file in its runtime (warm-up, timed runs, percentiles)."""
    from edgesmith.bench.measure import measure_latency
    from edgesmith.runtime import load_runner

    runner = load_runner(path, threads=settings.latency_threads)
    timing = measure_latency(runner.latency_call(sample), warmup=settings.latency_warmup,
                             runs=settings.latency_runs, min_seconds=settings.latency_min_seconds)
    return {"latency_p50_ms": timing["latency_p50_ms"], "latency_p90_ms": timing["latency_p90_ms"],
            "latency_runs": timing["latency_runs"], "latency_threads": runner.threads}


def dominates(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """``a`` is at least as accurate and at least as good on ``key`` as ``b``, and better on one."""
    no_worse = a["top1"] >= b["top1"] and a[key] <= b[key]
    return no_worse and (a["top1"] > b["top1"] or a[key] < b[key])


def select(candidates: list[dict[str, Any]], *, float_top1: float, max_accuracy_drop: float, objective: str,
           eval_samples: int = 0) -> SearchResult:
    """Judge measured candidates: top-1 drop in points, the Pareto set, the pick and each one's reason.

    The pick is the best objective (then the higher top-1, then the earlier rung) among the candidates
    whose drop is at most ``max_accuracy_drop`` points; None, with the reason, when there is none.

    Raises:
        RecipeError: an unknown objective.
    """
    check_objective(objective)
    key = OBJECTIVE_KEYS[objective]
    rows = [_with_drop({k: v for k, v in c.items() if k not in DECISION_KEYS}, float_top1, key) for c in candidates]
    measured = [row for row in rows if "error" not in row]
    within = [row for row in measured if row["drop_points"] <= max_accuracy_drop + 1e-9]
    pick = min(within, key=lambda r: (r[key], -r["top1"])) if within else None
    for row in rows:
        _decide(row, measured, pick, key, objective, max_accuracy_drop, len(within))
    pareto = sorted((r for r in rows if r.get("pareto")), key=lambda r: (r[key], -r["top1"]))
    return SearchResult(objective=objective, max_accuracy_drop=max_accuracy_drop, float_top1=float_top1,
                        eval_samples=eval_samples, candidates=rows, pareto=[r["name"] for r in pareto],
                        pick=pick["name"] if pick else None,
                        reason=_pick_reason(pick, measured, len(rows), objective, max_accuracy_drop))


def _with_drop(row: dict[str, Any], float_top1: float, key: str) -> dict[str, Any]:
    if "error" not in row:
        row["drop_points"] = round(100 * (float_top1 - row["top1"]), 2)
        row["objective_value"] = row[key]
    return row


def _decide(row: dict[str, Any], measured: list[dict[str, Any]], pick: dict[str, Any] | None, key: str,
            objective: str, budget: float, in_budget: int) -> None:
    """Fill in the row's verdict: within budget, on the Pareto front, dominated by whom, and why it lost."""
    if "error" in row:
        row.update(within_budget=False, pareto=False, dominated_by=None, picked=False, reason=f"failed: {row['error']}")
        return
    dominators = sorted((o for o in measured if dominates(o, row, key)), key=lambda o: (o is not pick, o[key]))
    row.update(within_budget=row["drop_points"] <= budget + 1e-9, pareto=not dominators,
               dominated_by=dominators[0]["name"] if dominators else None, picked=row is pick)
    row["reason"] = _loss_reason(row, pick, dominators, key, objective, budget, in_budget)


def _loss_reason(row: dict[str, Any], pick: dict[str, Any] | None, dominators: list[dict[str, Any]], key: str,
                 objective: str, budget: float, in_budget: int) -> str:
    best, worse = OBJECTIVE_WORDS[objective]
    if row is pick:
        return f"pick: the {best} of the {in_budget} candidate(s) within the budget of {budget:g} points"
    dominated = f"dominated by {dominators[0]['name']} ({_versus(dominators[0], row, key)})" if dominators else ""
    if not row["within_budget"]:
        over = f"over budget by {row['drop_points'] - budget:.2f} points (top-1 drop {row['drop_points']:.2f})"
        return f"{over}; also {dominated}" if dominated else over
    if dominated:
        return dominated
    if row[key] == pick[key]:
        return f"ties with the pick {pick['name']} on {objective} and top-1; the pick comes first in the ladder"
    return f"{worse} than the pick {pick['name']} ({_fmt(row[key], key)} vs {_fmt(pick[key], key)})"


def _versus(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    return (f"top-1 {100 * a['top1']:.2f}% vs {100 * b['top1']:.2f}%, "
            f"{_fmt(a[key], key)} vs {_fmt(b[key], key)}")


def _fmt(value: float, key: str) -> str:
    return f"{value:,} gzip bytes" if key == "gzip_bytes" else f"{value:.4g} ms"


def _pick_reason(pick: dict[str, Any] | None, measured: list[dict[str, Any]], total: int, objective: str,
                 budget: float) -> str:
    if pick is not None:
        key = OBJECTIVE_KEYS[objective]
        return (f"picked {pick['name']}: {pick['reason'].removeprefix('pick: ')} "
                f"(top-1 drop {pick['drop_points']:.2f} points, {_fmt(pick[key], key)})")
    if not measured:
        return f"no pick: every one of the {total} candidate(s) failed (see each candidate's reason)"
    closest = min(measured, key=lambda r: r["drop_points"])
    return (f"no candidate is within the budget of {budget:g} points: the smallest top-1 drop is "
            f"{closest['drop_points']:.2f} points ({closest['name']}); raise max_accuracy_drop "
            f"(--max-accuracy-drop) to at least {closest['drop_points']:.2f}, or add lossless rungs "
            "(float32, float16) to the ladder")
