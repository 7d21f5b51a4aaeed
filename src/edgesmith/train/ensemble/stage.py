"""The ensemble stage on a run directory: members, every ensemble, the shipped files, the report.

Members are this run's fine-tuned model and the train-stage models of the run directories named in
``ensemble.members``. Their probabilities and embeddings are computed once per split and cached as npz in
``ensemble/members/`` (keyed by the model file's sha256). Fitted scikit-learn models are pickled with
:func:`edgesmith.safety.save_pickle` and recorded in the manifest, so :func:`load_estimator` can verify them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.datasets import ImageDataset, load_dataset
from edgesmith.data.pipeline import load_pixels, make_pipeline
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError
from edgesmith.recipe import Recipe
from edgesmith.runs import RunDir, sha256_file, write_json
from edgesmith.safety import load_pickle, save_pickle
from edgesmith.train.ensemble import report
from edgesmith.train.ensemble.core import MemberOutputs, fit_ensembles
from edgesmith.train.ensemble.deploy import Shipper
from edgesmith.train.ensemble.fold import embedding_model
from edgesmith.train.ensemble.leakage import row_ids
from edgesmith.train.ensemble.members import EMBEDDING_LAYER

log = logging.getLogger(__name__)
STAGE = "ensemble"


def member_runs(run: RunDir, recipe: Recipe, extra: list[str] | None = None) -> list[RunDir]:
    """This run first, then every member run directory (recipe ``ensemble.members`` plus ``extra``)."""
    return [run, *(RunDir.open(path) for path in dict.fromkeys([*recipe.ensemble.members, *(extra or [])]))]


def predict_outputs(model: Any, spec: PreprocessSpec, data: ImageDataset, splits: tuple[str, ...],
                    batch_size: int = 256, *, flip: bool = False) -> dict[str, np.ndarray]:
    """``<split>_probs``, ``<split>_emb`` and ``<split>_labels`` for each split, from the images (mirrored
    first if ``flip``)."""
    from edgesmith._keras import keras, tf

    both = keras.Model(model.input, [model.output, model.get_layer(EMBEDDING_LAYER).output])
    run = tf.function(lambda batch: both(batch, training=False))
    out: dict[str, np.ndarray] = {}
    for split in splits:
        probs, embs, labels = [], [], []
        for images, batch_labels in make_pipeline(getattr(data, split), spec, batch_size=batch_size, flip=flip):
            p, e = run(images)
            probs.append(p.numpy())
            embs.append(e.numpy())
            labels.append(batch_labels.numpy())
        out.update({f"{split}_probs": np.concatenate(probs), f"{split}_emb": np.concatenate(embs),
                    f"{split}_labels": np.concatenate(labels)})
    return out


def _member(member_run: RunDir, name: str, data: ImageDataset, folder: Path, splits: tuple[str, ...],
            trained_rows: np.ndarray) -> tuple[MemberOutputs, Any, PreprocessSpec]:
    from edgesmith.runtime import load_keras_model

    model_path = member_run.stage_output("train", "model")
    model, spec = load_keras_model(model_path), PreprocessSpec.load_beside(model_path)
    cache = folder / f"{name}-{sha256_file(model_path)[:16]}.npz"
    if not cache.is_file():
        MemberOutputs.from_arrays(predict_outputs(model, spec, data, splits), name, trained_rows).save(cache)
    return MemberOutputs.load(cache, name, trained_rows=trained_rows), model, spec


def _trained_rows(member_run: RunDir, data: ImageDataset, first: bool) -> np.ndarray:
    """Rows the member's train stage saw: its own data set's train split (this run's for the first member)."""
    if first:
        return row_ids(data.train)
    from edgesmith.workflow import load_run_recipe

    other = load_run_recipe(member_run)
    source = member_run.manifest().get("data", {}).get("source") or ""
    # a folder or shard directory is recorded as its path; bundled sets (digits) by a name that is no folder
    data_path = source if source and Path(source).is_dir() else None
    return row_ids(load_dataset(other.data, seed=other.seed, data_path=data_path).train)


def _check_specs(specs: list[PreprocessSpec], names: list[str]) -> None:
    for spec, name in zip(specs[1:], names[1:], strict=True):
        if spec != specs[0]:
            raise ModelError(f"ensemble member {name}: preprocessing {spec.to_dict()} differs from this run's "
                             f"{specs[0].to_dict()}; members must share input size, normalization and classes")


def run_ensemble_stage(run: RunDir, recipe: Recipe, data: ImageDataset, *,
                       members: list[str] | None = None) -> dict[str, Any]:
    """Fit, score, ship and report every ensemble of the recipe's ``[ensemble]`` section."""
    cfg, folder = recipe.ensemble, run.stage_dir(STAGE)
    runs = member_runs(run, recipe, members)
    names = ["this_run", *(Path(r.path).name for r in runs[1:])]
    splits = tuple(dict.fromkeys((cfg.fit_split, "test")))
    loaded = [_member(r, n, data, folder / "members", splits, _trained_rows(r, data, i == 0))
              for i, (r, n) in enumerate(zip(runs, names, strict=True))]
    outputs, models, specs = (list(x) for x in zip(*loaded, strict=True))
    _check_specs(specs, names)
    split_rows = {s: row_ids(getattr(data, s)) for s in ("train", "val", "test") if getattr(data, s) is not None}
    rows = fit_ensembles(outputs, cfg, split_rows=split_rows, seed=recipe.seed)
    pixels, _ = load_pixels(data.test, specs[0].input_size)
    inputs = specs[0].normalize(pixels).astype(np.float32)
    shared = _shared_cut(models) if cfg.shared_trunk else None
    shipper = Shipper(models, outputs[0], inputs, spec=specs[0], cfg=recipe.export, out_dir=folder,
                      shared_cut=shared, formats=cfg.export_formats,
                      latency_runs=cfg.latency_runs, pickles=save_estimators(rows, folder))
    table = shipper.ship(rows)
    written = report.write(table, folder, eval_samples=len(inputs))
    combiners = write_json(folder / "combiners.json", {r.name: combiner_dict(r) for r in rows
                                                        if hasattr(r.fitted, "kernel_")})
    outputs_map = {**written, "combiners": combiners, **shipper.outputs,
                   **{f"{name}_pickle": path for name, path in shipper.pickles.items()}}
    metrics = {t["name"]: {k: t.get(k) for k in ("family", "top1", "bytes", "latency_p50_ms", "export_agreement")}
               for t in table}
    return run.record_stage(STAGE, config=recipe.to_dict()["ensemble"],
                            inputs={n: r.stage_output("train", "model") for n, r in zip(names, runs, strict=True)},
                            outputs=outputs_map, metrics=metrics)


def _shared_cut(models: list[Any]) -> int | None:
    """The deepest single-tensor cut below which every member has identical weights, or None."""
    from edgesmith.train.transfer import freeze_boundary

    if len(models) < 2:
        return None
    first = models[0]
    for index, layer in enumerate(first.layers):
        same = all(len(m.layers) > index and type(m.layers[index]) is type(layer)
                   and _same_weights(m.layers[index], layer) for m in models[1:])
        if not same:
            break
    if index < 2:
        return None
    try:
        return freeze_boundary(first, index)[0]
    except ModelError:
        return None


def _same_weights(a: Any, b: Any) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def save_estimators(rows: list[Any], folder: Path) -> dict[str, Path]:
    """Pickle every fitted scikit-learn estimator (recorded as stage outputs, so loading can verify them)."""
    return {r.name: save_pickle(r.fitted, folder / f"{r.name}.pkl") for r in rows
            if r.fitted is not None and hasattr(r.fitted, "predict_proba")}


def combiner_dict(row: Any) -> dict[str, Any]:
    c = row.fitted
    return {"kind": c.kind, "members": row.members, "kernel": c.kernel_.tolist(), "bias": c.bias_.tolist(),
            "softmax": c.softmax}


def load_estimator(run_dir: str | Path, name: str, *, trust: bool = False) -> Any:
    """A fitted scikit-learn ensemble of a run's ensemble stage, verified by the manifest unless ``trust``."""
    return load_pickle(RunDir.open(run_dir).stage_output(STAGE, f"{name}_pickle"), trust=trust)


__all__ = ["embedding_model", "load_estimator", "predict_outputs", "run_ensemble_stage"]
