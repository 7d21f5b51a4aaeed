"""Recipes: typed dataclasses loaded from TOML.

Every key is checked: an unknown key, a wrong type or an out-of-range value raises
:class:`RecipeError` naming the key path, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgesmith.errors import RecipeError

EXPORT_FORMATS = (
    "tflite-float32",
    "tflite-float16",
    "tflite-dynamic",
    "tflite-int8",
    "onnx-float32",
    "tflite-int8-float-io",  # int8 inside, float32 input and output
    "tflite-uint8",  # int8 inside, uint8 input and output
    "tflite-int16x8",  # int16 activations, int8 weights, int16 input and output
    "onnx-int8",  # ONNX Runtime quantization: several variants measured, the best kept
)
DEFAULT_EXPORT_FORMATS = EXPORT_FORMATS[:5]
# ONNX Runtime int8 variants: <qdq|qoperator>-<tensor|channel>-<minmax|entropy|percentile>-<u8s8|s8s8|u8u8>[-rr]
ONNX_INT8_VARIANTS = ("dynamic-matmul", *(
    f"{fmt}-{granularity}-{calibration}-{types}{rr}" for fmt in ("qdq", "qoperator")
    for granularity in ("tensor", "channel") for calibration in ("minmax", "entropy", "percentile")
    for types in ("u8s8", "s8s8", "u8u8") for rr in ("", "-rr")))
ONNX_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
STRATEGIES = ("auto", "none", "mirrored", "multiworker", "tpu")
OPTIMIZE_TECHNIQUES = ("prune", "qat", "cluster", "prune_qat", "cluster_qat")
# Rungs of the accuracy-budgeted search (edgesmith.optimize.search.RUNGS says what each one ships).
SEARCH_LADDER = ("float32", "float16", "dynamic", "int8", "int8_more_calibration", "int8_float_io",
                 "prune_int8", "qat_int8", "cluster_int8", "prune_qat_int8", "cluster_qat_int8",
                 "onnx_float32", "onnx_int8")
DEFAULT_SEARCH_LADDER = SEARCH_LADDER[:10]  # ONNX int8 tries many variants (slow); CQAT is rarely needed
SEARCH_OBJECTIVES = ("size", "latency")


def _opt(default: Any, **limits: Any) -> Any:
    """A dataclass field with validation limits (min, max, choices, each_in) kept in its metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=limits)
    return field(default=default, metadata=limits)


@dataclass
class DataConfig:
    """Where the images come from and how much of them to use."""

    dataset: str = _opt("digits", choices=("cifar10", "digits", "folder"))
    path: str = ""
    val_fraction: float = _opt(0.1, min=0.0, max=0.5)
    limit_per_class: int = _opt(0, min=0)
    test_limit_per_class: int = _opt(0, min=0)
    mirror: bool = True  # a left-right mirrored image is a valid example (photos: yes; digits, text: no)
    strict: bool = False  # unreadable image files fail the run instead of being skipped (--strict)


@dataclass
class ModelConfig:
    """The backbone and the classification head put on it."""

    backbone: str = "small_cnn"
    weights: str = "none"
    input_size: int = _opt(0, min=0, max=1024)
    pooling: str = _opt("avg", choices=("avg", "max", "flatten"))
    dense_units: int = _opt(256, min=0)
    dropout: float = _opt(0.3, min=0.0, max=0.95)


@dataclass
class TrainConfig:
    """Two-phase transfer learning: frozen base + head, then the top layers unfrozen."""

    batch_size: int = _opt(64, min=1)
    head_epochs: int = _opt(3, min=0)
    head_learning_rate: float = _opt(1e-3, min=0.0)
    finetune_epochs: int = _opt(2, min=0)
    finetune_learning_rate: float = _opt(1e-4, min=0.0)
    finetune_schedule: str = _opt("cosine", choices=("constant", "cosine"))
    unfreeze_layers: int = _opt(0, min=0)
    patience: int = _opt(2, min=1)
    cache_features: bool = True
    cache_mirrored: bool = True  # also cache a mirrored copy of every image (if data.mirror)
    strategy: str = _opt("auto", choices=STRATEGIES)  # tf.distribute; batch_size is per replica
    mixed_precision: bool = False  # mixed_float16 on a GPU (output layer float32); float32 + warning on CPU


