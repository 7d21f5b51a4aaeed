"""Train extra CIFAR-10 network members for the ensemble measurement, on one shared boundary cache.

    nice -n 10 .venv/bin/python benchmarks/ensemble_cifar10_members.py --out runs/ensemble_members \
        --reference runs/cifar10/train/model.keras --member seed1:1 --member boot2:2:bootstrap

Each ``--member NAME:SEED[:bootstrap]`` is fine-tuned with the reference run's recipe (same data split,
so the 5,000 validation images stay unseen by every member) and saved as ``OUT/NAME/model.keras``;
``OUT/NAME/outputs.npz`` holds its probabilities and pooled embeddings for train, val and test.
"""

from __future__ import annotations

# isort: off
import edgesmith._keras  # noqa: F401
# isort: on
import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from edgesmith.data.datasets import load_dataset
from edgesmith.recipe import recipe_from_dict
from edgesmith.runs import read_json, write_json
from edgesmith.runtime import load_keras_model
from edgesmith.train.ensemble.members import BoundaryCache, check_shared_lower, member_outputs, train_member
from edgesmith.workflow import _save_keras

SPLITS = ("train", "val", "test")


def train_recipe(path: Path):
    """The sections of a run's recipe that the members depend on (data split, model, train)."""
    raw = read_json(path)
    return recipe_from_dict({key: raw[key] for key in ("name", "seed", "data", "model", "train")}, origin=str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="the train stage's model.keras")
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--member", action="append", default=[], help="NAME:SEED[:bootstrap]")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="0 keeps the recipe's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipe = train_recipe(args.reference.parent.parent / "recipe.json")
    if args.finetune_epochs:
        recipe.train.finetune_epochs = args.finetune_epochs
    data = load_dataset(recipe.data, seed=recipe.seed, data_path=args.data)
    started = time.perf_counter()
    cache = BoundaryCache.build(recipe, data, SPLITS)
    print(f"boundary cache: {time.perf_counter() - started:.0f} s", flush=True)
    reference = load_keras_model(args.reference)
    check_shared_lower(reference, cache.reference, cache.cut)
    save_member(args.out / "reference", reference, cache, {"source": str(args.reference)}, copy=False)
    for item in args.member:
        name, seed, *flags = item.split(":")
        model, info = train_member(recipe, data, cache, seed=int(seed), bootstrap="bootstrap" in flags)
        save_member(args.out / name, model, cache, info, copy=True)


def save_member(folder: Path, model, cache: BoundaryCache, info: dict, *, copy: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if copy:
        _save_keras(model, folder / "model.keras")
        cache.spec.save(folder)
    outputs = member_outputs(model, cache, SPLITS)
    np.savez(folder / "outputs.npz", **outputs)
    accuracy = {s: float(np.mean(outputs[f"{s}_probs"].argmax(1) == outputs[f"{s}_labels"])) for s in SPLITS}
    write_json(folder / "member.json", {**info, "accuracy": accuracy})
    print(folder.name, json.dumps({k: v for k, v in info.items() if k != "history"}), accuracy, flush=True)


if __name__ == "__main__":
    main()
