"""Fuzz-style checks, seeded: random bytes as images and random TOML as recipes give clear errors only.

Image folders: every generated file is either skipped (named in ``ImageDataset.skipped``) or decodes
in the tf.data pipeline, so nothing unreadable reaches training; ``strict`` turns skips into one
DataError. Recipes: random text and random nested data either validate or raise RecipeError, never
another exception type.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgesmith.data.datasets import image_folder
from edgesmith.data.pipeline import load_pixels
from edgesmith.errors import DataError, RecipeError
from edgesmith.recipe import (
    BenchConfig,
    DataConfig,
    ExportConfig,
    ModelConfig,
    OptimizeConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
)

CONFIGS = (DataConfig, ModelConfig, TrainConfig, OptimizeConfig, ExportConfig, BenchConfig)

# ---------------------------------------------------------------- random bytes as images

MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]
SUFFIXES = [".jpg", ".jpeg", ".png", ".gif", ".bmp", ".JPG"]


def valid_image(rng: np.random.Generator, image_format: str) -> bytes:
    pixels = rng.integers(0, 256, (int(rng.integers(4, 40)), int(rng.integers(4, 40)), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def random_file(rng: np.random.Generator) -> bytes:
    """Random bytes, random bytes behind an image signature, or a valid image damaged at random."""
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 2000)))
    if kind == 1:
        return MAGIC[int(rng.integers(len(MAGIC)))] + rng.bytes(int(rng.integers(0, 2000)))
    data = bytearray(valid_image(rng, ["JPEG", "PNG", "GIF", "BMP"][int(rng.integers(4))]))
    if kind == 2:  # flip a few bytes
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return bytes(data)
    if kind == 3:  # truncate
        return bytes(data[: int(rng.integers(1, len(data)))])
    if kind == 4:  # junk appended
        return bytes(data) + rng.bytes(int(rng.integers(1, 200)))
    return bytes(data)  # intact: must be kept


def fuzz_folder(root: Path, seed: int, count: int) -> list[str]:
    """Two classes with 3 valid images each in train/ and test/, plus ``count`` random files in train/."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"valid{i}.png").write_bytes(valid_image(rng, "PNG"))
    names = []
    for i in range(count):
        name = f"fuzz{i:03d}{SUFFIXES[int(rng.integers(len(SUFFIXES)))]}"
        (root / "train" / ("a", "b")[i % 2] / name).write_bytes(random_file(rng))
        names.append(name)
    return names


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_as_images_are_skipped_or_decoded(tmp_path, seed):
    names = fuzz_folder(tmp_path / "d", seed, count=100)
    try:
        dataset = image_folder(tmp_path / "d")
    except DataError:
        return  # a clear error is an allowed outcome (e.g. a class left without readable images)
    kept = {Path(f).name for f in dataset.train.files}
    skipped = {Path(c.path).name for c in dataset.skipped}
    assert kept | skipped == set(names) | {f"valid{i}.png" for i in range(3)}
    assert not kept & skipped
    assert skipped, "some random files must be unreadable"
    pixels, _ = load_pixels(dataset.train, (8, 8))  # every kept file decodes: no error in training
    assert pixels.shape == (len(dataset.train), 8, 8, 3) and np.isfinite(pixels).all()
    with pytest.raises(DataError, match=rf"{len(skipped)} unreadable image file\(s\): "):
        image_folder(tmp_path / "d", strict=True)


# ---------------------------------------------------------------- random TOML as recipes