@dataclass
class SearchConfig:
    """The accuracy-budgeted search (``[optimize.search]``; ``edgesmith optimize RUN_DIR --max-accuracy-drop 1``).

    Every ladder rung is exported, and its shipped file measured on held-out images (the val split);
    the pick is the best ``objective`` (gzip bytes, or batch-1 p50 latency) among the rungs whose top-1
    is at most ``max_accuracy_drop`` points below the float model's. Fine-tunes use ``[optimize]``'s
    epochs, samples and learning rates; ``prune_*`` rungs run once per value of ``sparsities``.
    """

    enabled: bool = False
    max_accuracy_drop: float = _opt(1.0, min=0.0, max=100.0)  # top-1 points below the float model
    objective: str = _opt("size", choices=SEARCH_OBJECTIVES)
    ladder: list[str] = _opt(list(DEFAULT_SEARCH_LADDER), each_in=SEARCH_LADDER)
    sparsities: list[float] = _opt([0.5, 0.8], min=0.0, max=0.99, one_or_list=True)
    eval_samples: int = _opt(1000, min=1)  # held-out images each candidate is measured on
    calibration_samples: int = _opt(300, min=1)
    more_calibration_samples: int = _opt(1000, min=1)  # the int8_more_calibration rung
    latency_threads: int = _opt(1, min=0)  # 0 = all cores
    latency_warmup: int = _opt(5, min=0)
    latency_runs: int = _opt(30, min=1)
    latency_min_seconds: float = _opt(0.5, min=0.0)
    keep_candidates: bool = False  # keep every candidate's file in optimize/search/ (else only the pick's)


@dataclass
class OptimizeConfig:
    """Pruning, clustering and quantization-aware training (and their chains), each with a fine-tune.

    ``prune_qat`` / ``cluster_qat`` run prune / cluster first, then QAT that preserves the sparsity /
    the clusters. Pruning and clustering fine-tune above the train stage's freeze boundary on cached
    activations (``cache_frozen``), so ``finetune_samples = 0`` (the whole training split) stays cheap.
    """

    techniques: list[str] = _opt(["prune", "qat"], each_in=OPTIMIZE_TECHNIQUES)
    sparsity: float = _opt(0.5, min=0.0, max=0.99)
    prune_schedule: str = _opt("polynomial", choices=("polynomial", "constant"))
    prune_structure: str = _opt("unstructured", choices=("unstructured", "2:4"))
    prune_end_fraction: float = _opt(0.67, min=0.05, max=1.0)  # the target is reached at this share of the steps
    prune_frequency: int = _opt(0, min=0)  # steps between mask updates; 0: about 25 updates before the end
    prune_frozen: bool = False  # also prune the frozen layers below the freeze boundary (one shot, by magnitude)
    recalibration_samples: int = _opt(2000, min=1)  # training images re-estimating their BatchNormalization statistics
    prune_epochs: int = _opt(1, min=1)
    qat_epochs: int = _opt(1, min=1)
    clusters: int = _opt(16, min=2, max=256)
    cluster_epochs: int = _opt(1, min=1)
    finetune_samples: int = _opt(0, min=0)  # training images to fine-tune on (0: all)
    qat_samples: int = _opt(0, min=0)  # for whole-model (QAT) fine-tunes; 0: as finetune_samples
    cache_frozen: bool = True
    check_samples: int = _opt(500, min=0)  # held-out images for the int8 TFLite check of each result; 0: none
    prune_learning_rate: float = _opt(1e-4, min=0.0)
    qat_learning_rate: float = _opt(1e-5, min=0.0)
    cluster_learning_rate: float = _opt(1e-5, min=0.0)
    batch_size: int = _opt(64, min=1)
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class ExportConfig:
    """Formats to export and how each is validated against its source model."""

    formats: list[str] = _opt(list(DEFAULT_EXPORT_FORMATS), each_in=EXPORT_FORMATS)
    calibration_samples: int = _opt(300, min=1)
    validation_samples: int = _opt(200, min=1)
    onnx_opset: int = _opt(17, min=13, max=21)
    min_top1_agreement: float = _opt(0.98, min=0.0, max=1.0)
    min_top1_agreement_quantized: float = _opt(0.90, min=0.0, max=1.0)
    max_abs_diff_float: float = _opt(1e-3, min=0.0)
    # int8 TFLite: run the quantization debugger when more than this share (in points) of predictions changed
    debug_gap_points: float = _opt(1.0, min=0.0)
    onnx_int8_variants: list[str] = _opt([], each_in=ONNX_INT8_VARIANTS)  # empty: the defaults for this CPU
    onnx_int8_slack: float = _opt(0.01, min=0.0, max=1.0)  # agreement this close to the best: the fastest wins


