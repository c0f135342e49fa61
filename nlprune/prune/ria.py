"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play: An
Efficient Post-training Pruning Method for Large Language Models"), as its reference code
(github biomedical-cybernetics/Relative-importance-and-activation-pruning, ``lib/prune.py``)
scores weights:

    S_ij = (|W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|) * ||x_j||^a

the weight's share of its input column and of its output row, times the input feature's norm
to the power ``a`` (0.5). No weight update. Unstructured masks are ranked over the whole
matrix by default (the reference's, without ``--per_outneuron``), or per row; N:M per row.

Not here: the paper's channel permutation for N:M. Its mask is N:M only once the linear's
input channels are permuted, and nlprune's masks are N:M in the stored column order (what the
invariant checks, the export and 2:4 kernels read); carrying a permutation would mean permuting
the producer of every input (the residual stream, for q/k/v and gate/up).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nlprune.prune.base import MethodOptions, PruneResult, PruningMethod, option, register_method
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import DEFAULT_BLOCKSIZE, SparsityPattern, mask_from_scores

GROUPS = ("matrix", "row")


@functools.partial(jax.jit, static_argnames=("pattern", "group"))
def ria_prune(weight: jax.Array, sq_norms: jax.Array, pattern: SparsityPattern, exponent: float,
              group: str = "matrix") -> PruneResult:
    """Prune ``weight`` (out, in) with input feature norms^2 ``sq_norms`` (in,)."""
    w = jnp.abs(weight.astype(jnp.float32))
    tiny = jnp.finfo(jnp.float32).tiny  # an all-zero row or column scores 0, not NaN
    relative = w / jnp.maximum(w.sum(0, keepdims=True), tiny) + w / jnp.maximum(w.sum(1, keepdims=True), tiny)
    scores = relative * jnp.sqrt(sq_norms)[None, :] ** exponent
    mask = mask_from_scores(scores, pattern, group)
    return PruneResult(mask, jnp.where(mask, weight, 0).astype(weight.dtype))


@dataclasses.dataclass(frozen=True)
class RIAOptions(MethodOptions):
    activation_exponent: float = option(0.5, "ria: the power a of the input norm ||x_j|| in the score (0.5)")
    group: str = option("matrix", "ria: comparison group: the whole matrix (default, the reference's) or each "
                               "output row (its --per_outneuron)", choices=GROUPS)

    def validate(self) -> None:
        super().validate()
        a = self.activation_exponent
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not abs(a) < float("inf"):
            raise ValueError(f"ria --activation-exponent must be a finite number, got {a!r}")
        if self.group not in GROUPS:
            raise ValueError(f"ria compares per 'matrix' or 'row', not {self.group!r} (--group).")


@register_method
class RIA(PruningMethod):
    name = "ria"
    Options = RIAOptions

    def comparison_group(self, pattern: SparsityPattern) -> tuple[str, int]:
        return self.options.group, DEFAULT_BLOCKSIZE

    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        return ria_prune(weight, stats.sq_norms, pattern, float(self.options.activation_exponent), self.options.group)
