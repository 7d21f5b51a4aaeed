"""Optimize stage: pruning, clustering, quantization-aware training (and their chains) with tfmot,
and the accuracy-budgeted search over them and the export formats (:func:`search`)."""

from edgesmith.optimize.search import SearchResult, search
from edgesmith.optimize.techniques import OptimizeResult, cluster, optimize, prune, quantization_aware

__all__ = ["OptimizeResult", "SearchResult", "cluster", "optimize", "prune", "quantization_aware", "search"]
