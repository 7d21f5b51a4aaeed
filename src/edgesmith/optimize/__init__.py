"""Optimize stage: magnitude pruning and quantization-aware training with tfmot."""

from edgesmith.optimize.techniques import OptimizeResult, optimize, prune, quantization_aware

__all__ = ["OptimizeResult", "optimize", "prune", "quantization_aware"]
