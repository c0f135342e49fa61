"""The paper protocol on a GPU: Llama 3.2-1B, every method, 8 x 2048 calibration tokens,
128 x 2048 C4 evaluation tokens (METHOD.md section 5), at 50% unstructured and 2:4.

    .venv/bin/python benchmarks/gpu_paper/gpu_paper_protocol.py --dry-run                        # plan it, run nothing
    .venv/bin/python benchmarks/gpu_paper/gpu_paper_protocol.py --data-dir ../shared/data \\
        --model /path/to/Llama-3.2-1B                                                  # run it (or the hub)
    .venv/bin/python benchmarks/gpu_paper/gpu_paper_protocol.py --data-dir ../shared/data \\
        --random-weights 0 --eval-nsamples 8                                            # a functional check

Methods: magnitude, Wanda, SparseGPT, the non-linear method's paper recipe and its recommended
`--recipe best`. Each row is one `nlprune prune ... --eval` process (common.prune_run; the same
command as on a CPU; JAX picks the GPU, --mesh defaults to every device on 'data'); the dense
perplexity is each run's `dense_perplexity` (same windows). Writes OUT/results.json (every run's
record, the device, the times) and OUT/table.md, the table for BENCHMARKS.md.

--dry-run needs no weights, data or GPU: it checks that every command parses, and prints for
each method `nlprune plan`'s memory per device, stage by stage, for the model's config (the
card's for a card name), against --device-memory-gib, with the options that lower the peak.
--random-weights SEED prunes seeded random weights of the model's exact config (no hub): a
check that every step runs and fits, whose perplexities mean nothing.

JAX needs its CUDA plugin for the GPU: `pip install "jax[cuda12]==$(python -c 'import jax;
print(jax.__version__)')"` in .venv. Without a GPU the script stops (--allow-cpu runs it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import prune_run  # noqa: E402

PATTERNS = ("unstructured", "2:4")
# (row name, method, extra flags): the paper's recipe for nonlinear, and the recommended one
METHODS = [
    ("magnitude", "magnitude", []),
    ("wanda", "wanda", []),
    ("sparsegpt", "sparsegpt", []),
    ("nonlinear (paper recipe)", "nonlinear", ["--recipe", "paper"]),
    ("nonlinear --recipe best", "nonlinear", ["--recipe", "best"]),
]
NSAMPLES, SEQLEN = 8, 2048  # the paper's calibration


def folder_name(name: str, pattern: str) -> str:
    return name.replace(" (paper recipe)", "-paper").replace(" --recipe ", "-").replace(" ", "-") + \
        "-" + pattern.replace(":", "of")


def shared_flags(method: str, pattern: str, extra: list[str], args) -> list[str]:
    """What the prune and its plan share: model, method, pattern, calibration size, mesh."""
    flags = ["--model", args.model, "--prune-method", method, "--sparsity-type", pattern,
             "--sparsity-ratio", "0.5", "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), *extra]
    return flags + (["--mesh", args.mesh] if args.mesh else [])


def prune_flags(method: str, pattern: str, extra: list[str], args) -> list[str]:
    """A row's `nlprune prune` flags (common.prune_run adds --data-dir, --output and --overwrite)."""
    return [
        *shared_flags(method, pattern, extra, args), "--seed", str(args.seed),
        *(["--random-weights", str(args.random_weights)] if args.random_weights is not None else []),
        "--eval", "--eval-nsamples", str(args.eval_nsamples), "--eval-seqlen", str(SEQLEN),
    ]


def device_memory_gib(args) -> tuple[float, str]:
    if args.device_memory_gib is not None:
        return args.device_memory_gib, "--device-memory-gib"
    if not args.dry_run or args.allow_cpu:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] / 2**30, str(jax.devices()[0])
    return 80.0, "an 80 GiB GPU (default; --device-memory-gib to change)"


