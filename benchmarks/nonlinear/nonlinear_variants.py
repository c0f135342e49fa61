"""Layer study of the non-linear method's variants (issue 6, part 3) on real SmolLM2-135M layers.

For each chosen layer, on the *dense* model's inputs to that layer (layers compared
independently of upstream pruning), the whole layer is pruned by the real pipeline step
(:func:`nlprune.prune.pipeline.prune_layer_true_sequential`: q/k/v, then o, gate/up, down,
each on the already-pruned sublayers' outputs) with each configuration of ``CONFIGS``, and
measured on held-out C4 validation windows:

  * ``probs``: attention-matrix error, mean over heads of ||P - P_dense||_F^2 / n (the paper's
    objective; ``results.json``'s attention_error);
  * ``attn``: attention-output error ||attn(x) - attn_dense(x)||^2 / ||attn_dense(x)||^2;
  * ``layer``: layer-output error ||f(h) - f_dense(h)||^2 / ||f_dense(h) - h||^2 (relative
    to the layer's residual update);

and the pruning seconds of the layer (the first layer of a configuration includes compilation;
the summary reports the median). Calibration: cpu protocol (8 x 512 C4 train, seed 0).

    python benchmarks/nonlinear/nonlinear_variants.py --data-dir ../shared/data --layers 0 10 20 29 \\
        [--sparsity-type 2:4] [--configs ...] --output benchmarks/nonlinear/variants_unstructured.json
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
from nlprune.methods import get_method
from nlprune.prune import refit
from nlprune.prune.pipeline import prune_layer_true_sequential
from nlprune.sparsity import parse_pattern
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import write_json  # noqa: E402
from nonlinear_layers import study_inputs  # noqa: E402  (the dense model's inputs to each studied layer)

STE = {"straight_through": True}
OUT = {"straight_through": True, "objective": "output"}
SG = {"linear_method": "sparsegpt"}
# name -> (method, options); "_o_input" / "_down_input": o's / down's refit target is SparseGPT's
# (the dense weight on its own pruned input) instead of the dense sublayer's output
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "ste": ("nonlinear", STE),
    "ste_sgpt": ("nonlinear", {**STE, **SG}),
    "out": ("nonlinear", OUT),
    "out_sgpt": ("nonlinear", {**OUT, **SG}),
    "ste_refit": ("nonlinear", {**STE, "refit": True}),
    "ste_sgpt_refit": ("nonlinear", {**STE, **SG, "refit": True}),
    "ste_sgpt_refit_o_input": ("nonlinear", {**STE, **SG, "refit": True, "_o_input": True}),
    "ste_sgpt_refit0": ("nonlinear", {**STE, **SG, "refit": True, "refit_steps": 0}),
    "ste_sgpt_refit_eta0.003": ("nonlinear", {**STE, **SG, "refit": True, "refit_eta": 0.003}),
    "ste_sgpt_refit_eta0.03": ("nonlinear", {**STE, **SG, "refit": True, "refit_eta": 0.03}),
    "ste_sgpt_refit_T30": ("nonlinear", {**STE, **SG, "refit": True, "refit_steps": 30}),
    "ste_sgpt_refit_cg20": ("nonlinear", {**STE, **SG, "refit": True, "refit_cg": 20}),
    "out_refit": ("nonlinear", {**OUT, "refit": True}),
    "out_sgpt_refit": ("nonlinear", {**OUT, **SG, "refit": True}),
    "out_sgpt_refit_o_input": ("nonlinear", {**OUT, **SG, "refit": True, "_o_input": True}),
    "out_sgpt_refit_cg20": ("nonlinear", {**OUT, **SG, "refit": True, "refit_cg": 20}),
    "out_sgpt_T40": ("nonlinear", {**OUT, **SG, "steps": 40}),
    "ste_sgpt_refit0_cg20": ("nonlinear", {**STE, **SG, "refit": True, "refit_steps": 0, "refit_cg": 20}),
    "ste_sgpt_refit0_cg50": ("nonlinear", {**STE, **SG, "refit": True, "refit_steps": 0, "refit_cg": 50}),
    "ste_sgpt_refit0_cg20_down_input": ("nonlinear", {**STE, **SG, "refit": True, "refit_steps": 0, "refit_cg": 20,
                                                      "_down_input": True}),
    "ste_refit0_cg20": ("nonlinear", {**STE, "refit": True, "refit_steps": 0, "refit_cg": 20}),
}
DEFAULT_CONFIGS = ["wanda", "sparsegpt", "ste", "ste_sgpt", "out", "out_sgpt", "ste_sgpt_refit", "out_sgpt_refit"]


@eqx.filter_jit
def _errors(dense, pruned, h, cos, sin):
    def one(x):
        xa = dense.input_layernorm(x)
        ad, ap = dense.self_attn, pruned.self_attn
        pd = ad.attention_probs(*ad.project_qk(xa, cos, sin))
        pp = ap.attention_probs(*ap.project_qk(xa, cos, sin))
        probs = jnp.mean(jnp.sum((pp - pd) ** 2, axis=(-2, -1))) / x.shape[0]
        od, op = ad(xa, cos, sin), ap(xa, cos, sin)
        fd, fp = dense(x, cos, sin), pruned(x, cos, sin)
        return probs, jnp.sum((op - od) ** 2), jnp.sum(od**2), jnp.sum((fp - fd) ** 2), jnp.sum((fd - x) ** 2)

    probs, ao, ad, lo, ld = jax.vmap(one)(h)
    return jnp.mean(probs), jnp.sum(ao) / jnp.sum(ad), jnp.sum(lo) / jnp.sum(ld)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(CONFIGS))
    parser.add_argument("--sparsity-type", default="unstructured")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/nonlinear/variants.json")
    args = parser.parse_args()

    pattern = parse_pattern(args.sparsity_type, 0.5)
    loaded, cal_prov, cos, sin, h_cal, h_eval = study_inputs(args)
    model = loaded.model

    rows: list[dict[str, Any]] = []
    for li in args.layers:
        dense = model.model.layers[li]
        row: dict[str, Any] = {"layer": li, "probs": {}, "attn": {}, "layer_err": {}, "seconds": {}}
        for name in args.configs:
            method_name, options = CONFIGS[name]
            options = dict(options)
            refit.O_TARGET = "input" if options.pop("_o_input", False) else "dense"
            refit.DOWN_TARGET = "input" if options.pop("_down_input", False) else "dense"
            method = get_method(method_name, **options)
            start = time.perf_counter()
            pruned, out = prune_layer_true_sequential(dense, h_cal[li], cos, sin, method, pattern, 8)
            out.block_until_ready()
            row["seconds"][name] = time.perf_counter() - start
            p, a, l = (float(v) for v in _errors(dense, pruned, h_eval[li], cos, sin))
            row["probs"][name], row["attn"][name], row["layer_err"][name] = p, a, l
            print(f"layer {li} {name:<26} probs {p:.3e} attn {a:.4f} layer {l:.4f} {row['seconds'][name]:6.1f} s", flush=True)
        refit.O_TARGET = refit.DOWN_TARGET = "dense"
        rows.append(row)

    base = {r["layer"]: r for r in rows}
    summary = {}
    for m in args.configs:
        summary[m] = {"median_seconds": statistics.median(r["seconds"][m] for r in rows)}
        for key in ("probs", "attn", "layer_err"):
            summary[m][f"{key}_vs_wanda"] = float(np.exp(np.mean([np.log(r[key][m] / base[r["layer"]][key]["wanda"])
                                                                   for r in rows]))) if "wanda" in args.configs else None
            summary[m][f"{key}_mean"] = float(np.mean([r[key][m] for r in rows]))
    record = {
        "model": loaded.describe(), "pattern": pattern.name, "ratio": pattern.ratio, "layers": args.layers,
        "calibration": {k: cal_prov.get(k) for k in ("dataset", "split", "seed", "nsamples", "seqlen")},
        "eval_windows": args.eval_windows, "configs": {k: CONFIGS[k] for k in args.configs},
        "rows": rows, "summary": summary, "machine": api.machine(),
    }
    write_json(args.output, record)
    print(f"\n{pattern.name} at {pattern.ratio:g}; geometric mean over layers {args.layers} of the ratio to wanda")
    print(f"{'config':<26}{'probs':>9}{'attn':>9}{'layer':>9}{'s/layer':>9}")
    for m in args.configs:
        s = summary[m]
        f = lambda v: f"{v:>9.3f}" if v is not None else f"{'-':>9}"  # noqa: E731
        print(f"{m:<26}{f(s['probs_vs_wanda'])}{f(s['attn_vs_wanda'])}{f(s['layer_err_vs_wanda'])}{s['median_seconds']:>9.2f}")


if __name__ == "__main__":
    main()
