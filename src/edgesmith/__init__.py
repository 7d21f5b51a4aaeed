"""edgesmith: turn an image data set into edge-ready models and hard numbers about them.

The public API. Names are imported lazily, so ``import edgesmith`` does not import TensorFlow
(benchmarking TFLite or ONNX files needs only their runtimes). The four stage functions live in their
stage packages, named like them: ``from edgesmith.train import train`` (likewise ``optimize``,
``export``, ``bench``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "edgesmith.recipe",
    "Recipe": "edgesmith.recipe",
    "load_dataset": "edgesmith.data.datasets",
    "image_folder": "edgesmith.data.datasets",
    "PreprocessSpec": "edgesmith.data.spec",
    "build_classifier": "edgesmith.zoo",
    "list_backbones": "edgesmith.zoo",
    "load_runner": "edgesmith.runtime",
    "run_recipe": "edgesmith.workflow",
    "RunDir": "edgesmith.runs",
    "EdgesmithError": "edgesmith.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgesmith' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
