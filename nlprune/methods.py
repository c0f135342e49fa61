"""Every pruning method nlprune knows, by name: the registry above both wings.

``nlprune.prune`` holds the linear methods (magnitude, Wanda, SparseGPT) and
``nlprune.nonlinear.method`` the non-linear one; importing them registers them. A new method
is one file with a ``@register_method`` class plus one import line here.
"""

from __future__ import annotations

from typing import Any

import nlprune.nonlinear.method  # noqa: F401  (registers "nonlinear")
import nlprune.prune  # noqa: F401  (registers magnitude, wanda, sparsegpt, alps, ria)
from nlprune.prune.base import PruningMethod, method_class, registered_methods

DEFAULT_METHOD = "wanda"  # nlprune prune's --prune-method when none is given


def available_methods() -> tuple[str, ...]:
    return tuple(registered_methods())


def get_method(name: str, **options: Any) -> PruningMethod:
    """The method registered as ``name``, configured with ``options`` (validated once; unknown
    names and bad values raise with the flag and the fix)."""
    return method_class(name).from_options(**options)
