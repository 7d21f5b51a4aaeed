"""The one place that selects Keras 2 (tf_keras) for tensorflow-model-optimization.

tfmot 0.8 only works with Keras 2. ``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is
imported for the first time, so every module in edgesmith imports ``keras`` and ``tf`` from here.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "tensorflow was imported before edgesmith selected Keras 2 (tf_keras); "
        "import edgesmith first or set TF_USE_LEGACY_KERAS=1 before importing tensorflow"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf"]
