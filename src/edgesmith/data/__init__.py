"""Data sets, the preprocessing spec and tf.data pipelines."""

from edgesmith.data.datasets import ImageDataset, Split, digits, image_folder, load_dataset
from edgesmith.data.spec import PreprocessSpec

__all__ = ["ImageDataset", "PreprocessSpec", "Split", "digits", "image_folder", "load_dataset"]
