"""The non-linear method's options and recipes: one frozen dataclass, resolved once.

A run's options are resolved in one place (:meth:`NonlinearOptions.resolve`, called by
``MethodOptions.build``), from weakest to
strongest: the field defaults (the paper's recipe, docs/METHOD.md section 3), what
``straight_through`` implies (:data:`STRAIGHT_THROUGH_DEFAULTS`), the chosen recipe
(:data:`RECIPES`, partial instances of the dataclass), and the values the user gave. The
command line's ``--prune-method nonlinear`` flags are generated from the fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from nlprune.nonlinear import descent
from nlprune.prune.base import MethodOptions, fill_in_methods, method_class, option

DEFAULT_METHOD = "wanda"  # the paper's fill-in

STEP_RULES = descent.STEP_RULES
BINARIZE_MODES = descent.BINARIZE_MODES
MASK_INITS = ("ones", "wanda")
OBJECTIVES = ("probs", "output")
PAPER_LAMBDA = 0.05  # Section 6.2 (Llama 3.2-1B)
LINEAR_PASSTHROUGH = ("blocksize", "percdamp", "group")  # handed to the fill-in when set

# What --straight-through implies for the options neither the user nor the recipe set.
STRAIGHT_THROUGH_DEFAULTS: dict[str, Any] = {
    "step_rule": "backtracking", "steps": 20, "mask_init": "wanda", "eta": 0.1, "eta_relative": True,
    "window_batch": 1,
}
_BEST: dict[str, Any] = {"straight_through": True, "linear_method": "sparsegpt", "refit": True}
# Named presets (--recipe), partial instances of NonlinearOptions; flags the user gives win.
# BENCHMARKS.md has the measurements behind each.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "best": _BEST,
    "fast": {**_BEST, "steps": 10, "refit_steps": 0, "refit_cg": 10},
}


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def validate_solver_options(
    lam: float, eta: float | None, steps: int, step_rule: str, window_batch: int | None,
    window_chunk: int | None,
) -> None:
    """Cheap checks of the q/k solver's settings (before any model is loaded)."""
    if not _is_number(lam) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"--lambda must be a finite number >= 0 (the paper uses 0.05), got {lam!r}")
    if eta is not None and (not _is_number(eta) or not (math.isfinite(eta) and eta > 0)):
        raise ValueError(f"--eta must be a finite number > 0 (the paper uses 0.005), got {eta!r}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1 (the paper uses 100), got {steps!r}")
    if step_rule not in STEP_RULES:
        raise ValueError(f"unknown --step-rule {step_rule!r}; use one of {', '.join(STEP_RULES)}")
    for flag, v in (("--window-batch", window_batch), ("--window-chunk", window_chunk)):
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{flag} must be an integer >= 1 (or left out), got {v!r}")


