"""Recipes: every shipped recipe validates; bad keys and values are rejected with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesmith.errors import RecipeError
from edgesmith.recipe import (
    DEFAULT_EXPORT_FORMATS,
    EXPORT_FORMATS,
    ExportConfig,
    Recipe,
    apply_overrides,
    bundled_recipes,
    load_recipe,
    recipe_from_dict,
)

REPO_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_quickstart_is_bundled():
    assert "quickstart" in bundled_recipes()


@pytest.mark.parametrize("name", bundled_recipes())
def test_bundled_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    # Round trip: what a recipe holds is itself a valid recipe.
    assert recipe_from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("path", REPO_RECIPES, ids=[p.name for p in REPO_RECIPES])
def test_repo_recipe_file_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_quickstart_values_come_from_the_file():
    recipe = load_recipe("quickstart")
    assert recipe.name == "quickstart"
    assert recipe.data.dataset == "digits"
    assert recipe.data.mirror is False
    assert recipe.model.backbone == "small_cnn"
    assert recipe.model.input_size == 32
    assert recipe.train.head_learning_rate == pytest.approx(3e-3)
    assert recipe.optimize.techniques == ["prune", "qat"]
    assert recipe.export.formats == list(DEFAULT_EXPORT_FORMATS)  # default: the five basic formats
    assert set(DEFAULT_EXPORT_FORMATS) < set(EXPORT_FORMATS)


def test_quick_recipe_is_quickstart_with_less_work(quick_recipe, quick_overrides):
    bundled = load_recipe("quickstart")
    assert quick_recipe.train.head_epochs < bundled.train.head_epochs
    assert quick_recipe.bench.runs < bundled.bench.runs
    assert quick_recipe.model == bundled.model and quick_recipe.data == bundled.data
    assert apply_overrides(bundled, quick_overrides) == quick_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("epochz = 3\n", r"unknown key 'epochz'"),
        ("[train]\nepochz = 3\n", r"unknown key 'train\.epochz'; allowed here: batch_size, head_epochs"),
        ("[model]\nbackbone = 'x'\nwieghts = 'none'\n", r"unknown key 'model\.wieghts'"),
        ("[colour]\nx = 1\n", r"unknown key 'colour'"),
    ],
)
def test_unknown_key_names_its_path(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=pattern) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('[train]\nbatch_size = "big"\n', r"train\.batch_size must be int, got str 'big'"),
        ("[train]\nbatch_size = 6.5\n", r"train\.batch_size must be int, got float 6\.5"),
        ("[train]\ncache_features = 1\n", r"train\.cache_features must be bool, got int 1"),
        ("[train]\nhead_epochs = true\n", r"train\.head_epochs must be int, got bool True"),
        ("[model]\nbackbone = 3\n", r"model\.backbone must be str, got int 3"),
        ('[optimize]\ntechniques = "prune"\n', r"optimize\.techniques must be a list of str, got 'prune'"),
        ("[optimize]\ntechniques = [1]\n", r"optimize\.techniques\[0\] must be str, got int 1"),
        ("train = 3\n", r"\[train\] must be a table, got 3"),
    ],
)
def test_wrong_type_is_rejected(tmp_path, text, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "[optimize]\nsparsity = 1.2\n",
            r"optimize\.sparsity = 1\.2 is out of range; allowed: 0\.0 <= sparsity <= 0\.99",
        ),
        ("[train]\nhead_epochs = -1\n", r"train\.head_epochs = -1 is out of range"),
        ("[data]\nval_fraction = 0.6\n", r"data\.val_fraction = 0\.6 is out of range"),
        (
            "[export]\nonnx_opset = 12\n",
            r"export\.onnx_opset = 12 is out of range; allowed: 13 <= onnx_opset <= 21",
        ),
        ("seed = -5\n", r"seed = -5 is out of range"),
    ],
)
def test_out_of_range_is_rejected(tmp_path, text, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(write(tmp_path, text))


def test_out_of_range_message_shows_only_real_bounds(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "[train]\nhead_epochs = -1\n"))
    assert "None" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '[export]\nformats = ["tflite-int4"]\n',
            r"export\.formats = 'tflite-int4' is not allowed; choose from tflite-float32, tflite-float16",
        ),
        ('[export]\nformats = ["tflite-int8", "onnx-float16"]\n', r"'onnx-float16' is not allowed"),
        (
            '[optimize]\ntechniques = ["prune", "distill"]\n',
            r"optimize\.techniques = 'distill' is not allowed; choose from prune, qat",
        ),
        (
            '[model]\npooling = "median"\n',
            r"model\.pooling = 'median' is not allowed; choose from avg, max, flatten",
        ),
        ('[data]\ndataset = "mnist"\n', r"data\.dataset = 'mnist' is not allowed"),
    ],
)
def test_bad_choice_is_rejected(tmp_path, text, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(write(tmp_path, text))


def test_integer_is_accepted_for_a_float_field(tmp_path):
    recipe = load_recipe(write(tmp_path, "[optimize]\nsparsity = 0\n"))
    assert recipe.optimize.sparsity == 0.0
    assert isinstance(recipe.optimize.sparsity, float)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[train\nbatch_size = 3\n")
    with pytest.raises(RecipeError, match=r"not valid TOML .*fix the syntax"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(
        RecipeError,
        match=r"recipe '.*nope\.toml' not found: give a TOML file path or one of the bundled recipes "
        r"\(.*quickstart",
    ):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match=r"recipe 'no-such-recipe' not found"):
        load_recipe("no-such-recipe")


def test_defaults_when_keys_are_left_out(tmp_path):
    recipe = load_recipe(write(tmp_path, 'name = "bare"\n'))
    assert recipe == Recipe(name="bare")
    assert recipe.export == ExportConfig()


def test_apply_overrides_changes_values_and_keeps_the_original():
    recipe = load_recipe("quickstart")
    changed = apply_overrides(
        recipe,
        [
            "train.head_epochs=1",
            "optimize.sparsity=0.75",
            'model.backbone="tiny_cnn"',
            "model.weights=none",  # not TOML: taken as the string
            'export.formats=["tflite-int8"]',
            "seed=3",
        ],
    )
    assert changed.train.head_epochs == 1
    assert changed.optimize.sparsity == 0.75
    assert changed.model.backbone == "tiny_cnn"
    assert changed.model.weights == "none"
    assert changed.export.formats == ["tflite-int8"]
    assert changed.seed == 3
    assert recipe.train.head_epochs == 12 and recipe.model.backbone == "small_cnn"


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.epochz=3", r"unknown key 'train\.epochz'"),
        ("train.batch_size=0", r"train\.batch_size = 0 is out of range"),
        ('train.batch_size="big"', r"train\.batch_size must be int"),
        ("optimize.sparsity=1.2", r"optimize\.sparsity = 1\.2 is out of range"),
        ("export.formats=['tflite-int4']", r"'tflite-int4' is not allowed"),
        ("train.head_epochs", r"override 'train\.head_epochs' must look like section\.key=value"),
    ],
)
def test_apply_overrides_revalidates(override, pattern):
    with pytest.raises(RecipeError, match=pattern):
        apply_overrides(load_recipe("quickstart"), [override])


@pytest.mark.parametrize("override", ["seed.x=1", "name.first=a"])
def test_override_below_a_scalar_is_a_recipe_error(override):
    with pytest.raises(RecipeError, match=r"seed|name"):
        apply_overrides(load_recipe("quickstart"), [override])
