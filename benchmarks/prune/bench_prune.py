"""The SmolLM2-135M pruning table: every method at 50% unstructured and 2:4, cpu protocol.

    .venv/bin/python benchmarks/prune/bench_prune.py --data-dir ../shared/data --out benchmarks/prune

Each row is one `nlprune prune ... --eval` process (common.prune_run: its peak memory is its
own), its command in the table (as typed, less the --data-dir, --output and --overwrite every
row adds); each run's folder is OUT/runs/NAME (git-ignored: it
holds the checkpoint) and its results.json is copied to OUT/results/NAME.json (a --table TABLE
batch: OUT/results/TABLE/NAME.json). Writes
OUT/table.md, OUT/table.json and OUT/perplexity.png (--table NAME: NAME.md, NAME.json, NAME.png).
Rows may carry their own flags: --rows 'nonlinear@2:4@--straight-through --refit'. Each row records
the 1-minute load average before and after it: compare times only within one batch.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import prune_run  # noqa: E402

DEFAULT_ROWS = [
    (method, pattern, *flags)
    for pattern in ("unstructured", "2:4")
    for method, *flags in (("magnitude",), ("wanda",), ("sparsegpt",), ("nonlinear",), ("nonlinear", "--recipe best"))
]


def results_dir(args) -> Path:
    return Path(args.out) / "results" / ("" if args.table == "table" else args.table)


def run_row(method: str, pattern: str, args, extra: list[str]) -> tuple[str, dict]:
    name = f"{method}-{pattern.replace(':', 'of')}" + ("-" + "-".join(e.strip("-") for e in extra) if extra else "")
    flags = [
        "--model", args.model, "--prune-method", method, "--sparsity-type", pattern, "--sparsity-ratio", "0.5",
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
        "--eval", "--eval-nsamples", str(args.eval_nsamples), "--eval-seqlen", str(args.eval_seqlen), *extra,
    ]
    print("$ nlprune prune", shlex.join(flags), flush=True)
    done = prune_run(flags, Path(args.out) / "runs" / name, args.data_dir)
    record = done.record
    # timings are only comparable on an equally loaded machine: keep the 1-minute load average
    record["load_average"] = list(done.load_average)
    # The run folders hold checkpoints (hundreds of MB, git-ignored); keep each record beside the
    # table, a --table batch's in its own folder so that batches rerunning a row do not clobber it.
    results = results_dir(args)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return done.command, record


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/prune")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-nsamples", type=int, default=128)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="*", default=None,
                    help="METHOD@PATTERN[@EXTRA FLAGS], e.g. wanda@2:4, 'nonlinear@unstructured@--straight-through'")
    ap.add_argument("--table", default="table", help="basename of the table files written in OUT (table.md/.json, .png)")
    ap.add_argument("--extra", action="append", default=[], help="METHOD=FLAGS: extra flags for a method")
    args = ap.parse_args()

    rows = DEFAULT_ROWS if not args.rows else [tuple(r.split("@", 2)) for r in args.rows]
    extras = {}
    for e in args.extra:
        method, flags = e.split("=", 1)
        extras[method] = shlex.split(flags)
    results = []
    for method, pattern, *row_flags in rows:
        flags = shlex.split(row_flags[0]) if row_flags else extras.get(method, [])
        cmd, rec = run_row(method, pattern, args, flags)
        results.append({"command": cmd, "method": method, "pattern": pattern, "flags": shlex.join(flags), "record": rec})

    dense = results[0]["record"]["dense_perplexity"]
    lines = [
        "| method | flags | sparsity | C4 ppl | sparsity measured | attention error | prune s | x SparseGPT time "
        "| peak RSS GiB | load | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | 0 | {dense:.2f} | 0 | 0 | - | - | - | - | (each run's `dense_perplexity`) |",
    ]
    sgpt = {r["pattern"]: r["record"]["prune_seconds"] for r in results if r["method"] == "sparsegpt" and not r["flags"]}
    for r in results:
        rec = r["record"]
        ratio = f"{rec['prune_seconds'] / sgpt[r['pattern']]:.2f}" if r["pattern"] in sgpt else "-"
        load = "-".join(f"{x:.1f}" for x in rec["load_average"])
        lines.append(
            f"| {r['method']} | {r['flags']} | {r['pattern']} | {rec['perplexity']:.2f} | {rec['sparsity']['overall']:.4f} | "
            f"{rec['attention_error']['mean']:.2e} | {rec['prune_seconds']:.1f} | {ratio} | "
            f"{rec['peak_rss_bytes'] / 2**30:.2f} | {load} | `{r['command']}` |"
        )
    out = Path(args.out)
    (out / f"{args.table}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.table}.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "record"} | {
            "perplexity": r["record"]["perplexity"], "dense_perplexity": r["record"]["dense_perplexity"],
            "sparsity": r["record"]["sparsity"]["overall"], "prune_seconds": r["record"]["prune_seconds"],
            "attention_error": r["record"]["attention_error"]["mean"], "peak_rss_bytes": r["record"]["peak_rss_bytes"],
            "load_average": r["record"]["load_average"], "machine": r["record"]["machine"]} for r in results], indent=2) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(8, 4))
    patterns = sorted({r["pattern"] for r in results}, key=lambda p: p != "unstructured")
    label = lambda r: r["method"] + ("\n" + r["flags"].replace("--", "") if r["flags"] else "")  # noqa: E731
    methods = list(dict.fromkeys(label(r) for r in results))
    width = 0.8 / len(patterns)
    for j, pat in enumerate(patterns):
        vals = [next((r["record"]["perplexity"] for r in results if label(r) == m and r["pattern"] == pat), float("nan")) for m in methods]
        bars = ax.bar([i + j * width for i in range(len(methods))], vals, width, label=f"50% {pat}")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.1f}")
    ax.set_xticks([i + width * (len(patterns) - 1) / 2 for i in range(len(methods))], methods)
    ax.set_yscale("log")
    ax.set_ylabel(f"C4 perplexity ({args.eval_nsamples} x {args.eval_seqlen})")
    ax.set_title(f"{args.model}: calibration {args.nsamples} x {args.seqlen}, seed {args.seed}")
    ax.legend()
    fig.tight_layout()
    png = "perplexity.png" if args.table == "table" else f"{args.table}.png"
    fig.savefig(out / png, dpi=120)
    print(f"wrote {out}/{args.table}.md, {args.table}.json, {png}")


if __name__ == "__main__":
    main()
