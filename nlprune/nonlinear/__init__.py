"""The non-linear attention pruning method (Liang et al., ICLR 2025) and its theory.

Theory (the paper's merged-W form, exact on the synthetic problems): :mod:`objective` (the
loss and its closed-form gradient), :mod:`lipschitz` (certified step sizes, merged and real
layers), :mod:`curvature` (Hessian probes), :mod:`descent` (Algorithm 1, its step rules,
binarisation). The method on real Llama layers: :mod:`groups` (per-KV-group modules),
:mod:`qk` (the q/k solve), :mod:`output` (the attention-output objective and the gradient
refit of kept weights), :mod:`options` (options and recipes), :mod:`method` (the registered
``nonlinear`` pruning method). This package exports the theory; ``nlprune.methods`` registers
the method.
"""

from nlprune.nonlinear.curvature import HessianEigs, top_hessian_eigenvalue
from nlprune.nonlinear.descent import (
    PAPER_REAL_ETA,
    STEP_RULES,
    GDConfig,
    GDResult,
    binarize,
    gd_core,
    gradient_descent,
    paper_synthetic_eta,
    solve_merged,
)
from nlprune.nonlinear.lipschitz import (
    LipschitzReport,
    certified_lipschitz_bound,
    lipschitz_report,
    method_md_bound,
    segment_curvature_bound,
)
from nlprune.nonlinear.objective import (
    attention,
    causal_mask,
    dense_target,
    grad_closed_form,
    lam_from_paper,
    logits,
    loss,
    value_and_grad_closed_form,
)

__all__ = [
    "HessianEigs",
    "LipschitzReport",
    "certified_lipschitz_bound",
    "lipschitz_report",
    "method_md_bound",
    "segment_curvature_bound",
    "top_hessian_eigenvalue",
    "attention",
    "causal_mask",
    "dense_target",
    "grad_closed_form",
    "lam_from_paper",
    "logits",
    "loss",
    "value_and_grad_closed_form",
    "PAPER_REAL_ETA",
    "STEP_RULES",
    "GDConfig",
    "GDResult",
    "binarize",
    "gd_core",
    "gradient_descent",
    "paper_synthetic_eta",
    "solve_merged",
]
