"""Pruning on the fine-tuned CIFAR-10 model: top-1 of dense vs pruned on all 10,000 test images, and sizes.

    python benchmarks/prune_cifar10.py --model runs/cifar10/train/model.keras \\
        --data ../shared/data/cifar10 --out /tmp/prune_cifar10 --sparsity 0.5 0.8 --epochs 2

Every pruning level shares one activation cache at the freeze boundary (computed once). For each level
it prints the dense and pruned Keras top-1, the int8 TFLite top-1, and the raw/gzip bytes of the int8
file next to the float32 TFLite file's bytes (the baseline of the "<= 0.10x" goal).
"""

from __future__ import annotations

# isort: off
import edgesmith._keras  # noqa: F401  (Keras 2 before anything imports TensorFlow)

# isort: on
import argparse
import dataclasses
import gzip
import json
import logging
import time
from pathlib import Path

import numpy as np

from edgesmith.data.datasets import load_dataset
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.spec import PreprocessSpec
from edgesmith.export import export
from edgesmith.optimize.finetune import FineTuner
from edgesmith.optimize.pruning import prune
from edgesmith.recipe import ExportConfig, load_recipe
from edgesmith.runtime import load_keras_model, load_runner
from edgesmith.workflow import preprocessed_samples


def keras_top1(model, data, spec) -> float:
    pipeline = make_pipeline(data.test, spec, batch_size=256)
    correct = total = 0
    for images, labels in pipeline:
        predictions = model(images, training=False).numpy().argmax(-1)
        correct += int(np.sum(predictions == labels.numpy()))
        total += len(labels)
    return correct / total


def artifact_top1(path: Path, data, spec) -> float:
    runner = load_runner(path)
    correct = total = 0
    for images, labels in make_pipeline(data.test, spec, batch_size=64):
        correct += int(np.sum(runner.predict(images.numpy()).argmax(-1) == labels.numpy()))
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/cifar10/train/model.keras")
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--recipe", default="recipes/cifar10.toml")
    parser.add_argument("--out", default="/tmp/prune_cifar10")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="training images to fine-tune on (0: all)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--float32-bytes", type=int, default=13_863_372, help="float32 TFLite bytes (README run)")
    parser.add_argument("--prune-frozen", action="store_true",
                        help="also prune the frozen layers below the freeze boundary (one shot, by magnitude)")
    parser.add_argument("--skip-dense", action="store_true", help="do not re-measure the dense model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe)
    data = load_dataset(recipe.data, seed=recipe.seed, data_path=args.data)
    model, spec = load_keras_model(args.model), PreprocessSpec.load_beside(args.model)
    calibration = preprocessed_samples(data, spec, "train", recipe.export.calibration_samples, recipe.seed)
    results = {"dense_top1": None if args.skip_dense else keras_top1(model, data, spec), "args": vars(args)}
    print(f"dense Keras top-1: {results['dense_top1']}", flush=True)
    base_cfg = dataclasses.replace(recipe.optimize, finetune_samples=args.samples, prune_epochs=args.epochs,
                                   prune_learning_rate=args.lr, batch_size=args.batch,
                                   prune_frozen=args.prune_frozen)
    tuner = FineTuner(model, data, base_cfg, spec=spec, seed=recipe.seed, mirror=recipe.data.mirror)
    for sparsity in args.sparsity:
        started = time.perf_counter()
        cfg = dataclasses.replace(base_cfg, sparsity=sparsity)
        pruned, report = prune(model, data, cfg, spec=spec, seed=recipe.seed, tuner=tuner)
        seconds = time.perf_counter() - started
        name = f"pruned{int(sparsity * 100)}"
        pruned.save(out / f"{name}.keras")
        exported = export(pruned, "tflite-int8", ExportConfig(), spec=spec, out_dir=out, name=f"{name}_int8",
                          calibration=calibration)
        raw = exported.path.read_bytes()
        row = {"sparsity": sparsity, "seconds": round(seconds, 1), "keras_top1": keras_top1(pruned, data, spec),
               "int8_top1": artifact_top1(exported.path, data, spec), "int8_bytes": len(raw),
               "int8_gzip_bytes": len(gzip.compress(raw, 9)), "float32_tflite_bytes": args.float32_bytes}
        row["int8_gzip_ratio"] = round(row["int8_gzip_bytes"] / args.float32_bytes, 4)
        row["sparsity_all_kernels"] = report["sparsity_all_kernels"]
        row["report"] = {k: v for k, v in report.items() if k not in ("sparsity_per_layer", "skipped_layers")}
        results[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'model':<12} {'Keras top-1':>12} {'int8 top-1':>11} {'int8 gzip':>10} {'x float32':>10}")
    print(f"{'dense':<12} {results['dense_top1'] or float('nan'):>12.4f}")
    for key, row in results.items():
        if key.startswith("pruned") and isinstance(row, dict):
            print(f"{key:<12} {row['keras_top1']:>12.4f} {row['int8_top1']:>11.4f} {row['int8_gzip_bytes']:>10,} "
                  f"{row['int8_gzip_ratio']:>10.3f}")


if __name__ == "__main__":
    main()
