"""Non-linear attention pruning (Liang et al., ICLR 2025): objective, certified step, solver."""

from nlprune.nonlinear.lipschitz import (
    HessianEigs,
    LipschitzReport,
    certified_lipschitz_bound,
    lipschitz_report,
    method_md_bound,
    segment_curvature_bound,
    top_hessian_eigenvalue,
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
from nlprune.nonlinear.solver import (
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