def dry_run(args, selected) -> None:
    from nlprune.cli import build_parser
    from nlprune.cli import main as cli_main

    limit, where = device_memory_gib(args)
    print(f"dry run: the paper protocol for {args.model} ({NSAMPLES} x {SEQLEN} calibration, "
          f"{args.eval_nsamples} x {SEQLEN} evaluation), planned against {limit:.0f} GiB ({where})\n")
    verdicts = []
    for name, method, extra in selected:
        for pattern in args.patterns:
            flags = prune_flags(method, pattern, extra, args)
            folder = Path(args.out) / "runs" / folder_name(name, pattern)
            # exits with argparse's message if a flag is wrong
            build_parser().parse_args(["prune", *flags, *(["--data-dir", args.data_dir] if args.data_dir else []),
                                       "--output", str(folder), "--overwrite"])
            print(f"$ nlprune prune {shlex.join(flags)}   (--output {folder})")
        # the plan does not depend on the pattern on one device: one table per method
        plan_json = Path(args.out) / "plans" / f"{folder_name(name, args.patterns[0])}.json"
        plan_json.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            rc = cli_main(["plan", *shared_flags(method, args.patterns[0], extra, args), "--output", str(plan_json)])
        if rc:
            sys.exit(f"nlprune plan failed for {name} (rc {rc})")
        print("\n".join(line for line in text.getvalue().splitlines() if not line.startswith("wrote ")))
        peak = json.loads(plan_json.read_text())["peak_bytes"] / 2**30
        fits = "fits" if peak <= limit else "DOES NOT FIT"
        verdicts.append(f"  {name:<26} {peak:6.2f} GiB per device: {fits} in {limit:.0f} GiB")
        print()
    print("planned peaks:\n" + "\n".join(verdicts))
    print(f"dry run: {len(selected) * len(args.patterns)} commands parse; plans in {Path(args.out) / 'plans'}; "
          "nothing was run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b", help="card name or local Hugging Face folder")
    ap.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                    help="seeded random weights of --model's config (functional check, no hub)")
    ap.add_argument("--data-dir", default=None, help="C4 shards (needed unless --dry-run)")
    ap.add_argument("--out", default="benchmarks/gpu_paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mesh", default=None, help="passed to every prune and plan (default: one device per plan)")
    ap.add_argument("--methods", nargs="*", default=None, help="row names to run (default: all)")
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS), choices=PATTERNS)
    ap.add_argument("--eval-nsamples", type=int, default=128)
    ap.add_argument("--device-memory-gib", type=float, default=None,
                    help="memory per device to plan against (default: the GPU's, else 80)")
    ap.add_argument("--dry-run", action="store_true", help="check the commands and print their plans, run nothing")
    ap.add_argument("--allow-cpu", action="store_true", help="run even where JAX finds no GPU")
    args = ap.parse_args()
    selected = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    unknown = set(args.methods or ()) - {m[0] for m in METHODS}
    if unknown:
        ap.error(f"unknown --methods {sorted(unknown)}; choose from {[m[0] for m in METHODS]}")
    if args.dry_run:
        dry_run(args, selected)
        return
    if not args.data_dir:
        ap.error("--data-dir is needed to run (or --dry-run)")
    if not args.allow_cpu:
        import jax

        if jax.default_backend() != "gpu":
            sys.exit(f"JAX finds no GPU here (backend {jax.default_backend()!r}): install its CUDA plugin "
                     "(see this script's docstring), or pass --allow-cpu")
    out = Path(args.out)
    rows = []
    for name, method, extra in selected:
        for pattern in args.patterns:
            flags = prune_flags(method, pattern, extra, args)
            print(f"$ nlprune prune {shlex.join(flags)}", flush=True)
            done = prune_run(flags, out / "runs" / folder_name(name, pattern), args.data_dir)
            rows.append({"row": name, "pattern": pattern, "command": done.command,
                         "process_seconds": done.wall_seconds, "record": done.record})
    first = rows[0]["record"]
    model = first["model"]
    what = model["name"] + (f", random weights (seed {model['random_weights']['seed']}): perplexities "
                            "mean nothing" if model.get("random_weights") else "")
    lines = [
        f"Paper protocol on {first['machine']['devices']}: {what}; C4, {NSAMPLES} x {SEQLEN} calibration, "
        f"{args.eval_nsamples} x {SEQLEN} evaluation, seed {args.seed}.",
        "",
        "| method | sparsity | C4 ppl | prune s | process s | peak RSS GiB |",
        "|---|---|---|---|---|---|",
        f"| dense | 0 | {first['dense_perplexity']:.2f} | - | - | - |",
    ]
    for r in rows:
        rec = r["record"]
        lines.append(f"| {r['row']} | {r['pattern']} | {rec['perplexity']:.2f} | {rec['prune_seconds']:.1f} | "
                     f"{r['process_seconds']:.1f} | {rec['peak_rss_bytes'] / 2**30:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"protocol": "paper", "host": os.uname().nodename, "rows": rows},
                                                 indent=2, default=str) + "\n")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
