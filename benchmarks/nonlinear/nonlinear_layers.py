"""Layer-by-layer study of the non-linear q/k method on real SmolLM2-135M inputs.

For each chosen layer, on the *dense* model's inputs to that layer (so layers are compared
independently of upstream pruning), prune q_proj and k_proj at one ratio with

  * the linear baselines: magnitude, Wanda, SparseGPT (its updated weights);
  * configurations of the non-linear method (``CONFIGS``): the paper's recipe, the variants
    that isolate step size, init, binarisation, regulariser and steps, and the
    straight-through variant (``ste_*``; ``bt`` = backtracking) at several costs;

and measure the attention error on held-out windows (C4 validation): mean over heads of
||P_pruned - P_dense||_F^2 / n, mean over windows, the same number as ``results.json``'s
``attention_error`` but with only q/k pruned. Calibration is the cpu protocol (8 x 512 C4
train windows, seed 0). Seconds are the q/k solve per layer (the first layer of each
configuration includes compilation; the table reports the median over layers).

It also reports, per layer, the certified Lipschitz bound against the top Hessian eigenvalue
(power iteration, at M = 1) for the merged-W objective on one real head (X: the first ``--bound-tokens``
tokens of one calibration window, W = W_Q,h W_K,g^T / sqrt(hd), RoPE ignored), and for the
real factorised q/k objective of one KV group (the box bound of
:func:`nlprune.prune.nonlinear.certified_qk_bound` against the top eigenvalue at M = 1).

    python benchmarks/nonlinear/nonlinear_layers.py --data-dir ../shared/data [--layers 0 5 10] \\
        [--configs paper ste] [--output runs/nonlinear_layers.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import api
from nlprune.data import calibration_windows, evaluation_windows
from nlprune.eval.attention_error import layer_attention_error
from nlprune.modeling.forward import attn_input, embed, rope_tables, run_layer
from nlprune.methods import get_method
from nlprune.modeling.masks import set_linears
from nlprune.nonlinear import binarize, certified_lipschitz_bound, dense_target, loss, top_hessian_eigenvalue
from nlprune.nonlinear import groups, lipschitz, qk
from nlprune.nonlinear.method import wanda_init
from nlprune.prune import LayerStats
from nlprune.sparsity import parse_pattern
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import write_json  # noqa: E402

# name -> solve_qk options, plus "init" (ones | wanda) and "binarize" (row | magnitude).
# mb1 = one calibration window per step (cycling through the 8), 1/8 of a full-batch step.
CONFIGS: dict[str, dict[str, Any]] = {
    # the paper: fixed eta 0.005, lambda 0.05, T = 100, M_0 = 1, top-(1-rho) of M_T per row
    "paper": dict(step_rule="fixed", eta=0.005, lam=0.05, steps=100),
    "paper_mb1": dict(step_rule="fixed", eta=0.005, lam=0.05, steps=100, window_batch=1),
    # step size: Armijo backtracking (every step descends)
    "backtrack_mb1": dict(step_rule="backtracking", lam=0.05, steps=100, window_batch=1),
    # regulariser: a lambda large enough for the shrinkage to matter within T steps
    "lam10_backtrack_mb1": dict(step_rule="backtracking", lam=10.0, steps=100, window_batch=1),
    # binarisation: |M_T o W| per row
    "paper_mb1_magbin": dict(step_rule="fixed", eta=0.005, lam=0.05, steps=100, window_batch=1, binarize="magnitude"),
    # init: Wanda's mask as M_0 (relaxed forward)
    "wanda_init_mb1": dict(step_rule="fixed", eta=0.005, lam=0.05, steps=100, window_batch=1, init="wanda"),
}


def _ste(eta: float, steps: int, window_batch: int | None = 1, rule: str = "fixed") -> dict[str, Any]:
    """Straight-through: binary masks in the forward, Wanda-score init, eta relative to the
    initial gradient's RMS (backtracking: each step's first try)."""
    return dict(step_rule=rule, eta=eta, eta_relative=True, steps=steps, window_batch=window_batch,
                init="wanda", ste=True)


# fixed: eta x T (the total movement) decides; mb2 / full: 2 / all 8 windows per step
CONFIGS.update({f"ste_eta{e}_T{t}": _ste(e, t) for e in (0.01, 0.02, 0.03) for t in (10, 20, 40, 80)})
CONFIGS.update({"ste_eta0.1_T40": _ste(0.1, 40), "ste_eta0.01_T40_mb2": _ste(0.01, 40, 2),
                "ste_eta0.01_T40_full": _ste(0.01, 40, None)})
# backtracking: a step that raises the mini-batch's binary-mask loss is shrunk until it does not
CONFIGS.update({f"ste_bt_eta{e}_T{t}": _ste(e, t, rule="backtracking") for e in (0.01, 0.03, 0.1) for t in (10, 20, 40, 80)})
# "paper" (full batch, ~100 s per layer on 2 CPU cores) only on request
DEFAULT_CONFIGS = ["paper_mb1", "backtrack_mb1", "lam10_backtrack_mb1", "paper_mb1_magbin", "wanda_init_mb1",
                   "ste_eta0.03_T40", "ste_bt_eta0.1_T10", "ste_bt_eta0.1_T20", "ste_bt_eta0.1_T40"]


def layer_inputs(model, windows: np.ndarray, layers: list[int]) -> dict[int, jax.Array]:
    """The dense model's hidden states entering each requested layer (windows, seq, hidden)."""
    cos, sin = rope_tables(model, windows.shape[1])
    h = embed(model, jnp.asarray(windows, jnp.int32))
    out = {}
    for i, layer in enumerate(model.model.layers[: max(layers) + 1]):
        if i in layers:
            out[i] = h
        h = run_layer(layer, h, cos, sin)
    return out


