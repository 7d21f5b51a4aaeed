"""Measure ensembles on CIFAR-10: members, bagging, boosting, stacking, and the shipped single files.

    nice -n 10 .venv/bin/python benchmarks/ensemble_cifar10.py --members runs/ensemble_members \
        --reference runs/cifar10/train/model.keras --out runs/ensemble_report

Reads the members written by ``ensemble_cifar10_members.py`` (probabilities and embeddings per split),
fits every ensemble on the 5,000 validation images no member was trained on, scores everything on all
10,000 test images, folds the best linear ensemble into one Keras graph and exports it to TFLite and
ONNX, joins the network with tree models into single ONNX files, and checks every file's top-1 agreement
with the in-process ensemble on all test images. Prints the table; writes ensemble.md/json/png.
"""

from __future__ import annotations

# isort: off
import edgesmith._keras  # noqa: F401
# isort: on
import argparse
import logging
import time
from pathlib import Path

import numpy as np
from ensemble_cifar10_members import train_recipe  # this folder's member script (run as a script: on sys.path)

from edgesmith.data.datasets import load_dataset
from edgesmith.data.pipeline import load_pixels
from edgesmith.data.spec import PreprocessSpec
from edgesmith.recipe import EnsembleConfig, ExportConfig
from edgesmith.runs import read_json
from edgesmith.runtime import load_keras_model
from edgesmith.train.ensemble import report
from edgesmith.train.ensemble.core import MemberOutputs, fit_ensembles
from edgesmith.train.ensemble.deploy import Shipper
from edgesmith.train.ensemble.leakage import row_ids
from edgesmith.train.ensemble.members import bootstrap_rows, boundary_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--estimators", default=",".join(EnsembleConfig().estimators),
                        help="comma-separated scikit-learn ensembles to fit (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = train_recipe(args.reference.parent.parent / "recipe.json")
    data = load_dataset(recipe.data, seed=recipe.seed, data_path=args.data)
    splits = {name: row_ids(getattr(data, name)) for name in ("train", "val", "test")}
    members, models = load_members(args.members, args.reference, splits["train"])
    started = time.perf_counter()
    cfg = EnsembleConfig(estimators=[e for e in args.estimators.split(",") if e])
    rows = fit_ensembles(members, cfg, split_rows=splits, seed=recipe.seed)
    print(f"fitted all ensembles in {time.perf_counter() - started:.0f} s", flush=True)
    spec = PreprocessSpec.load_beside(args.reference)
    pixels, labels = load_pixels(data.test, spec.input_size)
    test = spec.normalize(pixels).astype(np.float32)
    del pixels
    assert np.array_equal(labels, members[0].labels["test"]), "test order differs from the cached outputs"
    shipper = Shipper(models, members[0], test, spec=spec, cfg=ExportConfig(), out_dir=args.out,
                      shared_cut=boundary_index(models[0], recipe), formats=["tflite-float32", "onnx-float32"],
                      latency_runs=args.latency_runs)
    table = shipper.ship(rows)
    for row in table:
        print({k: row.get(k) for k in ("name", "family", "top1", "bytes", "latency_p50_ms", "export_agreement")})
    written = report.write(table, args.out, eval_samples=len(labels), extra=notes(table))
    print("\n" + written["report"].read_text())


def load_members(folder: Path, reference: Path, train_rows: np.ndarray) -> tuple[list[MemberOutputs], list]:
    members, models = [], []
    for sub in sorted(p for p in folder.iterdir() if (p / "outputs.npz").is_file()):
        info = read_json(sub / "member.json")
        bootstrap = bool(info.get("bootstrap"))
        rows = train_rows[np.unique(bootstrap_rows(len(train_rows), info["seed"]))] if bootstrap else train_rows
        members.append(MemberOutputs.load(sub / "outputs.npz", sub.name, bootstrap=bootstrap, trained_rows=rows))
        models.append(load_keras_model(reference if sub.name == "reference" else sub / "model.keras"))
    order = sorted(range(len(members)), key=lambda i: members[i].name != "reference")  # reference first
    return [members[i] for i in order], [models[i] for i in order]


def notes(table: list[dict]) -> str:
    best_member = max(t["top1"] for t in table if t["family"] == "member")
    best = max((t for t in table if t["family"] != "member"), key=lambda t: t["top1"])
    lines = [f"Best single member {100 * best_member:.2f}%; best ensemble {best['name']} {100 * best['top1']:.2f}% "
             f"({100 * (best['top1'] - best_member):+.2f} points)."]
    for t in table:
        for fmt, e in t.get("exports", {}).items():
            lines.append(f"- {t['name']} {fmt}: agrees with the in-process ensemble on "
                         f"{100 * e['agreement_in_process']:.2f}% of the test images; export check vs the folded "
                         f"Keras graph: max |diff| {e['validation']['max_abs_diff']:.2e}, "
                         f"agreement {100 * e['validation']['top1_agreement']:.2f}% on {e['validation']['samples']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