SECTIONS = ["data", "model", "train", "optimize", "export", "bench", "colour", "model.head", "train.extra"]
KEYS = [f.name for config in (Recipe, *CONFIGS) for f in dataclasses.fields(config)] + ["epochz", "", "x y"]
VALUES = [
    "1", "-1", "0", "64", "1.2", "-0.5", "0.99", "nan", "inf", "-inf", "1e400", "0x10", "1_000", "true", "false",
    '"digits"', '"folder"', '"cifar10"', '"tiny_cnn"', "'none'", '"imagenet"', '""', '"\\u00e9t\\u00e9"',
    "[]", '["prune"]', '["prune", "qat", "qat"]', '["tflite-int8", "onnx-float16"]', '[1, "a"]', "[[1], [2]]",
    "{a = 1}", "{}", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", '"""multi\nline"""',
]
BROKEN = ["[train", "a = ", "= 3", '"unterminated', "x = 1 = 2", "[[", "key = [1,", "\x00", "[data]\n[data]"]


QUICKSTART = load_recipe("quickstart").to_dict()


def random_line(rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.2:
        return f"[{SECTIONS[int(rng.integers(len(SECTIONS)))]}]"
    if roll < 0.9:
        key = KEYS[int(rng.integers(len(KEYS)))]
        key = key if key.isidentifier() else f'"{key}"'
        return f"{key} = {VALUES[int(rng.integers(len(VALUES)))]}"
    return BROKEN[int(rng.integers(len(BROKEN)))]


def valid_lines(rng: np.random.Generator) -> list[str]:
    """A few tables of the quickstart recipe written out as TOML, each keeping a random subset of keys."""
    lines = []
    for section, values in QUICKSTART.items():
        if isinstance(values, dict) and rng.random() < 0.6:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if rng.random() < 0.5]
    return lines


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def random_toml(rng: np.random.Generator) -> str:
    """Either random lines (sections, assignments of every TOML type, breakage) or a valid recipe with
    zero to two random lines put in at random places."""
    if rng.random() < 0.5:
        lines = [random_line(rng) for _ in range(int(rng.integers(1, 9)))]
    else:
        lines = valid_lines(rng)
        for _ in range(int(rng.integers(0, 3))):
            lines.insert(int(rng.integers(len(lines) + 1)), random_line(rng))
    return "\n".join(lines) + "\n"


def test_random_toml_gives_a_recipe_or_a_recipe_error(tmp_path):
    rng = np.random.default_rng(7)
    outcomes = {"recipe": 0, "error": 0}
    path = tmp_path / "fuzz.toml"
    for case in range(300):
        text = random_toml(rng)
        path.write_text(text, encoding="utf-8")
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:
            assert str(path) in str(exc), (case, text, exc)  # the message names the file
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001  (the point: no other type may escape)
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n--- recipe ---\n{text}")
        else:
            assert isinstance(recipe, Recipe)
            outcomes["recipe"] += 1
    assert outcomes["recipe"] >= 10 and outcomes["error"] >= 100, outcomes  # both paths were exercised


# ---------------------------------------------------------------- random nested data as recipes


SCALARS = [0, 1, -3, 299, 0.5, -1.5, 1.2, math.nan, math.inf, True, False, "digits", "tiny_cnn", "prune", "x", "",
           None, b"bytes", datetime.date(2020, 1, 2), (1, 2)]


def random_value(rng: np.random.Generator, depth: int) -> Any:
    """A scalar of any type (non-TOML ones too), or, above depth 3, a list or a table of them."""
    roll = rng.random()
    if depth < 3 and roll < 0.1:
        return [random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    if depth < 3 and roll < 0.2:
        return random_dict(rng, depth + 1)
    return SCALARS[int(rng.integers(len(SCALARS)))]


def random_dict(rng: np.random.Generator, depth: int = 0) -> dict[str, Any]:
    return {KEYS[int(rng.integers(len(KEYS)))]: random_value(rng, depth) for _ in range(int(rng.integers(0, 6)))}


def test_random_nested_dicts_give_a_recipe_or_a_recipe_error():
    rng = np.random.default_rng(11)
    outcomes = {"recipe": 0, "error": 0}
    for case in range(400):
        raw = random_dict(rng)
        if rng.random() < 0.5:  # also start from a valid recipe and break one table
            base = Recipe().to_dict()
            section = ["data", "model", "train", "optimize", "export", "bench"][int(rng.integers(6))]
            base[section].update(random_dict(rng, depth=2))
            raw = base
        try:
            recipe_from_dict(raw, origin="fuzz")
        except RecipeError as exc:
            assert str(exc).startswith("fuzz: "), exc
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n--- data ---\n{raw!r}")
        else:
            outcomes["recipe"] += 1
    assert outcomes["recipe"] >= 10 and outcomes["error"] >= 100, outcomes


def test_random_overrides_give_a_recipe_or_a_recipe_error():
    rng = np.random.default_rng(13)
    paths = [*KEYS, *(f"{s}.{k}" for s in SECTIONS for k in KEYS[::3])]
    overrides = [f"{paths[int(rng.integers(len(paths)))]}={VALUES[int(rng.integers(len(VALUES)))]}"
                 for _ in range(300)]
    for override in [*overrides, "seed.x=1", "train.batch_size.y=2"]:  # dotted keys below a value
        try:
            apply_overrides(Recipe(), [override])
        except RecipeError:
            pass
