"""What makes the refit's weight updates fit the calibration text and not other text, and what
fixes it: chosen on the validation sets only (C4 validation, the second halves of the Wikipedia
and LAMBADA text: 32 x 512 each), never on the test sets (issue 14).

The refit (least squares on the fixed masks, CG polish, o/down towards the dense sublayer
outputs) is varied on the non-linear q/k recipe and on SparseGPT and Wanda with --refit:
its ridge towards the unpruned weights (--refit-percdamp), the calibration size (--nsamples),
the CG polish (--refit-cg), against no refit.

    .venv/bin/python benchmarks/refit_study/refit_study.py --data-dir ../shared/data --out benchmarks/refit_study

Records: OUT/results/NAME.json (resumable), OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py, ablation/grid.py
from ablation.grid import NL_QK, VALIDATION_SETS, run_row  # noqa: E402
from common import machine_line, write_json  # noqa: E402

PROTOCOL = ["--seqlen", "512", "--seed", "0", "--eval", "--eval-seqlen", "512",
            "--eval-datasets", "c4-validation:32,wikipedia-validation:32,lambada-validation:32"]
BASES = {"nonlinear-qk": NL_QK, "sparsegpt": ["--prune-method", "sparsegpt"], "wanda": ["--prune-method", "wanda"]}
VARIANTS = {
    "no-refit": [],
    "refit": ["--refit"],
    "refit-damp0.1": ["--refit", "--refit-percdamp", "0.1"],
    "refit-damp1": ["--refit", "--refit-percdamp", "1.0"],
    "refit-damp10": ["--refit", "--refit-percdamp", "10.0"],
    "refit-cg0": ["--refit", "--refit-cg", "0"],
    "refit-32windows": ["--refit", "--nsamples-override", "32"],
}


def rows(patterns: list[str]) -> dict[str, list[str]]:
    pat = {"50": ["--sparsity-ratio", "0.5"], "2:4": ["--sparsity-type", "2:4"]}
    out = {}
    for p in patterns:
        for base, args in BASES.items():
            for v, extra in VARIANTS.items():
                nsamples = ["--nsamples", "32"] if "--nsamples-override" in extra else ["--nsamples", "8"]
                extra = [x for x in extra if x not in ("--nsamples-override", "32")]
                out[f"{base}-{v}-{p}"] = [*args, *pat[p], *nsamples, *extra]
    return out


def table(out: Path) -> None:
    recs = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    lines = ["SmolLM2-135M, validation sets only (32 x 512 each), geometric mean; seed 0.", "",
             "| row | C4 val | Wiki val | LAMBADA val | val mean | prune s |", "|---|---|---|---|---|---|"]
    rows_ = []
    for r in recs:
        ppl = {k: v["pruned"] for k, v in r["perplexities"].items()}
        mean = math.exp(sum(math.log(ppl[k]) for k in VALIDATION_SETS) / len(VALIDATION_SETS))
        rows_.append({"name": r["row"]["name"], "command": r["row"]["command"], "perplexity": ppl, "validation_mean": mean,
                      "prune_seconds": r["prune_seconds"], "load_average": r["row"]["load_average"]})
    for r in sorted(rows_, key=lambda r: r["name"]):
        p = r["perplexity"]
        lines.append(f"| {r['name']} | {p['c4-validation']:.2f} | {p['wikipedia-validation']:.2f} | "
                     f"{p['lambada-validation']:.2f} | **{r['validation_mean']:.2f}** | {r['prune_seconds']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    write_json(out / "table.json", {"rows": rows_})
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/refit_study")
    ap.add_argument("--patterns", nargs="+", default=["50", "2:4"])
    ap.add_argument("--rows", nargs="*", default=None)
    ap.add_argument("--batch", default=time.strftime("%Y-%m-%d %H:%M"))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.table:
        all_rows = rows(args.patterns)
        todo = all_rows if args.rows is None else {n: all_rows[n] for n in args.rows}
        print(f"{len(todo)} rows on {machine_line()}", flush=True)
        for name, row_args in todo.items():
            path = out / "results" / f"{name.replace(':', 'of')}.json"
            if path.exists():
                continue
            write_json(path, run_row(name, row_args, out, args.data_dir, args.batch, PROTOCOL))
    table(out)


if __name__ == "__main__":
    main()
