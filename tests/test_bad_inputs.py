"""Bad inputs: each case gets a clear typed error (exit 2 and one line from the CLI) or is handled.

Image folders: unreadable files are skipped and named (or fail with strict), odd but valid images
(grayscale, alpha, palette, CMYK, 16-bit, BMP variants, huge, odd names) decode to the right RGB.
Configuration, model files and run directories: the error names the key or file and what to do.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgesmith._keras import keras
from edgesmith.cli import EXIT_BAD_INPUT, main
from edgesmith.data.datasets import image_folder, load_dataset
from edgesmith.data.pipeline import load_pixels
from edgesmith.errors import DataError, ModelError, RecipeError, RunDirError
from edgesmith.recipe import DataConfig, load_recipe
from edgesmith.runs import RunDir, atomic_path, write_json
from edgesmith.runtime import load_keras_model

COLOR = (200, 100, 30)
GRAY = 123  # ITU-R 601 luma of COLOR, as Pillow computes it


def colors_folder(root: Path, make_image_folder, **kwargs) -> Path:
    """A valid two-class folder (4 train, 2 test images per class) to break in each test."""
    classes = {"red": (200, 30, 30), "blue": (20, 40, 200)}
    return make_image_folder(root, classes=classes, per_class=4, test_per_class=2, **kwargs)


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one `edgesmith: error:` line, no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("edgesmith: error: ")]
    assert code == EXIT_BAD_INPUT, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------- unreadable image files


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), COLOR).save(buffer, "PNG")
    return buffer.getvalue()


BROKEN_FILES = {
    "random.jpg": lambda: np.random.default_rng(1).bytes(700),  # random bytes
    "truncated.jpg": lambda: jpeg_bytes()[: len(jpeg_bytes()) * 6 // 10],  # cut off mid-scan
    "notes.png": lambda: b"shopping list: apples, pears\n",  # text with an image suffix
    "empty.jpeg": lambda: b"",  # zero bytes
    "damaged_tail.png": lambda: png_bytes()[:-6],  # Pillow decodes it, libpng (TensorFlow) refuses it
}


def add_broken_files(folder: Path) -> list[Path]:
    paths = []
    for name, make in BROKEN_FILES.items():
        (folder / name).write_bytes(make())
        paths.append(folder / name)
    return paths


def test_unreadable_files_are_skipped_named_and_recorded(tmp_path, make_image_folder, caplog):
    root = colors_folder(tmp_path / "d", make_image_folder)
    broken = add_broken_files(root / "train" / "red")
    with caplog.at_level(logging.WARNING, logger="edgesmith.data.datasets"):
        dataset = image_folder(root)
    assert dataset.train.class_counts(2) == [4, 4] and dataset.test.class_counts(2) == [2, 2]
    assert sorted(Path(c.path).name for c in dataset.skipped) == sorted(BROKEN_FILES)
    warning = caplog.records[-1].getMessage()
    assert "skipped 5 unreadable image file(s)" in warning
    for path in broken:
        assert str(path.relative_to(root)) in warning
    recorded = dataset.describe()["skipped"]
    assert {Path(r["path"]).name for r in recorded} == set(BROKEN_FILES)
    reasons = {Path(r["path"]).name: r["reason"] for r in recorded}
    assert reasons["empty.jpeg"] == "empty file"
    assert reasons["notes.png"] == "not an image Pillow can read"
    assert "truncated" in reasons["truncated.jpg"]
    # The pipeline reads every kept file: no decode error surfaces later, in training.
    pixels, labels = load_pixels(dataset.train, (8, 8))
    assert pixels.shape == (8, 8, 8, 3) and labels.tolist() == [0] * 4 + [1] * 4


def test_strict_lists_every_unreadable_file(tmp_path, make_image_folder):
    root = colors_folder(tmp_path / "d", make_image_folder)
    add_broken_files(root / "test" / "blue")
    with pytest.raises(
        DataError,
        match=r"5 unreadable image file\(s\): .*test/blue/random\.jpg \(not an image Pillow can read\).*"
        r"; fix or remove them, or run without --strict to skip them",
    ):
        image_folder(root, strict=True)
    config = DataConfig(dataset="folder", path=str(root))
    with pytest.raises(DataError, match=r"damaged_tail\.png"):
        load_dataset(config, seed=0, strict=True)
    assert len(load_dataset(config, seed=0).skipped) == 5  # not strict: skipped


def test_a_class_with_only_unreadable_files(tmp_path, make_image_folder):
    root = colors_folder(tmp_path / "d", make_image_folder)
    for path in (root / "train" / "blue").iterdir():
        path.write_bytes(b"GIF89a broken")
    with pytest.raises(
        DataError, match=rf"{root / 'train' / 'blue'}: none of its 4 images is readable \(000\.png \(.*\); "
        "replace them or remove the folder"
    ):
        image_folder(root)


def test_cli_strict_fails_on_unreadable_files(tmp_path, make_image_folder, capsys):
    root = colors_folder(tmp_path / "d", make_image_folder)
    add_broken_files(root / "train" / "red")
    line = cli_error(capsys, "run", "quickstart", "--set", "data.dataset=folder", "--data", root, "--strict",
                     "--out", tmp_path / "run")
    assert "5 unreadable image file(s): train/red/" in line and "run without --strict" in line
    assert not (tmp_path / "run").exists()


def test_hidden_files_are_ignored(tmp_path, make_image_folder):
    root = colors_folder(tmp_path / "d", make_image_folder)
    (root / "train" / "red" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    dataset = image_folder(root)
    assert dataset.skipped == () and dataset.train.class_counts(2) == [4, 4]


def test_cli_run_fails_before_creating_the_run_directory(tmp_path, make_image_folder, capsys):
    root = colors_folder(tmp_path / "d", make_image_folder)
    for path in (root / "test" / "red").iterdir():
        path.write_text("not an image")
    line = cli_error(capsys, "run", "quickstart", "--set", "data.dataset=folder", "--data", root,
                     "--out", tmp_path / "run")
    assert "test/red: none of its 2 images is readable" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- folder layout


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    pattern = rf"{tmp_path / 'empty'}: no train/ folder; expected .*train/<class>/"
    with pytest.raises(DataError, match=pattern):
        image_folder(tmp_path / "empty")


def test_held_out_split_with_an_extra_class(tmp_path, make_image_folder):
    root = colors_folder(tmp_path / "d", make_image_folder)
    (root / "test" / "green").mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "test" / "green" / "0.png")
    with pytest.raises(
        DataError, match=r"class folders \['blue', 'green', 'red'\] differ from train/'s \['blue', 'red'\]"
    ):
        image_folder(root)


def test_data_path_given_for_the_bundled_digits(tmp_path, capsys):
    with pytest.raises(DataError, match=r"--data .*elsewhere was given, but data\.dataset = 'digits'"):
        load_dataset(DataConfig(dataset="digits"), seed=0, data_path=tmp_path / "elsewhere")
    line = cli_error(capsys, "run", "quickstart", "--data", tmp_path, "--out", tmp_path / "run")
    assert "set data.dataset = 'folder' (--set data.dataset=folder)" in line


# ---------------------------------------------------------------- odd but valid images


def png16(path: Path, pixels: np.ndarray) -> None:
    """Write a 16-bit-per-channel PNG (Pillow cannot write 48-bit RGB)."""
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def solid(mode: str = "RGB", size=(20, 16)) -> Image.Image:
    return Image.new("RGB", size, COLOR).convert(mode) if mode != "RGB" else Image.new("RGB", size, COLOR)


def write_odd_images(folder: Path) -> dict[str, tuple[tuple[int, int, int], bool]]:
    """Odd images of COLOR: {file name: (expected RGB, decoded through Pillow)}."""
    folder.mkdir(parents=True, exist_ok=True)
    adaptive = Image.new("RGB", (20, 16), COLOR).convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = Image.new("RGBA", (20, 16), (*COLOR, 90))
    solid("L").save(folder / "gray.jpg")
    solid("L").save(folder / "gray.png")
    solid("LA").save(folder / "gray_alpha.png")
    rgba.save(folder / "rgba.png")
    adaptive.save(folder / "palette.png")
    adaptive.save(folder / "palette.gif")
    solid("CMYK").save(folder / "cmyk.jpg")
    png16(folder / "gray16.png", np.full((16, 20, 1), COLOR[0] * 257, np.uint16))
    png16(folder / "rgb16.png", np.tile(np.asarray(COLOR, np.uint16) * 257, (16, 20, 1)))
    png16(folder / "rgba16.png", np.tile(np.asarray((*COLOR, 255), np.uint16) * 257, (16, 20, 1)))
    adaptive.save(folder / "palette.bmp")
    Image.new("1", (20, 16), 1).save(folder / "one_bit.bmp")
    solid("L").save(folder / "gray.bmp")
    rgba.save(folder / "rgba.bmp")
    solid().save(folder / "tiff_named.jpg", format="TIFF")
    solid().save(folder / "webp_named.png", format="WEBP", lossless=True)
    Image.fromarray(np.full((16, 20), COLOR[0] * 257, np.uint16)).save(folder / "gray16_tiff.png", format="TIFF")
    gray, white = (GRAY,) * 3, (255, 255, 255)
    return {
        "gray.jpg": (gray, False), "gray.png": (gray, False), "gray_alpha.png": (gray, False),
        "rgba.png": (COLOR, False), "palette.png": (COLOR, False), "palette.gif": (COLOR, True),
        "cmyk.jpg": (COLOR, False), "gray16.png": ((COLOR[0],) * 3, False), "rgb16.png": (COLOR, False),
        "rgba16.png": (COLOR, False), "palette.bmp": (COLOR, True), "one_bit.bmp": (white, True),
        "gray.bmp": (gray, True), "rgba.bmp": (COLOR, True), "tiff_named.jpg": (COLOR, True),
        "webp_named.png": (COLOR, True), "gray16_tiff.png": ((COLOR[0],) * 3, True),
    }


def test_odd_images_decode_to_8_bit_rgb(tmp_path, make_image_folder):
    root = colors_folder(tmp_path / "d", make_image_folder)
    expected = write_odd_images(root / "train" / "red")
    dataset = image_folder(root)
    assert dataset.skipped == ()
    files = [Path(f).name for f in dataset.train.files]
    flags = dict(zip(files, dataset.train.use_pillow.tolist(), strict=True))
    assert {name: flags[name] for name in expected} == {name: flag for name, (_, flag) in expected.items()}
    pixels, _ = load_pixels(dataset.train, (12, 12))
    for name, (color, _) in expected.items():
        image = pixels[files.index(name)]
        assert image.shape == (12, 12, 3)
        np.testing.assert_allclose(image.mean(axis=(0, 1)), color, atol=3, err_msg=name)
        assert image.std(axis=(0, 1)).max() < 2, name  # solid: no stray channel or alpha noise


PILLOW_DECODED = ("palette.gif", "palette.bmp", "one_bit.bmp", "gray.bmp", "rgba.bmp", "tiff_named.jpg",
                  "webp_named.png", "gray16_tiff.png")


def test_odd_images_keep_their_flags_through_subsets(tmp_path, make_image_folder):
    from edgesmith.data.datasets import limit_per_class, with_validation

    root = colors_folder(tmp_path / "d", make_image_folder)
    write_odd_images(root / "train" / "red")
    dataset = with_validation(image_folder(root), 0.3, seed=0)
    for split in (dataset.train, dataset.val, limit_per_class(dataset.train, 3, seed=1)):
        names = [Path(f).name for f in split.files]
        pillow = {n for n, flag in zip(names, split.use_pillow, strict=True) if flag}
        assert pillow == {n for n in names if n in PILLOW_DECODED}


def test_very_large_image_is_resized(tmp_path, make_image_folder):
    root = colors_folder(tmp_path / "d", make_image_folder)
    Image.new("RGB", (4000, 3000), COLOR).save(root / "train" / "red" / "huge.jpg", quality=85)
    Image.new("RGB", (4000, 3000), COLOR).save(root / "test" / "red" / "huge.png")
    dataset = image_folder(root)
    for split in (dataset.train, dataset.test):
        index = [Path(f).stem for f in split.files].index("huge")
        pixels, _ = load_pixels(split.take(np.asarray([index])), (32, 32))
        assert pixels.shape == (1, 32, 32, 3)
        np.testing.assert_allclose(pixels[0].mean(axis=(0, 1)), COLOR, atol=3)


def test_spaces_and_non_ascii_names(tmp_path):
    root = tmp_path / "données d'été"
    names = {"café au lait": (190, 140, 90), "日本 の 海": (20, 60, 200)}
    for split in ("train", "test"):
        for class_name, color in names.items():
            folder = root / split / class_name
            folder.mkdir(parents=True)
            Image.new("RGB", (10, 10), color).save(folder / "my photo 1.png")
            Image.new("RGB", (10, 10), color).save(folder / "ünïcødé – ✓ (2).JPG", format="JPEG")
    dataset = image_folder(root)
    assert dataset.class_names == ("café au lait", "日本 の 海")
    assert dataset.name == "données d'été" and dataset.skipped == ()
    pixels, labels = load_pixels(dataset.train, (10, 10))
    assert labels.tolist() == [0, 0, 1, 1]
    expected = [names["café au lait"]] * 2 + [names["日本 の 海"]] * 2
    np.testing.assert_allclose(pixels[:, 5, 5], expected, atol=4)


# ---------------------------------------------------------------- configuration, through the CLI


def quickstart(tmp_path: Path, *overrides: str) -> list:
    args = ["run", "quickstart", "--out", tmp_path / "run", "--stages", "train"]
    for item in overrides:
        args += ["--set", item]
    return args


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["colour=3"], r"overrides: unknown key 'colour'; allowed here: name, seed, data"),
        (["model.wieghts='none'"], r"unknown key 'model\.wieghts'; allowed here: backbone, weights"),
        (['train.batch_size="big"'], r"train\.batch_size must be int, got str 'big'"),
        (["train.dropout=0.2"], r"unknown key 'train\.dropout'"),
        (["model.dropout=true"], r"model\.dropout must be float, got bool True"),
        (["optimize.sparsity=1.2"], r"optimize\.sparsity = 1\.2 is out of range; allowed: .*0\.99"),
        (["train.head_epochs=-1"], r"train\.head_epochs = -1 is out of range"),
        (["optimize.techniques=['prune', 'distill']"], r"optimize\.techniques = 'distill' is not allowed; "
         "choose from prune, qat"),
        (["model.backbone='resnet9000'"], r"unknown backbone 'resnet9000'; registered: .*tiny_cnn"),
        (["model.weights='{tmp}/nope.h5'"], r"model\.weights: file .*nope\.h5 does not exist; give an"),
    ],
    ids=["unknown-top-key", "unknown-nested-key", "wrong-type", "key-in-wrong-table", "bool-for-float",
         "sparsity-1.2", "negative-epochs", "unknown-technique", "unknown-backbone", "missing-weights"],
)
def test_bad_configuration_exits_2(tmp_path, capsys, overrides, pattern):
    line = cli_error(capsys, *quickstart(tmp_path, *(o.format(tmp=tmp_path) for o in overrides)))
    assert re.search(pattern, line), line
    assert not (tmp_path / "run").exists()  # checked before any work


def test_bad_recipe_file_exits_2(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "x"\n[model]\nbackbone = "tiny_cnn"\n[model.head]\nunits = 3\n')
    assert "unknown key 'model.head'" in cli_error(capsys, "run", recipe, "--out", tmp_path / "run")
    recipe.write_text('name = "x"\n[train\n')
    assert "not valid TOML" in cli_error(capsys, "run", recipe, "--out", tmp_path / "run")


def test_weights_file_of_another_architecture_exits_2(tmp_path, capsys):
    from edgesmith.zoo import build_base

    other, _ = build_base("tiny_cnn", 16, "none")  # same layer names as small_cnn, narrower kernels
    other.save_weights(str(tmp_path / "tiny.h5"))
    line = cli_error(capsys, *quickstart(tmp_path, f"model.weights='{tmp_path / 'tiny.h5'}'"))
    assert re.search(r"weights file .*tiny\.h5 does not fit backbone small_cnn .*use weights saved", line)
    manifest = RunDir.open(tmp_path / "run").manifest()
    assert manifest["status"] == "incomplete: train did not finish" and manifest["stages"] == {}


def test_recipe_file_that_is_not_text(tmp_path):
    (tmp_path / "model.toml").write_bytes(b"\xff\xfe\x00PK\x03\x04 binary")
    with pytest.raises(RecipeError, match=r"model\.toml: not a text file"):
        load_recipe(tmp_path / "model.toml")


@pytest.mark.parametrize(
    "text",
    ["[optimize]\nsparsity = nan\n", "[train]\nhead_learning_rate = inf\n", f"[optimize]\nsparsity = {'9' * 400}\n"],
    ids=["nan", "inf", "int-too-large-for-float"],
)
def test_non_finite_numbers_are_rejected(tmp_path, text):
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(RecipeError, match=r"must be a finite number"):
        load_recipe(tmp_path / "r.toml")


# ---------------------------------------------------------------- model files


def test_text_file_named_model_keras(tmp_path):
    (tmp_path / "model.keras").write_text("I am not a model\n")
    with pytest.raises(ModelError, match=r"model\.keras: cannot be loaded as a Keras 2 model"):
        load_keras_model(tmp_path / "model.keras")


def test_lambda_layer_is_refused_unless_trusted(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0, name="double")(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ModelError, match=r"lambda\.keras: holds a Lambda layer .*refused in safe mode; pass --trust"):
        load_keras_model(tmp_path / "lambda.keras")
    trusted = load_keras_model(tmp_path / "lambda.keras", trust=True)
    np.testing.assert_allclose(trusted(np.ones((1, 4), np.float32)).numpy(), 2.0)


def test_trust_on_the_command_line_vouches_for_every_load(tmp_path, monkeypatch):
    from edgesmith import cli, safety

    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0, name="double")(inputs)).save(tmp_path / "lambda.keras")
    monkeypatch.setattr(safety, "_USER_TRUSTS", False)  # restored after the test
    assert cli.main(["models"]) == 0 and not safety.trusted()
    assert cli.main(["--trust", "models"]) == 0 and safety.trusted()
    assert load_keras_model(tmp_path / "lambda.keras").get_layer("double") is not None


def keras_zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_keras_zip_with_broken_config(tmp_path):
    path = keras_zip(tmp_path / "model.keras", {"config.json": "{not json", "metadata.json": "{}"})
    with pytest.raises(ModelError, match=r"model\.keras: cannot be loaded as a Keras 2 model"):
        load_keras_model(path)


@pytest.mark.parametrize(
    "files",
    [
        {"hello.txt": "hi"},
        {"config.json": '{"class_name": "os.system", "config": {}}', "metadata.json": "{}"},
    ],
    ids=["zip-without-config", "unknown-class"],
)
def test_keras_zip_that_is_not_a_model(tmp_path, files):
    with pytest.raises(ModelError, match=r"model\.keras: cannot be loaded as a Keras 2 model"):
        load_keras_model(keras_zip(tmp_path / "model.keras", files))


# ---------------------------------------------------------------- run directories


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("a regular file, not a folder")
    pattern = r"afile/run: cannot write here \(Not a directory\); choose another --out"
    with pytest.raises(RunDirError, match=pattern):
        RunDir.create(tmp_path / "afile" / "run")
    line = cli_error(capsys, "run", "quickstart", "--stages", "train", "--out", tmp_path / "afile" / "run")
    assert "afile/run: cannot write here (Not a directory)" in line


def test_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("a file where the run directory should go")
    with pytest.raises(RunDirError, match=r"run is a file, not a folder; choose another --out"):
        RunDir.create(tmp_path / "run")
    assert "is a file, not a folder" in cli_error(capsys, "train", "quickstart", "--out", tmp_path / "run")


def test_existing_run_directory_needs_force_for_train_too(tmp_path, capsys):
    RunDir.create(tmp_path / "run")
    line = cli_error(capsys, "train", "quickstart", "--out", tmp_path / "run")
    assert "already holds a run; pass --force" in line
    assert RunDir.create(tmp_path / "run", force=True).manifest()["stages"] == {}


@pytest.mark.parametrize(
    ("err", "text"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
    ids=["disk-full", "read-only"],
)
def test_full_disk_while_writing_an_artifact(tmp_path, err, text):
    target = write_json(tmp_path / "metrics.json", {"old": True})
    with pytest.raises(RunDirError, match=rf"cannot write .*metrics\.json \({text}\); free disk space"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise OSError(err, text)
    assert target.read_text() == '{\n  "old": true\n}\n'  # the complete old file is kept
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_other_errors_inside_atomic_path_are_not_disguised(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("partial")
        _ = 1 / 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"\x89\x00\xff binary", r"manifest\.json: not valid JSON"),
        (b'{"stages": ', r"manifest\.json: not valid JSON"),
        (b"[1, 2]", r"manifest\.json: not an edgesmith manifest \(expected a JSON object"),
        (b'{"stages": []}', r"not an edgesmith manifest"),
    ],
    ids=["binary", "cut-short", "a-list", "stages-not-a-table"],
)
def test_damaged_manifest(tmp_path, capsys, content, pattern):
    run = RunDir.create(tmp_path / "run")
    run.manifest_path.write_bytes(content)
    with pytest.raises(RunDirError, match=pattern):
        run.manifest()
    write_json(run.path / "recipe.json", load_recipe("quickstart").to_dict())
    assert re.search(pattern, cli_error(capsys, "bench", run.path))
