"""The recipe runner: each stage as a step on a run directory, and all four chained.

Each ``run_<stage>`` reads what earlier stages recorded in the manifest, calls the stage's one
function (``train``, ``optimize``, ``export``, ``bench``), writes its artifacts atomically and
records config, inputs, outputs (sha256) and metrics. Any stage can be re-run alone.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.datasets import ImageDataset, load_dataset
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ExportValidationError, ModelError, RecipeError, RunDirError
from edgesmith.recipe import Recipe, recipe_from_dict
from edgesmith.runs import MANIFEST, RunDir, atomic_path, jsonable, read_json, write_json

log = logging.getLogger(__name__)
RECIPE_FILE = "recipe.json"


def resolved_recipe(recipe: Recipe, data_path: str | Path | None) -> dict[str, Any]:
    """The recipe as a run records it: plain JSON data, with ``--data`` resolved into ``data.path``."""
    resolved = recipe.to_dict()
    if data_path:
        resolved["data"]["path"] = str(Path(data_path).resolve())
    return jsonable(resolved)


def save_recipe(run: RunDir, recipe: Recipe, data_path: str | Path | None) -> None:
    resolved = resolved_recipe(recipe, data_path)
    write_json(run.path / RECIPE_FILE, resolved)
    run.update_manifest(recipe=resolved)


def load_run_recipe(run: RunDir) -> Recipe:
    return recipe_from_dict(read_json(run.path / RECIPE_FILE), origin=str(run.path / RECIPE_FILE))


def _save_keras(model: Any, path: Path) -> Path:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
        extra = {"include_optimizer": False} if tmp.suffix == ".h5" else {}  # no Adam moments in a deliverable
        model.save(tmp, **extra)
    return path


def run_train(run: RunDir, recipe: Recipe, data: ImageDataset) -> dict[str, Any]:
    from edgesmith.train import train

    folder = run.stage_dir("train")
    result = train(data, recipe, checkpoint_dir=folder / "checkpoints")  # a rerun resumes; removed when done
    model_path = _save_keras(result.model, folder / "model.keras")
    spec_path = result.spec.save(folder)
    history_path = write_json(folder / "history.json", result.history)
    outputs = {"model": model_path, "preprocess": spec_path, "history": history_path}
    outputs["history_plot"] = plot_history(result.history, folder / "history.png")
    run.update_manifest(data=data.describe())
    return run.record_stage("train", config={"model": recipe.to_dict()["model"], "train": recipe.to_dict()["train"],
                                             "seed": recipe.seed},
                            inputs={"data": data.source}, outputs=outputs, metrics=result.metrics)


def plot_history(history: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Training and validation accuracy per epoch, both phases on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    offset = 0
    for phase, values in history.items():
        epochs = np.arange(1, len(values.get("accuracy", [])) + 1) + offset
        for key, style in (("accuracy", "-"), ("val_accuracy", "--")):
            if key in values:
                ax.plot(epochs, values[key], style, marker="o", label=f"{phase} {key}")
        offset += len(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _load_trained(run: RunDir) -> tuple[Any, PreprocessSpec]:
    from edgesmith.runtime import load_keras_model

    model_path = run.stage_output("train", "model")
    return load_keras_model(model_path), PreprocessSpec.load_beside(model_path)


# optimize technique -> the model file's name (optimize/<name>.keras, .h5 for QAT models) and its int8 export
OPTIMIZED_NAMES = {"prune": "pruned", "qat": "qat", "cluster": "clustered", "prune_qat": "pruned_qat",
                   "cluster_qat": "clustered_qat"}
QAT_TECHNIQUES = ("qat", "prune_qat", "cluster_qat")
# tfmot serializes a cluster-preserving QAT wrapper with the default quantizers, so the saved model does not
# load back (weight count mismatch): the optimize stage ships it as int8 TFLite right away instead.
SHIPPED_BY_OPTIMIZE = ("cluster_qat",)


def run_optimize(run: RunDir, recipe: Recipe, data: ImageDataset) -> dict[str, Any]:
    from edgesmith.optimize import optimize

    model, spec = _load_trained(run)
    folder = run.stage_dir("optimize")
    started = time.perf_counter()
    result = optimize(model, data, recipe.optimize, spec=spec, seed=recipe.seed, mirror=recipe.data.mirror)
    outputs: dict[str, Path] = {}
    for technique, optimized in result.models.items():
        name = OPTIMIZED_NAMES[technique]
        if technique in SHIPPED_BY_OPTIMIZE:
            outputs[f"{name}_int8"] = _ship_int8(optimized, spec, recipe, data, folder, f"{name}_int8")
            continue
        suffix = ".h5" if technique in QAT_TECHNIQUES else ".keras"  # a QAT .keras file does not load back
        outputs[name] = _save_keras(optimized, folder / f"{name}{suffix}")
    outputs["preprocess"] = spec.save(folder)
    outputs["report"] = write_json(folder / "optimize.json", result.report)
    metrics = {"seconds": round(time.perf_counter() - started, 1), **_summary(result.report)}
    if recipe.optimize.search.enabled:
        search_outputs, metrics["search"] = run_search(model, spec, recipe, data, folder)
        outputs.update(search_outputs)
        metrics["seconds"] = round(time.perf_counter() - started, 1)
    return run.record_stage("optimize", config=recipe.to_dict()["optimize"],
                            inputs={"model": run.stage_output("train", "model")}, outputs=outputs, metrics=metrics)


def _ship_int8(model: Any, spec: PreprocessSpec, recipe: Recipe, data: ImageDataset, folder: Path, name: str
               ) -> Path:
    """A QAT model exported to int8 TFLite in ``folder``, validated against the in-memory model."""
    from edgesmith.export import export

    checks = preprocessed_samples(data, spec, "test", recipe.export.validation_samples, recipe.seed + 1)
    return export(model, "tflite-int8", recipe.export, spec=spec, out_dir=folder, name=name,
                  validation_inputs=checks, quantized=True).path


def run_search(model: Any, spec: PreprocessSpec, recipe: Recipe, data: ImageDataset, folder: Path
               ) -> tuple[dict[str, Path], dict[str, Any]]:
    """The accuracy-budgeted search into ``folder``: search.json/.md/.png and the picked file (in search/).

    Unless ``optimize.search.keep_candidates``, only the pick's file is kept of the candidates.
    """
    from edgesmith.optimize import search
    from edgesmith.optimize.search_report import write_search_report

    candidates = folder / "search"
    if candidates.exists():  # an earlier search's files would pass for this one's
        shutil.rmtree(candidates)
    result = search(model, data, recipe.optimize, spec=spec, seed=recipe.seed, mirror=recipe.data.mirror,
                    export_cfg=recipe.export, out_dir=candidates)
    if not recipe.optimize.search.keep_candidates:
        _remove_candidates(result.candidates, candidates, keep=result.pick)
    outputs = dict(write_search_report(result, folder, title=f"accuracy-budgeted search: {recipe.name}"))
    if result.pick is not None:
        outputs["search_pick"] = candidates / result.pick_row["path"]
    return outputs, search_summary(result)


def _remove_candidates(rows: list[dict[str, Any]], folder: Path, keep: str | None) -> None:
    """Delete every candidate's file but the pick's (its row's path becomes None)."""
    for row in rows:
        if row.get("path") and row["name"] != keep:
            (folder / row["path"]).unlink(missing_ok=True)
            row["path"] = None


def search_summary(result: Any) -> dict[str, Any]:
    """What the manifest records of a search: budget, objective, the pick (or none and why), the Pareto set."""
    pick = result.pick_row or {}
    return {"objective": result.objective, "max_accuracy_drop": result.max_accuracy_drop,
            "float_top1": result.float_top1, "eval_samples": result.eval_samples, "pick": result.pick,
            "reason": result.reason, "pareto": result.pareto, "candidates": len(result.candidates),
            **{f"pick_{key}": pick[key] for key in ("top1", "drop_points", "bytes", "gzip_bytes", "latency_p50_ms")
               if key in pick}}


def _summary(report: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = {}
    if "prune" in report:
        summary["prune_sparsity_overall"] = report["prune"]["sparsity_overall"]
    return summary


def float_artifact_name(fmt: str) -> str:
    """Artifact name of a float model's export: ``tflite-int8-float-io`` -> ``float_int8_float_io``,
    ``onnx-float32`` -> ``float_onnx``, ``onnx-int8`` -> ``float_onnx_int8``."""
    name = "onnx" if fmt == "onnx-float32" else fmt.removeprefix("tflite-")
    return "float_" + name.replace("-", "_")


def export_plan(run: RunDir, recipe: Recipe) -> list[tuple[str, str, Path, bool]]:
    """(artifact name, format, source model file, source is QAT) for every export of this run."""
    formats = recipe.export.formats
    plan = [(float_artifact_name(fmt), fmt, run.stage_output("train", "model"), False) for fmt in formats]
    optimized = run.stage_outputs("optimize")
    for technique, name in OPTIMIZED_NAMES.items():
        quantized = technique in QAT_TECHNIQUES  # a QAT model always ships as int8; the others when asked
        if name in optimized and (quantized or "tflite-int8" in formats):
            plan.append((f"{name}_int8", "tflite-int8", optimized[name], quantized))
    return plan


def preprocessed_samples(data: ImageDataset, spec: PreprocessSpec, split: str, count: int, seed: int) -> np.ndarray:
    """``count`` images of a split (a seeded sample), resized and normalized exactly as for training."""
    from edgesmith.optimize.check import preprocessed

    return preprocessed(data, spec, split, count, seed)[0]


def run_export(run: RunDir, recipe: Recipe, data: ImageDataset) -> dict[str, Any]:
    from edgesmith.export import export
    from edgesmith.runtime import load_keras_model

    folder = run.stage_dir("export")
    spec = PreprocessSpec.load_beside(run.stage_output("train", "model"))
    cfg = recipe.export
    calibration = preprocessed_samples(data, spec, "train", cfg.calibration_samples, recipe.seed)
    checks = preprocessed_samples(data, spec, "test", cfg.validation_samples, recipe.seed + 1)
    outputs, validations, sources = {}, {}, {}
    for name, fmt, source_path, quantized in export_plan(run, recipe):
        if source_path not in sources:
            sources[source_path] = load_keras_model(source_path)
        try:
            result = export(sources[source_path], fmt, cfg, spec=spec, out_dir=folder, name=name,
                            calibration=calibration, validation_inputs=checks, quantized=quantized)
        except ExportValidationError as exc:  # recorded; the other artifacts still count
            log.error("%s", exc)
            validations[name] = {"format": fmt, "validation": {"passed": False, "error": str(exc)}}
            continue
        outputs[name] = result.path
        validations[name] = result.to_dict()
    outputs["preprocess"] = folder / "preprocess.json"
    outputs["validation"] = write_json(folder / "validation.json", validations)
    inputs = {str(p.name): p for p in sources}
    return run.record_stage("export", config=recipe.to_dict()["export"], inputs=inputs, outputs=outputs,
                            metrics={k: v["validation"] for k, v in validations.items()})


def failed_exports(run: RunDir) -> dict[str, str]:
    """Artifacts of the run's export stage that failed validation, with the reason."""
    metrics = run.manifest().get("stages", {}).get("export", {}).get("metrics", {})
    return {name: v["error"] for name, v in metrics.items() if v and not v.get("passed", True)}


def bench_artifacts(run: RunDir, recipe: Recipe) -> dict[str, Path]:
    """Every model and exported artifact of the run, by name, in report order."""
    artifacts: dict[str, Path] = {}
    if recipe.bench.include_keras:
        artifacts["float_keras"] = run.stage_output("train", "model")
        for name, path in run.stage_outputs("optimize").items():
            if path.suffix in (".keras", ".h5"):
                artifacts[f"{name}_keras"] = path
    shipped = {**run.stage_outputs("export"), **run.stage_outputs("optimize")}  # optimize: search pick, CQAT int8
    for name, path in shipped.items():
        if path.suffix in (".tflite", ".onnx"):
            artifacts[name] = path
    return artifacts


def run_bench(run: RunDir, recipe: Recipe, data: ImageDataset) -> dict[str, Any]:
    from edgesmith.bench import bench, write_reports
    from edgesmith.data.pipeline import load_pixels

    spec = PreprocessSpec.load_beside(run.stage_output("train", "model"))
    pixels, labels = load_pixels(data.test, spec.input_size, limit=recipe.bench.eval_limit)
    inputs = spec.normalize(pixels).astype(np.float32)
    del pixels
    artifacts = bench_artifacts(run, recipe)
    report = bench(artifacts, inputs, labels, recipe.bench).to_dict()
    report["run"] = {"name": recipe.name, "path": str(run.path)}
    for row in report["rows"]:
        row["path"] = str(Path(row["path"]).resolve().relative_to(run.path.resolve()))
    written = write_reports(report, run.path, title=f"edgesmith report: {recipe.name}",
                            extra_sections=report_sections(run))
    metrics = {row["name"]: {"top1": row["top1"], "bytes": row.get("bytes"),
                             "latency_p50_ms": row["latency_p50_ms"]} for row in report["rows"]}
    return run.record_stage("bench", config=recipe.to_dict()["bench"], inputs=artifacts, outputs=written,
                            metrics=metrics)


def report_sections(run: RunDir) -> list[str]:
    """Validation of each export and the optimize stage's measured sparsity, for report.md."""
    stages = run.manifest().get("stages", {})
    lines = []
    if "export" in stages:
        lines.append("## Export validation (against the Keras source, same inputs)\n")
        lines.append("| artifact | samples | max abs diff | top-1 agreement |\n|---|---:|---:|---:|")
        for name, v in stages["export"]["metrics"].items():
            if v and "error" in v:
                lines.append(f"| {name} | FAILED: {v['error']} | | |")
            elif v:
                agreement = 100 * v["top1_agreement"]
                lines.append(f"| {name} | {v['samples']} | {v['max_abs_diff']:.2e} | {agreement:.2f}% |")
    sparsity = stages.get("optimize", {}).get("metrics", {}).get("prune_sparsity_overall")
    if sparsity is not None:
        lines.append(f"\nPruning: measured sparsity of pruned kernels {100 * sparsity:.1f}% "
                     "(unstructured sparsity shrinks gzip size, not latency).")
    return ["\n".join(lines)] if lines else []


STAGE_RUNNERS = {"train": run_train, "optimize": run_optimize, "export": run_export, "bench": run_bench}


def run_stage(stage: str, run_dir: str | Path, *, data_path: str | Path | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Re-run one stage on an existing run directory, with the recipe and data it recorded.

    ``overrides`` (``key=value``, e.g. ``bench.batch_sizes=[1, 8]``) change the recipe for this stage
    only; the stage's manifest entry records the configuration it ran with.
    """
    from edgesmith.recipe import apply_overrides

    run = RunDir.open(run_dir)
    recipe = load_run_recipe(run)
    if overrides:
        recipe = apply_overrides(recipe, list(overrides))
    data = load_dataset(recipe.data, seed=recipe.seed, data_path=data_path)
    return STAGE_RUNNERS[stage](run, recipe, data)


def run_ensemble(run_dir: str | Path, *, members: list[str] | tuple[str, ...] = (),
                 data_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The ensemble stage on a run whose train stage finished: this run's model plus ``members``' models.

    Args:
        run_dir: the run directory; its recipe's ``[ensemble]`` section (after ``overrides``) configures it.
        members: further run directories (their train stage's model joins as a member).
        data_path: the data folder, if it moved since the run was made.
        overrides: ``key=value`` recipe overrides, e.g. ``ensemble.estimators=["adaboost"]``.
    """
    from edgesmith.recipe import apply_overrides
    from edgesmith.train.ensemble.stage import run_ensemble_stage

    run = RunDir.open(run_dir)
    recipe = load_run_recipe(run)
    if overrides:
        recipe = apply_overrides(recipe, list(overrides))
    data = load_dataset(recipe.data, seed=recipe.seed, data_path=data_path)
    return run_ensemble_stage(run, recipe, data, members=list(members))


def check_model_config(recipe: Recipe) -> None:
    """Fail before any work starts if the backbone is unknown or the weights file is missing."""
    from edgesmith.zoo import get_backbone

    get_backbone(recipe.model.backbone)
    weights = recipe.model.weights
    if weights not in ("imagenet", "none", "") and not Path(weights).is_file():
        raise ModelError(f"model.weights: file {weights} does not exist; give an existing weights file, "
                         "'imagenet' or 'none'")


def run_recipe(recipe: Recipe, *, out: str | Path, data_path: str | Path | None = None, force: bool = False,
               resume: bool = False, stages: tuple[str, ...] = tuple(STAGE_RUNNERS)) -> RunDir:
    """Run the recipe's stages in order into the run directory ``out``.

    The backbone, the weights file and the data set are checked before the run directory is created.
    With ``resume``, ``out`` must hold a run of the same recipe: stages it recorded as finished whose
    outputs are unchanged (sha256) are skipped, and the first other stage and all later ones run.

    Raises:
        RunDirError: ``out`` holds a run and neither ``force`` nor ``resume`` is given; ``resume`` and
            ``force`` together; ``resume`` on a folder that holds no run.
        RecipeError: ``resume`` with a recipe that differs from the recorded one (the keys are named).
    """
    if resume and force:
        raise RunDirError("--resume and --force contradict each other: --resume continues the run in --out, "
                          "--force starts it over; pass only one")
    run = open_to_resume(out, recipe, data_path) if resume else None
    todo = stages_to_resume(run, stages) if run else stages
    if "train" in todo:
        check_model_config(recipe)
    data = load_dataset(recipe.data, seed=recipe.seed, data_path=data_path) if todo else None
    if run is None:
        run = RunDir.create(out, force=force)
        save_recipe(run, recipe, data_path)
    elif todo:
        run.update_manifest(resumed=[*run.manifest().get("resumed", []), todo[0]])
    run_stages(run, recipe, data, todo)
    return run


def run_stages(run: RunDir, recipe: Recipe, data: ImageDataset | None, stages: tuple[str, ...]) -> None:
    """Run ``stages`` in order; the manifest's status says which one did not finish if one fails."""
    started = time.perf_counter()
    if stages:  # their old records (and those of every later stage) no longer describe the outputs
        order = tuple(STAGE_RUNNERS)
        run.forget_stages(order[order.index(stages[0]):])
    for stage in stages:
        log.info("== %s ==", stage)
        stage_started = time.perf_counter()
        run.update_manifest(status=f"running {stage}")
        try:
            STAGE_RUNNERS[stage](run, recipe, data)
        except BaseException:  # Ctrl-C and errors alike: the manifest says which stage is incomplete
            run.update_manifest(status=f"incomplete: {stage} did not finish")
            raise
        log.info("%s finished in %.0f s", stage, time.perf_counter() - stage_started)
    failed = failed_exports(run)
    status = f"complete; failed validation: {', '.join(failed)}" if failed else "complete"
    timing = {"wall_seconds": round(time.perf_counter() - started, 1)} if stages else {}
    run.update_manifest(status=status, **timing)


def open_to_resume(out: str | Path, recipe: Recipe, data_path: str | Path | None) -> RunDir:
    """The run directory ``out``, checked to hold a run of this very recipe."""
    if not (Path(out) / MANIFEST).is_file():
        raise RunDirError(f"--resume: {out} holds no run to resume (no {MANIFEST}); "
                          "drop --resume to start a new run there")
    run = RunDir.open(out)
    recorded = resolved_recipe(load_run_recipe(run), None)  # keys added to Recipe since then read as defaults
    differing = differing_keys(recorded, resolved_recipe(recipe, data_path))
    if differing:
        shown = "; ".join(f"{key} (recorded {old!r}, given {new!r})" for key, old, new in differing)
        raise RecipeError(f"--resume: the recipe differs from the one recorded in {run.path / RECIPE_FILE} at "
                          f"{shown}; resume with the same recipe, --set, --strict and --data values, "
                          "or start over with --force")
    return run


def differing_keys(recorded: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, given value) for every key whose values differ, in sorted key order."""
    old, new = _flatten(recorded), _flatten(given)
    keys = sorted(old.keys() | new.keys())
    return [(key, old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)]


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stages_to_resume(run: RunDir, stages: tuple[str, ...]) -> tuple[str, ...]:
    """The first of ``stages`` that has not finished with its outputs intact, and every later one."""
    finished = run.manifest().get("stages", {})
    for index, stage in enumerate(stages):
        if stage not in finished:
            log.info("resume: %s has not finished; running it and every later stage", stage)
            return stages[index:]
        changed = run.changed_outputs(stage)
        if changed:
            log.info("resume: %s outputs missing or changed since recorded (%s); running it again and every "
                     "later stage", stage, ", ".join(changed))
            return stages[index:]
        log.info("resume: %s finished and its outputs are intact; skipped", stage)
    log.info("resume: every stage finished and its outputs are intact; nothing to run")
    return ()