def attention_error(layer, wq, wk, h_eval, cos, sin) -> float:
    """Held-out attention error of ``layer`` with only q/k replaced by (wq, wk)."""
    pruned = set_linears(layer, {"q_proj": (wq, jnp.ones_like(wq)), "k_proj": (wk, jnp.ones_like(wk))})
    return float(layer_attention_error(layer, pruned, h_eval, cos, sin)) / h_eval.shape[0]


def run_config(layer, X, cos, sin, pattern, cfg: dict[str, Any]) -> tuple[jax.Array, jax.Array, qk.QKSolution, float]:
    cfg = dict(cfg)
    init_kind, how, ste = cfg.pop("init", "ones"), cfg.pop("binarize", "row"), cfg.pop("ste", False)
    attn = layer.self_attn
    wq, wk = attn.q_proj.weight, attn.k_proj.weight
    start = time.perf_counter()
    init = None
    if init_kind == "wanda":
        norms = LayerStats.from_inputs(X, with_hessian=False).norms
        init = tuple(wanda_init(w, norms, pattern, ste) for w in (wq, wk))
    sol = qk.solve_qk(attn, X, cos, sin, init=init, straight_through=pattern if ste else None, **cfg)
    mq, mk = binarize(sol.mask_q, wq, pattern, how), binarize(sol.mask_k, wk, pattern, how)
    mk.block_until_ready()
    return mq, mk, sol, time.perf_counter() - start


def bound_vs_eigen(layer, X, cos, sin, lam: float, tokens: int) -> dict[str, float]:
    """Certified bound / top Hessian eigenvalue: merged form (head 0, RoPE ignored) and the
    real factorised form (KV group 0, box bound, at M = 1), on ``tokens`` tokens of window 0."""
    attn = layer.self_attn
    hd = attn.head_dim
    x = X[0, :tokens]
    wq = attn.q_proj.weight[:hd]  # head 0 (group 0)
    wk = attn.k_proj.weight[:hd]
    W = (wq.T @ wk) / np.sqrt(hd)  # x W x^T = (x wq^T)(x wk^T)^T / sqrt(hd)
    t0 = time.perf_counter()
    merged_bound = certified_lipschitz_bound(x, W, lam)
    target = dense_target(x, W)
    eig = top_hessian_eigenvalue(loss, jnp.ones_like(W), x[None], W, target, lam, iters=50).magnitude
    t1 = time.perf_counter()

    masks, rest = groups.partition_masks(groups.split_groups(attn))
    g_masks, g_rest = groups.tree_index(masks, 0), groups.tree_index(rest, 0)
    dense = eqx.combine(g_masks, g_rest)
    xw = X[:1, :tokens]
    c, s = cos[:tokens], sin[:tokens]
    real_bound = lipschitz.certified_qk_bound(dense, xw, c, s, lam)
    tgt = groups.group_probs(dense, xw, c, s)
    vg = qk.make_value_and_grad(None, 1.0)
    real_eig = top_hessian_eigenvalue(lambda m: vg(m, g_rest, xw, c, s, tgt, lam)[0], g_masks, iters=50).magnitude
    return {
        "merged_bound": merged_bound, "merged_top_eig": eig, "merged_ratio": merged_bound / eig,
        "real_box_bound": real_bound, "real_top_eig_at_ones": real_eig, "real_ratio": real_bound / real_eig,
        "tokens": tokens, "seconds_merged": t1 - t0, "seconds_real": time.perf_counter() - t1,
    }