@dataclasses.dataclass(frozen=True)
class NonlinearOptions(MethodOptions):
    recipe: str = option(
        "paper", "nonlinear: preset: paper (default; Algorithm 1 as published), best (--straight-through --linear-method "
        "sparsegpt --refit) or fast (best with --steps 10 --refit-steps 0 --refit-cg 10); flags given override it",
        choices=tuple(RECIPES),
    )
    linear_method: str = option(DEFAULT_METHOD, f"nonlinear: the method that prunes v, o, gate, up, down: any "
                                f"linear method ({DEFAULT_METHOD})")
    lam: float = option(PAPER_LAMBDA, "nonlinear: mask regulariser lambda >= 0 (0.05, the paper's)", flag="--lambda")
    eta: float | None = option(
        None, "nonlinear: step size > 0 (fixed rule: 0.005, the paper's; certified: 1/L; certified_local: first "
        "try 0.005; backtracking: first try 1/|lambda_max|)", type=float,
    )
    step_rule: str = option(
        "fixed", "nonlinear: fixed (the paper's eta, default), certified (1/L on the box [0,1], projected), "
        "certified_local (per-step certificate), backtracking (Armijo)", choices=STEP_RULES,
    )
    steps: int = option(100, "nonlinear: gradient steps T (100, the paper's)")
    mask_init: str = option("ones", "nonlinear: M_0: ones (dense, the paper's) or wanda's mask", choices=MASK_INITS)
    binarize: str = option(
        "row", "nonlinear: keep the top (1 - ratio) of M_T per row (default), per matrix, or of |M_T o W| per row",
        choices=BINARIZE_MODES,
    )
    project: bool = option(False, "nonlinear: clip the masks to [0, 1] after every step")
    window_batch: int | None = option(
        None, "nonlinear: calibration windows per step, cycling through them (default: all of them, full-batch "
        "gradient descent as Algorithm 1; --straight-through implies 1)", type=int,
    )
    window_chunk: int | None = option(
        None, "nonlinear: windows per gradient chunk, to bound memory at long seqlen (default: all at once)", type=int,
    )
    recompute_targets: bool = option(
        False, "nonlinear: build each step's dense target attention from its own windows instead of storing "
        "every window's (memory of --window-batch windows, not --nsamples; the same loss, one more dense forward "
        "a step); also for --refit's gradient steps",
    )
    eta_relative: bool = option(
        False, "nonlinear: eta in units of 1/RMS of each KV group's initial gradient (fixed or backtracking; "
        "needs --mask-init wanda)",
    )
    straight_through: bool = option(
        False, "nonlinear: each step's attention sees the binarised masks (top-k of scores started from Wanda's), "
        "gradients pass straight through to the scores; implies --mask-init wanda --step-rule backtracking "
        "--eta 0.1 --eta-relative --steps 20 --window-batch 1 unless given",
    )
    objective: str = option(
        "probs", "nonlinear: probs (default): q/k match the attention matrix softmax(QK^T); output: q, k, v and o "
        "masks match the attention output softmax(QK^T) V W_O per KV group (needs --straight-through)",
        choices=OBJECTIVES,
    )
    refit_steps: int = option(10, "nonlinear --refit: gradient steps on the kept q/k weights (10; 0: none)")
    refit_eta: float = option(0.01, "nonlinear --refit: first try of each gradient step, as a fraction of RMS(W) (0.01)")
    blocksize: int | None = option(None, "nonlinear: passed to the --linear-method fill-in (and the refit)", type=int)
    percdamp: float | None = option(None, "nonlinear: passed to the --linear-method fill-in",
                                    type=float)
    group: str | None = option(None, "nonlinear: passed to the --linear-method fill-in", type=str,
                               choices=("row", "matrix"))

    @classmethod
    def resolve(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The recipe, then what --straight-through implies, under the values given."""
        recipe = given.get("recipe", "paper")
        if recipe not in RECIPES:
            raise ValueError(f"unknown --recipe {recipe!r}; use one of {', '.join(RECIPES)}")
        values = {**RECIPES[recipe], **given}
        if values.get("straight_through"):
            values = {**STRAIGHT_THROUGH_DEFAULTS, **values}
        return values

    @property
    def linear_options(self) -> dict[str, Any]:
        """The fill-in method's options the user set (blocksize, percdamp, group)."""
        return {k: getattr(self, k) for k in LINEAR_PASSTHROUGH if getattr(self, k) is not None}

    def validate(self) -> None:
        super().validate()
        if self.linear_method not in fill_in_methods():
            raise ValueError(f"unknown --linear-method {self.linear_method!r}; use one of {', '.join(fill_in_methods())}")
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"unknown --mask-init {self.mask_init!r}; use one of {', '.join(MASK_INITS)}")
        if self.binarize not in BINARIZE_MODES:
            raise ValueError(f"unknown --binarize {self.binarize!r}; use one of {', '.join(BINARIZE_MODES)}")
        validate_solver_options(self.lam, self.eta, self.steps, self.step_rule, self.window_batch, self.window_chunk)
        if self.straight_through:
            problems = [
                f"--step-rule {self.step_rule} (use backtracking or fixed: the loss is piecewise constant in "
                "the scores, no bound certifies a step)" if self.step_rule not in ("fixed", "backtracking") else None,
                f"--mask-init {self.mask_init} (use wanda: it needs a ranking to start from)"
                if self.mask_init != "wanda" else None,
                f"--binarize {self.binarize} (use row: each step binarises per row)" if self.binarize != "row" else None,
            ]
            problems = [p for p in problems if p]
            if problems:
                raise ValueError(f"--straight-through does not work with {'; '.join(problems)}")
        if self.eta_relative:
            if self.step_rule not in ("fixed", "backtracking"):
                raise ValueError(f"--eta-relative applies to --step-rule fixed or backtracking, not {self.step_rule}")
            if self.eta is None:
                raise ValueError("--eta-relative needs --eta (in units of 1 / RMS of the initial gradient)")
            if self.mask_init == "ones":
                raise ValueError("--eta-relative needs --mask-init wanda: at M_0 = 1 the attention gradient is zero")
        self._validate_variants()
        try:  # the fill-in validates its own options now, not at layer 0
            method_class(self.linear_method).Options.build(self.linear_method, **self.linear_options)
        except TypeError:
            takers = {k: [m for m in fill_in_methods() if k in method_class(m).option_names()] for k in self.linear_options}
            raise ValueError(
                f"--linear-method {self.linear_method} does not take "
                + "; ".join(f"--{k} (taken by {', '.join(ms) or 'no linear method'})" for k, ms in takers.items())
            ) from None

    def _validate_variants(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown --objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if self.objective == "output":
            if not self.straight_through:
                raise ValueError(
                    "--objective output needs --straight-through: the masks of q, k, v and o are found from "
                    "Wanda's rankings by straight-through descent on the binary masks' output error"
                )
            if self.window_chunk is not None:
                raise ValueError("--window-chunk is not supported with --objective output (use --window-batch)")
            if not self.eta_relative:
                raise ValueError("--objective output takes eta relative to each tensor's initial gradient (--eta-relative)")
        if not _is_int(self.refit_steps) or self.refit_steps < 0:
            raise ValueError(f"--refit-steps must be an integer >= 0 (0: no gradient refit of q/k), got {self.refit_steps!r}")
        if not _is_number(self.refit_eta) or not (math.isfinite(self.refit_eta) and self.refit_eta > 0):
            raise ValueError(f"--refit-eta must be a finite number > 0 (a fraction of RMS(W)), got {self.refit_eta!r}")
