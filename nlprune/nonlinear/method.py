"""``--prune-method nonlinear``: the pipeline's adapter for the non-linear method.

Every linear goes through one hook, :meth:`NonLinear.prune_group`, group by group:

  q/k/v    q and k by the q/k solve (:mod:`nlprune.nonlinear.qk`) on the layer's attention
           inputs, or all four attention linears by the output objective
           (:mod:`nlprune.nonlinear.output`); v by the fill-in method;
  o        the fill-in's mask (or the one the output objective chose with q/k/v);
  gate/up, down   the fill-in method.

The fill-in (``linear_method``: Wanda by default, the paper's recipe) prunes at the same
ratio. With ``refit``, q and k (and v under the output objective) are re-fitted here by
gradient steps on the attention error; every other linear by the pipeline's least-squares
refit, the same stage every method gets (:func:`nlprune.prune.refit.refit_group`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nlprune.nonlinear import memory
from nlprune.nonlinear.descent import binarize
from nlprune.nonlinear.groups import ATTN_LINEARS
from nlprune.nonlinear.options import NonlinearOptions
from nlprune.nonlinear.output import prune_attention_output, refit_attention
from nlprune.nonlinear.qk import solve_qk
from nlprune.prune.base import (
    GroupContext,
    MemoryShape,
    MethodMemory,
    PruneResult,
    PruningMethod,
    check_result,
    method_class,
    register_method,
)
from nlprune.prune.stats import LayerStats
from nlprune.prune.wanda import wanda_prune, wanda_scores
from nlprune.sparsity import DEFAULT_BLOCKSIZE, SparsityPattern


def wanda_init(weight: jax.Array, norms: jax.Array, pattern: SparsityPattern, scores: bool) -> jax.Array:
    """M_0 from Wanda: its binary mask (relaxed forward), or (``scores``, for the
    straight-through forward) its scores over each row's median, a ranking whose top-k is
    Wanda's mask."""
    if not scores:
        return wanda_prune(weight, jnp.square(norms), pattern).mask.astype(jnp.float32)
    return wanda_scores(weight, norms)


