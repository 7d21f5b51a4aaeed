"""Train stage: transfer learning on a registered backbone."""

from edgesmith.train.transfer import TrainResult, train

__all__ = ["TrainResult", "train"]
