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
)
OPTIMIZE_TECHNIQUES = ("prune", "qat")


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


@dataclass
class OptimizeConfig:
    """Pruning and quantization-aware training, each with a short fine-tune."""

    techniques: list[str] = _opt(["prune", "qat"], each_in=OPTIMIZE_TECHNIQUES)
    sparsity: float = _opt(0.5, min=0.0, max=0.99)
    prune_epochs: int = _opt(1, min=1)
    qat_epochs: int = _opt(1, min=1)
    finetune_samples: int = _opt(0, min=0)
    prune_learning_rate: float = _opt(1e-4, min=0.0)
    qat_learning_rate: float = _opt(1e-5, min=0.0)
    batch_size: int = _opt(64, min=1)


@dataclass
class ExportConfig:
    """Formats to export and how each is validated against its source model."""

    formats: list[str] = _opt(list(EXPORT_FORMATS), each_in=EXPORT_FORMATS)
    calibration_samples: int = _opt(300, min=1)
    validation_samples: int = _opt(200, min=1)
    onnx_opset: int = _opt(17, min=13, max=21)
    min_top1_agreement: float = _opt(0.98, min=0.0, max=1.0)
    min_top1_agreement_quantized: float = _opt(0.90, min=0.0, max=1.0)
    max_abs_diff_float: float = _opt(1e-3, min=0.0)


@dataclass
class BenchConfig:
    """What bench measures: accuracy on the held-out split, size, latency."""

    warmup: int = _opt(10, min=0)
    runs: int = _opt(50, min=1)
    min_seconds: float = _opt(1.0, min=0.0)  # timed runs continue until both runs and min_seconds are reached
    threads: int = _opt(0, min=0)
    eval_limit: int = _opt(0, min=0)
    include_keras: bool = True


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
