"""Pruning methods: one interface (base.py), one file per method, masks in patterns.py."""

from nlprune.prune.base import (
    LayerStats,
    PruneResult,
    PruningMethod,
    available_methods,
    check_result,
    get_method,
    register_method,
)
from nlprune.prune.patterns import (
    PatternError,
    SparsityPattern,
    assert_mask,
    mask_from_scores,
    parse_pattern,
)

# Importing a method module registers it (one line per method).
from nlprune.prune import magnitude  # noqa: E402,F401
from nlprune.prune import wanda  # noqa: E402,F401
from nlprune.prune import sparsegpt  # noqa: E402,F401
from nlprune.prune import nonlinear  # noqa: E402,F401

__all__ = [
    "LayerStats",
    "PatternError",
    "PruneResult",
    "PruningMethod",
    "SparsityPattern",
    "assert_mask",
    "available_methods",
    "check_result",
    "get_method",
    "mask_from_scores",
    "parse_pattern",
    "register_method",
]
