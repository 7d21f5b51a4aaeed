"""Shared fixtures: tiny generated data, a trained tiny model, the real data folders, a quick recipe.

``edgesmith._keras`` is imported first, before anything can import TensorFlow: it selects Keras 2
(tf_keras), which tensorflow-model-optimization needs.
"""

from __future__ import annotations

# isort: off
import edgesmith._keras  # noqa: F401  (selects Keras 2: must run before anything imports tensorflow)

# isort: on
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgesmith._keras import keras

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
CIFAR10_DIR = SHARED / "data" / "cifar10"
IMAGENET_SAMPLES_DIR = SHARED / "data" / "imagenet-samples"
KERAS_MODELS_DIR = Path.home() / ".keras" / "models"

# The bundled quickstart recipe made quick: fewer epochs, fewer samples, fewer timed runs.
QUICK_OVERRIDES = [
    "train.head_epochs=5",
    "train.patience=3",
    "optimize.prune_epochs=1",
    "optimize.qat_epochs=1",
    "optimize.finetune_samples=400",
    "export.calibration_samples=100",
    "export.validation_samples=100",
    "bench.warmup=2",
    "bench.runs=10",
    "bench.min_seconds=0.1",
]

# Three visually distinct classes: mostly red, mostly green, mostly blue.
CLASS_COLORS = {"apple": (200, 30, 30), "leaf": (30, 180, 40), "sea": (20, 40, 200)}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_image_folder(
    root: Path,
    *,
    classes: dict[str, tuple[int, int, int]] | None = None,
    per_class: int = 10,
    test_per_class: int = 4,
    size: int = 20,
    seed: int = 0,
) -> Path:
    """``root/train/<class>/*`` and ``root/test/<class>/*``: noisy solid-colour images, PNG and JPEG mixed."""
    rng = np.random.default_rng(seed)
    classes = classes or CLASS_COLORS
    for split, count in (("train", per_class), ("test", test_per_class)):
        for name, color in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-25, 26, size=(size, size, 3))
                pixels = np.clip(np.asarray(color) + noise, 0, 255).astype(np.uint8)
                suffix = ".png" if i % 2 == 0 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture
def make_image_folder():
    """The folder factory, for tests that need their own (possibly broken) copy."""
    return write_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A tiny image folder: 3 classes, 10 train and 4 test images each, 20x20 px. Read-only."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "colors")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 JPEG folder beside the repository (../shared/data/cifar10)."""
    if not (CIFAR10_DIR / "train").is_dir() or not (CIFAR10_DIR / "test").is_dir():
        pytest.skip(f"real CIFAR-10 folder not found at {CIFAR10_DIR} (needs train/<class>/*.jpg and test/)")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def imagenet_samples_dir() -> Path:
    if not IMAGENET_SAMPLES_DIR.is_dir():
        pytest.skip(f"ImageNet sample photos not found at {IMAGENET_SAMPLES_DIR}")
    return IMAGENET_SAMPLES_DIR


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """Keras's MobileNet 1.0 ImageNet weight files (no network here: they must be in ~/.keras/models)."""
    needed = [
        KERAS_MODELS_DIR / "mobilenet_1_0_224_tf.h5",
        KERAS_MODELS_DIR / "mobilenet_1_0_224_tf_no_top.h5",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(
            f"MobileNet ImageNet weights missing: {', '.join(missing)} "
            "(copy ../shared/keras-cache/models/* to ~/.keras/models)"
        )
    return KERAS_MODELS_DIR


@pytest.fixture(scope="session")
def quick_overrides() -> list[str]:
    return list(QUICK_OVERRIDES)


@pytest.fixture(scope="session")
def quick_recipe():
    """The bundled quickstart recipe with epochs, samples and timed runs reduced."""
    from edgesmith.recipe import apply_overrides, load_recipe

    return apply_overrides(load_recipe("quickstart"), QUICK_OVERRIDES)


@pytest.fixture(scope="session")
def digits_data():
    """scikit-learn's digits with a seeded, stratified validation split."""
    from edgesmith.data.datasets import digits, with_validation

    return with_validation(digits(seed=0), 0.15, 0)


def tiny_recipe(**sections):
    """A recipe for the tiny_cnn backbone (16 px) on digits; ``sections`` update its tables."""
    from edgesmith.recipe import recipe_from_dict

    raw = {
        "name": "tiny",
        "seed": 7,
        "data": {"dataset": "digits", "mirror": False},
        "model": {
            "backbone": "tiny_cnn",
            "weights": "none",
            "input_size": 16,
            "dense_units": 32,
            "dropout": 0.1,
        },
        "train": {
            "batch_size": 32,
            "head_epochs": 8,
            "head_learning_rate": 3e-3,
            "finetune_epochs": 0,
            "cache_features": False,
            "patience": 8,
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return recipe_from_dict(raw, origin="test")


@pytest.fixture(scope="session")
def trained_tiny(digits_data):
    """tiny_cnn trained from scratch on digits (a few seconds). Treat as read-only."""
    from edgesmith.train import train

    return train(digits_data, tiny_recipe())


@pytest.fixture(scope="session")
def tiny_test_inputs(digits_data, trained_tiny):
    """The digits test split, preprocessed with the tiny model's spec: (inputs float32, labels)."""
    from edgesmith.data.pipeline import load_pixels

    spec = trained_tiny.spec
    pixels, labels = load_pixels(digits_data.test, spec.input_size)
    return spec.normalize(pixels).astype(np.float32), labels


@pytest.fixture(scope="session")
def tiny_train_inputs(digits_data, trained_tiny):
    from edgesmith.data.pipeline import load_pixels

    spec = trained_tiny.spec
    pixels, labels = load_pixels(digits_data.train, spec.input_size, limit=200)
    return spec.normalize(pixels).astype(np.float32), labels


@pytest.fixture(scope="session")
def pretrained_tiny_weights(tmp_path_factory, trained_tiny) -> Path:
    """A headless tiny_cnn weights file (.h5) with the backbone of ``trained_tiny``: a pretrained base."""
    from edgesmith.zoo import build_base

    base, _ = build_base("tiny_cnn", 16, "none")
    trained = {layer.name: layer for layer in trained_tiny.model.layers}
    for layer in base.layers:
        if layer.weights:
            layer.set_weights(trained[layer.name].get_weights())
    path = tmp_path_factory.mktemp("weights") / "tiny_cnn_base.h5"
    base.save_weights(str(path))
    return path


def accuracy(model: keras.Model, inputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(model.predict(inputs, verbose=0, batch_size=256).argmax(-1) == labels))


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, trained_tiny, tiny_train_inputs, tiny_test_inputs):
    """``trained_tiny`` exported to every format in EXPORTERS, each validated: {format: ExportResult}."""
    from edgesmith.export import EXPORTERS, export
    from edgesmith.recipe import ExportConfig

    out = tmp_path_factory.mktemp("exports")
    cfg = ExportConfig()
    return {
        fmt: export(
            trained_tiny.model,
            fmt,
            cfg,
            spec=trained_tiny.spec,
            out_dir=out,
            name=fmt.replace("-", "_"),
            calibration=tiny_train_inputs[0][:100],
            validation_inputs=tiny_test_inputs[0][:200],
        )
        for fmt in EXPORTERS
    }


@pytest.fixture(scope="session")
def tiny_keras_file(tmp_path_factory, trained_tiny) -> Path:
    """``trained_tiny`` saved as a .keras file, with its preprocess.json beside it."""
    folder = tmp_path_factory.mktemp("keras")
    path = folder / "model.keras"
    trained_tiny.model.save(path)
    trained_tiny.spec.save(folder)
    return path


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """One `edgesmith run quickstart` (epochs and samples reduced by QUICK_OVERRIDES) into a run directory.

    Shared by the end-to-end test and the stage re-run test; tests that modify it must work on a copy.
    """
    from edgesmith.cli import main

    out = tmp_path_factory.mktemp("quickstart") / "run"
    argv = ["run", "quickstart", "--out", str(out)]
    for override in QUICK_OVERRIDES:
        argv += ["--set", override]
    assert main(argv) == 0
    return out


def run_with_trained(folder: Path, trained, recipe):
    """A run directory whose train stage holds ``trained`` (a TrainResult) under ``recipe``: later stages run on it."""
    from edgesmith.runs import RunDir
    from edgesmith.workflow import save_recipe

    run = RunDir.create(folder)
    save_recipe(run, recipe, None)
    stage = run.stage_dir("train")
    trained.model.save(stage / "model.keras")
    run.record_stage("train", config={}, inputs={},
                     outputs={"model": stage / "model.keras", "preprocess": trained.spec.save(stage)})
    return run