@dataclass
class BenchConfig:
    """What bench measures: accuracy on the held-out split, size, latency."""

    warmup: int = _opt(10, min=0)
    runs: int = _opt(50, min=1)
    min_seconds: float = _opt(1.0, min=0.0)  # timed runs continue until both runs and min_seconds are reached
    threads: list[int] = _opt([1, 0], min=0, one_or_list=True)  # 0 = all cores; the first is the headline
    batch_sizes: list[int] = _opt([1], min=1, max=4096, one_or_list=True)  # images per call; first = headline
    device: str = _opt("cpu", choices=("cpu", "gpu"))  # gpu: ONNX on CUDA, Keras on TensorFlow's GPU
    onnx_providers: list[str] = _opt([], each_in=ONNX_PROVIDERS)  # overrides the device's default providers
    memory: bool = True  # peak RSS of each artifact, measured in a fresh process
    eval_limit: int = _opt(0, min=0)
    include_keras: bool = True


ENSEMBLE_COMBINERS = ("average", "weighted", "stacked")
ENSEMBLE_ESTIMATORS = ("random_forest", "bagged_trees", "adaboost", "hist_gradient_boosting", "stacking_svc_lr")
# Keys older tutorials use that current libraries renamed: the message replaces "unknown key".
RENAMED_KEYS = {
    "ensemble.base_estimator": "was renamed 'estimator' in scikit-learn 1.2 and removed in 1.4; write "
                               "ensemble.estimator = \"stump\" (or \"shallow_tree\") instead",
}


@dataclass
class EnsembleConfig:
    """Ensembles over this run's network and other runs' (``edgesmith ensemble RUN_DIR``)."""

    members: list[str] = _opt([])  # other run directories whose train/model.keras join this run's model
    combiners: list[str] = _opt(list(ENSEMBLE_COMBINERS), each_in=ENSEMBLE_COMBINERS)
    estimators: list[str] = _opt(list(ENSEMBLE_ESTIMATORS), each_in=ENSEMBLE_ESTIMATORS)
    tree_meta: bool = True  # a random forest meta-model over the members' probabilities (exported as joined ONNX)
    estimator: str = _opt("stump", choices=("stump", "shallow_tree"))  # AdaBoost's weak learner
    n_estimators: int = _opt(100, min=1)
    max_depth: int = _opt(0, min=0)  # forests and bagged trees; 0 = grow fully
    fit_split: str = _opt("val", choices=("val", "train"))  # rows meta-models and estimators are fitted on
    allow_leakage: bool = False  # fit_split = "train": warn instead of refusing
    svc_max_rows: int = _opt(10_000, min=0)  # an RBF SVC above this many rows counts as slow (0: never)
    slow_policy: str = _opt("subsample", choices=("subsample", "linear", "warn"))
    export_formats: list[str] = _opt(["tflite-float32", "onnx-float32"], each_in=("tflite-float32", "onnx-float32"))
    shared_trunk: bool = True  # members with identical frozen lower layers share them in the folded graph
    latency_runs: int = _opt(50, min=1)