def study_inputs(args):
    """What the layer studies share: the model, the calibration windows' and the held-out
    windows' inputs to each studied layer (the held-out ones from the C4 validation split,
    never the test windows), and the RoPE tables."""
    loaded = api.load(args.model)
    model = loaded.model
    max_seq = model.config.max_position_embeddings
    cal, cal_prov = calibration_windows(loaded.tokenizer, args.nsamples, args.seqlen, 0, data_dir=args.data_dir,
                                        max_seqlen=max_seq)
    held, _ = evaluation_windows(loaded.tokenizer, "c4-validation", args.eval_windows, args.seqlen,
                                 data_dir=args.data_dir, max_seqlen=max_seq, progress=False)
    cos, sin = rope_tables(model, args.seqlen)
    return loaded, cal_prov, cos, sin, layer_inputs(model, cal, args.layers), layer_inputs(model, held, args.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(CONFIGS))
    parser.add_argument("--sparsity-ratio", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out C4 validation windows")
    parser.add_argument("--bound-tokens", type=int, default=128)
    parser.add_argument("--bound-layers", type=int, nargs="*", default=[0, 15, 29],
                        help="layers for the bound / eigenvalue check (~4 min each on 2 CPU cores: the "
                        "merged bound takes one 576 x 576 eigenproblem per column of W)")
    parser.add_argument("--output", default="runs/nonlinear_layers.json")
    args = parser.parse_args()

    pattern = parse_pattern("unstructured", args.sparsity_ratio)
    loaded, cal_prov, cos, sin, h_cal, h_eval = study_inputs(args)
    model = loaded.model

    rows: list[dict[str, Any]] = []
    for li in args.layers:
        layer = model.model.layers[li]
        X = attn_input(layer, h_cal[li])
        wq, wk = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        row: dict[str, Any] = {"layer": li, "error": {}, "seconds": {}, "loss": {}}
        for name in ("magnitude", "wanda", "sparsegpt"):
            method = get_method(name)
            start = time.perf_counter()
            stats = LayerStats.from_inputs(X, with_hessian=method.needs_hessian)
            rq, rk = method.prune_many([wq, wk], stats, pattern)
            rk.weight.block_until_ready()
            row["seconds"][name] = time.perf_counter() - start
            row["error"][name] = attention_error(layer, rq.weight, rk.weight, h_eval[li], cos, sin)
        for name in args.configs:
            mq, mk, sol, secs = run_config(layer, X, cos, sin, pattern, CONFIGS[name])
            row["error"][name] = attention_error(layer, wq * mq, wk * mk, h_eval[li], cos, sin)
            row["seconds"][name] = secs
            row["loss"][name] = {
                "first": sol.losses[:, 0, 0].tolist(), "last": sol.losses[:, -1, -1].tolist(),
                "n_increases": sol.n_increases, "eta": sol.eta.tolist(),
            }
        if li in args.bound_layers:
            row["bounds"] = bound_vs_eigen(layer, X, cos, sin, 0.05, args.bound_tokens)
        rows.append(row)
        print(f"layer {li}: " + ", ".join(f"{k} {v:.3e}" for k, v in row["error"].items()), flush=True)

    methods = list(rows[0]["error"])
    wanda = {r["layer"]: r["error"]["wanda"] for r in rows}
    summary = {
        m: {
            "median_seconds": statistics.median(r["seconds"][m] for r in rows),
            "mean_error": float(np.mean([r["error"][m] for r in rows])),
            "geomean_ratio_to_wanda": float(np.exp(np.mean([np.log(r["error"][m] / wanda[r["layer"]]) for r in rows]))),
        }
        for m in methods
    }
    record = {
        "model": loaded.describe(), "ratio": pattern.ratio, "layers": args.layers,
        "calibration": {k: cal_prov.get(k) for k in ("dataset", "split", "seed", "nsamples", "seqlen")},
        "eval_windows": args.eval_windows, "configs": {k: CONFIGS[k] for k in args.configs},
        "rows": rows, "summary": summary, "machine": api.machine(),
    }
    write_json(args.output, record)

    print(f"\nattention error (held-out, q/k at {pattern.ratio:g}), per layer; ratio = geometric mean vs wanda")
    print(f"{'method':<22}" + "".join(f"{'L' + str(r['layer']):>10}" for r in rows) + f"{'vs wanda':>10}{'s/layer':>9}")
    for m in methods:
        print(f"{m:<22}" + "".join(f"{r['error'][m]:>10.2e}" for r in rows)
              + f"{summary[m]['geomean_ratio_to_wanda']:>10.3f}{summary[m]['median_seconds']:>9.2f}")
    if any("bounds" in r for r in rows):
        print("\ncertified bound / top Hessian eigenvalue (lambda 0.05)")
        print(f"{'layer':<7}{'merged bound':>14}{'top eig':>11}{'ratio':>9}{'real box bound':>16}{'top eig':>11}{'ratio':>10}")
        for r in (r for r in rows if "bounds" in r):
            b = r["bounds"]
            print(f"{r['layer']:<7}{b['merged_bound']:>14.3e}{b['merged_top_eig']:>11.3e}{b['merged_ratio']:>9.1f}"
                  f"{b['real_box_bound']:>16.3e}{b['real_top_eig_at_ones']:>11.3e}{b['real_ratio']:>10.1f}")


if __name__ == "__main__":
    main()
