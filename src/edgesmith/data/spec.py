"""The preprocessing spec: what a model expects as input, stored with it and re-read everywhere.

Normalization is written with plain array arithmetic so the same function serves NumPy arrays
(bench, calibration, no TensorFlow needed) and TensorFlow tensors (tf.data pipelines). A test checks
every mode against ``keras.applications.<module>.preprocess_input``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgesmith.errors import ModelError

SPEC_FILE = "preprocess.json"
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
MODES = {
    "tf": "x / 127.5 - 1 (range [-1, 1]); keras 'tf' mode: MobileNet, MobileNetV2",
    "caffe": "RGB -> BGR, minus ImageNet mean; keras 'caffe' mode: VGG16, ResNet50",
    "torch": "x / 255, minus mean, divided by std; keras 'torch' mode: DenseNet",
    "raw": "0..255 unchanged; the model rescales inside (EfficientNet, MobileNetV3)",
    "unit": "x / 255 (range [0, 1]); small CNNs",
}


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn an RGB image into this model's input.

    Attributes:
        input_size: (height, width) the image is resized to.
        mode: one of :data:`MODES`.
        class_names: the label of each output index.
        channel_order: the image's channel order before normalization (always ``RGB``).
    """

    input_size: tuple[int, int]
    mode: str
    class_names: tuple[str, ...] = ()
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ModelError(f"preprocessing mode {self.mode!r} is unknown; choose from {', '.join(MODES)}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.input_size, 3)

    def normalize(self, images: Any) -> Any:
        """Map float RGB pixels in 0..255 (NumPy or TF, channels last) to the model's input range."""
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "unit":
            return images / 255.0
        if self.mode == "caffe":
            return images[..., ::-1] - _const(IMAGENET_MEAN_RGB[::-1], images)
        if self.mode == "torch":
            return (images / 255.0 - _const(TORCH_MEAN_RGB, images)) / _const(TORCH_STD_RGB, images)
        return images * 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(
            input_size=tuple(data["input_size"]),
            mode=data["mode"],
            class_names=tuple(data.get("class_names", ())),
            channel_order=data.get("channel_order", "RGB"),
        )

    def save(self, folder: str | Path) -> Path:
        from edgesmith.runs import write_json

        return write_json(Path(folder) / SPEC_FILE, self.to_dict())

    @classmethod
    def load_beside(cls, artifact: str | Path) -> PreprocessSpec:
        """Read the spec stored next to a model file (``preprocess.json`` in the same folder)."""
        path = Path(artifact)
        path = path if path.name == SPEC_FILE else path.parent / SPEC_FILE
        if not path.is_file():
            raise ModelError(
                f"{path}: no preprocessing spec beside {Path(artifact).name}; "
                "models made by edgesmith carry one, otherwise pass --input-size and --preprocess"
            )
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _const(values: tuple[float, ...], like: Any, scale: float = 1.0) -> Any:
    import numpy as np

    array = np.asarray(values, dtype=np.float32) * scale
    if hasattr(like, "numpy") or type(like).__module__.startswith("tensorflow"):
        from edgesmith._keras import tf

        return tf.constant(array, dtype=like.dtype)
    return array.astype(like.dtype)