@dataclass
class Recipe:
    """A whole job: data -> train -> optimize -> export -> bench."""

    name: str = "run"
    seed: int = _opt(42, min=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(source: str | Path) -> Recipe:
    """Load a recipe from a TOML file, or a recipe bundled with edgesmith by name (``quickstart``).

    Raises:
        RecipeError: the file is missing, is not valid TOML, or holds a bad key or value.
    """
    text, origin = _read_recipe_text(source)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{origin}: not valid TOML ({exc}); fix the syntax and retry") from None
    return recipe_from_dict(raw, origin=origin)


def recipe_from_dict(raw: dict[str, Any], *, origin: str = "recipe") -> Recipe:
    """Build a validated :class:`Recipe` from plain data (as parsed from TOML)."""
    return _build(Recipe, raw, origin, prefix="")


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    folder = resources.files("edgesmith") / "recipes"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_recipe_text(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not a text file (not UTF-8); a recipe is a TOML text file") from None
    bundled = resources.files("edgesmith") / "recipes" / f"{path.stem}.toml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled.read_text(encoding="utf-8"), f"<bundled {path.stem}.toml>"
    raise RecipeError(
        f"recipe {str(source)!r} not found: give a TOML file path or one of the bundled recipes "
        f"({', '.join(bundled_recipes())})"
    )


def _build(cls: type, raw: Any, origin: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: [{prefix.rstrip('.')}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        if key in RENAMED_KEYS:
            raise RecipeError(f"{origin}: {key} {RENAMED_KEYS[key]}")
        raise RecipeError(f"{origin}: unknown key {key!r}; allowed here: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, origin, prefix=f"{key}.")
        else:
            values[name] = _check_value(key, value, hint, fields[name].metadata, origin)
    return cls(**values)


def _check_value(key: str, value: Any, hint: Any, limits: Any, origin: str) -> Any:
    if limits.get("one_or_list") and not isinstance(value, list):
        value = [value]  # `threads = 2` means [2] (and older run directories recorded a single number)
    value = _coerce(key, value, hint, origin)
    items = value if isinstance(value, list) else [value]
    for item in items:
        _check_limits(key, item, limits, origin)
    return value


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    origin_type = typing.get_origin(hint)
    if origin_type is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise RecipeError(f"{origin}: {key} must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type, origin) for i, v in enumerate(value)]
    if isinstance(hint, types.UnionType):
        hint = typing.get_args(hint)[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = _to_float(key, value, origin)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(
            f"{origin}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    if hint is float and not math.isfinite(value):
        raise RecipeError(f"{origin}: {key} must be a finite number, got {value!r}")
    return value


def _to_float(key: str, value: int, origin: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise RecipeError(
            f"{origin}: {key} must be a finite number, got an integer of {value.bit_length()} bits"
        ) from None


def _check_limits(key: str, value: Any, limits: Any, origin: str) -> None:
    allowed = limits.get("choices") or limits.get("each_in")
    if allowed and value not in allowed:
        raise RecipeError(f"{origin}: {key} = {value!r} is not allowed; choose from {', '.join(allowed)}")
    low, high = limits.get("min"), limits.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        name = key.split(".")[-1]
        if low is not None and high is not None:
            allowed = f"{low} <= {name} <= {high}"
        else:
            allowed = f"{name} >= {low}" if low is not None else f"{name} <= {high}"
        raise RecipeError(f"{origin}: {key} = {value!r} is out of range; allowed: {allowed}")


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` overrides (values parsed as TOML) and re-validate."""
    raw = recipe.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = value
    return recipe_from_dict(raw, origin="overrides")