@register_method
class NonLinear(PruningMethod):
    """q/k by the non-linear attention objective, every other linear by ``linear_method``."""

    name = "nonlinear"
    Options = NonlinearOptions
    fills_in = False  # its q/k solve needs the layer's attention, not one linear's statistics
    options: NonlinearOptions

    def __init__(self, options: NonlinearOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.fill_in = method_class(o.linear_method).from_options(**o.linear_options)
        self.blocksize = DEFAULT_BLOCKSIZE if o.blocksize is None else o.blocksize  # the refit's blocks

    @property
    def uses_hessian(self) -> bool:  # type: ignore[override]
        return self.fill_in.uses_hessian

    @property
    def kept_weights_damping(self) -> float | None:
        return self.fill_in.kept_weights_damping

    def refit_blocksize(self) -> int:
        return self.blocksize

    @property
    def needs_dense_layer(self) -> bool:  # o_proj's stage starts from the dense weights
        return True

    def refits_itself(self, group: str) -> tuple[str, ...]:
        """q/k (and v under the output objective) are re-fitted by gradient steps on the
        attention error, not by least squares."""
        if group != "qkv":
            return ()
        return ("q_proj", "k_proj", "v_proj") if self.options.objective == "output" else ("q_proj", "k_proj")

    def needs_inputs(self, group: str) -> bool:
        return group == "qkv"  # q/k are solved on the attention inputs themselves

    def comparison_group(self, pattern: SparsityPattern) -> tuple[str, int]:
        return self.fill_in.comparison_group(pattern)

    def check_pattern(self, pattern: SparsityPattern) -> None:
        self.fill_in.check_pattern(pattern)

    def qkv_memory(self, shape: MemoryShape) -> MethodMemory:
        return memory.qkv_memory(self.options, shape)

    def memory_alternatives(self, shape: MemoryShape) -> list[tuple[str, dict[str, Any], str]]:
        return memory.memory_alternatives(self.options, shape)

    # -- the pipeline's hook -------------------------------------------------------------------

    def prune_group(self, ctx: GroupContext) -> dict[str, PruneResult]:
        if ctx.group == "qkv":
            return self._prune_qkv(ctx)
        if ctx.group == "o" and self.options.objective == "output":  # its mask was chosen with q/k/v
            w0 = ctx.dense_layer.self_attn.o_proj.effective_weight
            mask = jnp.asarray(ctx.layer.self_attn.o_proj.mask).astype(bool)
            result = PruneResult(mask, jnp.where(mask, w0, 0).astype(w0.dtype))
            check_result(result, w0, ctx.pattern, "row", DEFAULT_BLOCKSIZE)  # per row of each group's slice
            return {"o_proj": result}
        return super().prune_group(ctx)

    # -- the linear fill-in (v, o, gate, up, down) ---------------------------------------------

    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        return self._prune_many([weight], stats, pattern)[0]

    def _prune_many(self, weights: Sequence[jax.Array], stats: LayerStats, pattern: SparsityPattern) -> list[PruneResult]:
        # check=False: prune_many of this method checks in the fill-in's group
        return self.fill_in.prune_many(weights, stats, pattern, check=False)

    # -- q/k: the non-linear objective ---------------------------------------------------------

    def _prune_qkv(self, ctx: GroupContext) -> dict[str, PruneResult]:
        """q and k (or q, k, v, o under the output objective) from the layer's attention inputs;
        v by the fill-in."""
        attn, pattern = ctx.layer.self_attn, ctx.pattern
        if self.options.objective == "output":
            return self._prune_attention_output(ctx)
        for name in ("q_proj", "k_proj"):
            pattern.check_width(getattr(attn, name).weight.shape[1], name)
        results = self._prune_qk(attn, ctx.inputs, ctx.cos, ctx.sin, pattern)
        (results["v_proj"],) = self.prune_many([ctx.weights[ctx.names.index("v_proj")]], ctx.stats, pattern)
        return results

    def _prune_qk(self, attn, inputs: jax.Array, cos: jax.Array, sin: jax.Array,
                  pattern: SparsityPattern) -> dict[str, PruneResult]:
        o = self.options
        wq, wk = attn.q_proj.weight, attn.k_proj.weight
        init = None
        if o.mask_init == "wanda":
            norms = LayerStats.from_inputs(inputs, with_hessian=False).norms
            init = tuple(wanda_init(w, norms, pattern, o.straight_through) for w in (wq, wk))
        sol = solve_qk(
            attn, inputs, cos, sin, lam=o.lam, steps=o.steps, step_rule=o.step_rule, eta=o.eta, init=init,
            project=o.project, window_batch=o.window_batch, window_chunk=o.window_chunk,
            eta_relative=o.eta_relative, straight_through=pattern if o.straight_through else None,
            recompute_targets=o.recompute_targets,
        )
        group = "matrix" if o.binarize == "matrix" else "row"
        masks = {
            name: binarize(m, getattr(attn, name).effective_weight, pattern, o.binarize)
            for name, m in (("q_proj", sol.mask_q), ("k_proj", sol.mask_k))
        }
        weights = {"q_proj": jnp.where(masks["q_proj"], wq, 0), "k_proj": jnp.where(masks["k_proj"], wk, 0)}
        refit_report = None
        if o.refit and o.refit_steps > 0:  # gradient steps on the kept q/k weights
            weights, rsol = refit_attention(
                attn, inputs, cos, sin, masks, ("q_proj", "k_proj"), objective="probs",
                steps=o.refit_steps, eta=o.refit_eta, window_batch=o.window_batch,
                recompute_targets=o.recompute_targets,
            )
            refit_report = rsol.report()
        results = {}
        for name, w in (("q_proj", wq), ("k_proj", wk)):
            result = PruneResult(masks[name], weights[name].astype(w.dtype))
            check_result(result, w, pattern, group, DEFAULT_BLOCKSIZE)
            results[name] = result
        self.reports.append({**sol.report(), **({"refit": refit_report} if refit_report is not None else {})})
        return results

    def _prune_attention_output(self, ctx: GroupContext) -> dict[str, PruneResult]:
        """``objective="output"``: q, k, v and o masks (and, with refit, q/k/v weights) from the
        attention output. v is re-fitted by gradient steps only; o's least-squares refit waits
        for its pruned input (:meth:`_prune_o`)."""
        o, attn, pattern = self.options, ctx.layer.self_attn, ctx.pattern
        for name in ATTN_LINEARS:
            pattern.check_width(getattr(attn, name).weight.shape[1], name)
        out, report = prune_attention_output(
            attn, ctx.inputs, ctx.cos, ctx.sin, pattern, steps=o.steps, eta=o.eta, window_batch=o.window_batch,
            step_rule=o.step_rule, refit=o.refit and o.refit_steps > 0, refit_steps=o.refit_steps,
            refit_eta=o.refit_eta, recompute_targets=o.recompute_targets,
        )
        results = {}
        for name, (mask, weight) in out.items():
            result = PruneResult(mask, weight)
            check_result(result, getattr(attn, name).weight, pattern, "row", DEFAULT_BLOCKSIZE)
            results[name] = result
        self.reports.append({"rule": o.step_rule, **report})
        return results
