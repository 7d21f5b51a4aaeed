"""Ship an ensemble as one file: folded Keras graph -> TFLite / ONNX, or network + scikit-learn -> one ONNX.

Every file is validated twice on the same preprocessed inputs: against the model it was converted from
(the usual export check) and against the in-process ensemble (member probabilities combined in NumPy /
scikit-learn), whose agreement is what says the shipped file is the ensemble that was scored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.spec import PreprocessSpec
from edgesmith.export import export
from edgesmith.export.validate import Validation, validate_artifact
from edgesmith.recipe import ExportConfig
from edgesmith.runtime import load_runner
from edgesmith.safety import save_pickle
from edgesmith.train.ensemble.combine import LINEAR_KINDS
from edgesmith.train.ensemble.core import EnsembleRow, MemberOutputs
from edgesmith.train.ensemble.fold import embedding_model, fold_ensemble, fold_members
from edgesmith.train.ensemble.onnx_join import in_process, write_joined

log = logging.getLogger(__name__)


def agreement(artifact: str | Path, inputs: np.ndarray, reference: np.ndarray, batch_size: int = 64) -> float:
    """Share of ``inputs`` on which the artifact's top-1 class equals the in-process ensemble's."""
    runner = load_runner(artifact)
    predicted = np.concatenate([runner.predict(inputs[i : i + batch_size]).argmax(-1)
                                for i in range(0, len(inputs), batch_size)])
    return float(np.mean(predicted == reference.argmax(-1)))


def export_folded(model: Any, formats: list[str], cfg: ExportConfig, *, spec: PreprocessSpec, out_dir: str | Path,
                  name: str, validation_inputs: np.ndarray) -> dict[str, dict[str, Any]]:
    """Export a folded ensemble (any Keras model) to each format, validated like every export."""
    results = {}
    for fmt in formats:
        result = export(model, fmt, cfg, spec=spec, out_dir=out_dir, name=name,
                        validation_inputs=validation_inputs)
        results[fmt] = result.to_dict()
    return results


def export_joined(network: Any, estimator: Any, *, spec: PreprocessSpec, out_dir: str | Path, name: str,
                  validation_inputs: np.ndarray, cfg: ExportConfig) -> tuple[Path, Validation]:
    """Network + scikit-learn model as one ONNX file, validated against the in-process pipeline."""
    out_dir = Path(out_dir)
    path = write_joined(network, estimator, out_dir / f"{name}.onnx", opset=cfg.onnx_opset)
    spec.save(out_dir)
    reference = in_process(network, estimator, validation_inputs)
    validation = validate_artifact(None, path, validation_inputs, max_abs_diff=cfg.max_abs_diff_float,
                                   min_top1_agreement=cfg.min_top1_agreement, reference=reference)
    log.info("joined %s: max |diff| %.2g, top-1 agreement %.4f", path.name, validation.max_abs_diff,
             validation.top1_agreement)
    return path, validation


def check_inputs(inputs: np.ndarray, count: int = 500) -> np.ndarray:
    """An evenly spaced sample of the held-out inputs for the usual export check."""
    return inputs[:: max(1, len(inputs) // count)][:count]


def cost(path: Path, inputs: np.ndarray, runs: int) -> dict[str, Any]:
    """Bytes on disk and batch-1 p50 latency of an artifact."""
    from edgesmith.bench.measure import measure_latency

    timing = measure_latency(load_runner(path).bind(inputs[:1]), warmup=5, runs=runs)
    return {"bytes": path.stat().st_size, "latency_p50_ms": timing["latency_p50_ms"], "path": str(path)}


class Shipper:
    """Turns scored ensemble rows into files and measured rows (artifact, size, latency, export agreement).

    Args:
        models: the network members (Keras), in the order of the rows' members; the first gives embeddings.
        inputs: the preprocessed held-out inputs the rows were scored on, in the same order.
        shared_cut: the members' shared frozen layers (see :func:`fold_ensemble`), or None.
    """

    def __init__(self, models: list[Any], first: MemberOutputs, inputs: np.ndarray, *, spec: PreprocessSpec,
                 cfg: ExportConfig, out_dir: str | Path, shared_cut: int | None, formats: list[str],
                 latency_runs: int = 50, pickles: dict[str, Path] | None = None) -> None:
        self.models, self.first, self.inputs, self.spec, self.cfg = models, first, inputs, spec, cfg
        self.out, self.cut, self.formats, self.runs = Path(out_dir), shared_cut, formats, latency_runs
        self.checks = check_inputs(inputs)
        self.outputs: dict[str, Path] = {}
        self.pickles: dict[str, Path] = dict(pickles or {})

    def ship(self, rows: list[EnsembleRow]) -> list[dict[str, Any]]:
        """One measured dict per row; the best linear ensemble is folded and exported to every format."""
        member_file = export(self.models[0], self.formats[0], self.cfg, spec=self.spec, out_dir=self.out / "member",
                             name="member", validation_inputs=self.checks).path
        self.member_cost = cost(member_file, self.inputs, self.runs)
        linear = [r for r in rows if r.name in LINEAR_KINDS]
        best = max(linear, key=lambda r: r.top1).name if linear else None
        table = [self._ship_row(row, best) for row in rows]
        shipped = next((t for t in table if t["name"] == best), {})
        for t in table:
            if t.get("artifact", "").startswith("same graph"):
                t.update({k: shipped.get(k) for k in ("bytes", "latency_p50_ms")})
        return table

    def _ship_row(self, row: EnsembleRow, best: str | None) -> dict[str, Any]:
        entry = row.summary()
        if row.family == "member":
            entry.update(self.member_cost, artifact=f"member {self.formats[0]} (first member's file)")
        elif row.name == best:
            entry.update(self.ship_linear(row))
        elif row.name in LINEAR_KINDS:
            entry.update(artifact=f"same graph as {best}")
        elif row.name == "bagged_networks":
            entry.update(artifact="not exported (a folded average of its members)")
        else:
            entry.update(self._ship_estimator(row))
        return entry

    def ship_linear(self, row: EnsembleRow) -> dict[str, Any]:
        started = time.perf_counter()
        folded = fold_ensemble(self.models, row.fitted, shared_cut=self.cut, name=f"{row.name}_ensemble")
        exports = export_folded(folded, self.formats, self.cfg, spec=self.spec, out_dir=self.out / row.name,
                                name="ensemble", validation_inputs=self.checks)
        result: dict[str, Any] = {"export_seconds": round(time.perf_counter() - started, 1), "exports": {}}
        for fmt, info in exports.items():
            path = Path(info["path"])
            self.outputs[f"{row.name}_{fmt}"] = path
            result["exports"][fmt] = {"path": str(path), "bytes": info["bytes"], "validation": info["validation"],
                                      "agreement_in_process": agreement(path, self.inputs, row.probs)}
        first = Path(exports[self.formats[0]]["path"])
        result.update(cost(first, self.inputs, self.runs), artifact=f"folded {first.suffix[1:]} (one file per format)",
                      export_agreement=min(e["agreement_in_process"] for e in result["exports"].values()))
        return result

    def _ship_estimator(self, row: EnsembleRow) -> dict[str, Any]:
        network = fold_members(self.models, shared_cut=self.cut) if row.name == "forest_stack" \
            else embedding_model(self.models[0])
        try:
            path, validation = export_joined(network, row.fitted, spec=self.spec, out_dir=self.out / row.name,
                                             name="ensemble", validation_inputs=self.checks, cfg=self.cfg)
        except Exception as exc:  # a converter gap (skl2onnx): recorded, and the row is costed in-process
            log.warning("%s: no single ONNX file (%s: %s)", row.name, type(exc).__name__, str(exc)[:200])
            return {**self._in_process(row), "export_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        self.outputs[f"{row.name}_onnx"] = path
        return {**cost(path, self.inputs, self.runs), "artifact": "joined ONNX (network + skl2onnx)",
                "validation": validation.to_dict(), "export_agreement": agreement(path, self.inputs, row.probs)}

    def _in_process(self, row: EnsembleRow) -> dict[str, Any]:
        """No single file: the first member's file plus the pickled estimator, timed one after the other."""
        from edgesmith.bench.measure import measure_latency

        if row.name not in self.pickles:
            self.pickles[row.name] = save_pickle(row.fitted, self.out / f"{row.name}.pkl")
        path = self.pickles[row.name]
        one = self.first.embeddings["test"][:1].astype(np.float32)
        timing = measure_latency(lambda: row.fitted.predict_proba(one), warmup=3, runs=self.runs)
        return {"bytes": self.member_cost["bytes"] + path.stat().st_size,
                "artifact": f"in-process: member {self.formats[0]} + pickle",
                "latency_p50_ms": self.member_cost["latency_p50_ms"] + timing["latency_p50_ms"]}
