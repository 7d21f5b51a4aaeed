"""Reproducibility: the same recipe and seed train to identical weights and predictions on CPU.

Covers the from-scratch pipeline trainer with its sources of randomness: weight initialisation,
dropout, the seeded tf.data shuffle and random mirroring (which was not reproducible while it ran in a
parallel map: a stateful random op there draws in thread order). The cached-activation trainer has
its own check in test_train.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_recipe
from edgesmith.data.pipeline import load_pixels
from edgesmith.train import train


@pytest.fixture(scope="module")
def recipe():
    return tiny_recipe(data={"mirror": True}, train={"head_epochs": 3, "patience": 3})


@pytest.fixture(scope="module")
def first(digits_data, recipe):
    return train(digits_data, recipe)


@pytest.fixture(scope="module")
def test_inputs(digits_data, first):
    pixels, _ = load_pixels(digits_data.test, first.spec.input_size, limit=200)
    return first.spec.normalize(pixels).astype(np.float32)


def test_same_seed_gives_identical_weights_and_predictions(digits_data, recipe, first, test_inputs):
    second = train(digits_data, recipe)
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        first.model.predict(test_inputs, verbose=0), second.model.predict(test_inputs, verbose=0)
    )
    assert second.history == first.history


def test_another_seed_gives_other_weights(digits_data, recipe, first, test_inputs):
    other = train(digits_data, dataclasses.replace(recipe, seed=recipe.seed + 1))
    assert not np.array_equal(
        first.model.predict(test_inputs, verbose=0), other.model.predict(test_inputs, verbose=0)
    )


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


SUBPROCESS_TRAIN = """
import edgesmith._keras
from conftest import tiny_recipe
from edgesmith.data.datasets import digits, with_validation
from edgesmith.train import train
from test_determinism import weights_digest
recipe = tiny_recipe(data={"mirror": True}, train={"head_epochs": 3, "patience": 3})
print("digest", weights_digest(train(with_validation(digits(seed=0), 0.15, 0), recipe).model))
"""


def test_same_seed_in_a_fresh_process_gives_identical_weights(first):
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", SUBPROCESS_TRAIN], cwd=tests, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tests)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("digest ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    assert lines[-1] == f"digest {weights_digest(first.model)}"
