"""Pruning methods on linear layers: the contract (base.py), calibration statistics
(stats.py), one file per method, Optimal Brain Surgeon (obs.py), the least-squares refit
(refit.py) and the layer-by-layer pipeline (pipeline.py). The non-linear method lives in
``nlprune.nonlinear``; ``nlprune.methods`` is the registry of all of them."""

# Importing a method module registers it (one line per method).
from nlprune.prune import alps  # noqa: F401
from nlprune.prune import magnitude  # noqa: F401
from nlprune.prune import ria  # noqa: F401
from nlprune.prune import sparsegpt  # noqa: F401
from nlprune.prune import wanda  # noqa: F401
from nlprune.prune.base import (
    GroupContext,
    MethodOptions,
    PruneResult,
    PruningMethod,
    check_result,
    register_method,
)
from nlprune.prune.stats import LayerStats

__all__ = [
    "GroupContext",
    "LayerStats",
    "MethodOptions",
    "PruneResult",
    "PruningMethod",
    "check_result",
    "register_method",
]
