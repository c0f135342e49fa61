"""The paper protocol on a GPU: SmolLM2-135M, every method, 8 x 2048 calibration tokens,
128 x 2048 C4 evaluation tokens (METHOD.md section 5), at 50% unstructured and 2:4.

    .venv/bin/python benchmarks/gpu_paper_protocol.py --data-dir ../shared/data            # run it
    .venv/bin/python benchmarks/gpu_paper_protocol.py --data-dir ../shared/data --dry-run  # check it

Each row is one `nlprune prune ... --eval` process (the same command as on a CPU; JAX picks
the GPU, --mesh defaults to every device on 'data'); the dense perplexity is each run's
`dense_perplexity` (same windows). Writes OUT/results.json (every run's record, the device,
the times) and OUT/table.md, the table for BENCHMARKS.md. --dry-run checks that every command
parses, prints it with its planned peak memory per device (`nlprune plan`), and runs nothing.

JAX needs its CUDA plugin for the GPU: `pip install "jax[cuda12]==$(python -c 'import jax;
print(jax.__version__)')"` in .venv. Without a GPU the script stops (--allow-cpu runs it anyway).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

PATTERNS = ("unstructured", "2:4")
# (row name, method, extra flags): the paper's recipe for nonlinear, and its straight-through variant
METHODS = [
    ("magnitude", "magnitude", []),
    ("wanda", "wanda", []),
    ("sparsegpt", "sparsegpt", []),
    ("nonlinear (paper recipe)", "nonlinear", []),
    ("nonlinear --straight-through", "nonlinear", ["--straight-through"]),
]


def command(method: str, pattern: str, extra: list[str], args, out: Path) -> list[str]:
    return [
        "nlprune", "prune", "--model", args.model, "--prune-method", method, "--sparsity-type", pattern,
        "--sparsity-ratio", "0.5", "--nsamples", "8", "--seqlen", "2048", "--seed", str(args.seed),
        "--eval", "--eval-nsamples", "128", "--eval-seqlen", "2048", "--data-dir", args.data_dir,
        "--output", str(out), "--overwrite", *extra,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/gpu_paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="check and print the commands, run nothing")
    ap.add_argument("--allow-cpu", action="store_true", help="run even where JAX finds no GPU")
    args = ap.parse_args()
    if not args.dry_run and not args.allow_cpu:
        import jax

        if jax.default_backend() != "gpu":
            sys.exit(f"JAX finds no GPU here (backend {jax.default_backend()!r}): install its CUDA plugin "
                     "(see this script's docstring), or pass --allow-cpu")
    out = Path(args.out)
    exe = Path(sys.executable).with_name("nlprune")
    rows = []
    for name, method, extra in METHODS:
        for pattern in PATTERNS:
            folder = out / "runs" / f"{name.split()[0]}{'-ste' if extra else ''}-{pattern.replace(':', 'of')}"
            cmd = command(method, pattern, extra, args, folder)
            if args.dry_run:
                from nlprune.cli import build_parser

                build_parser().parse_args(cmd[1:])  # exits with argparse's message if a flag is wrong
                plan = subprocess.run(
                    [str(exe), "plan", "--model", args.model, "--prune-method", method, "--nsamples", "8",
                     "--seqlen", "2048"], capture_output=True, text=True, check=True,
                ).stdout.splitlines()[1]
                print(f"$ {shlex.join(cmd)}\n    {plan}")
                continue
            print(f"$ {shlex.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            subprocess.run([str(exe), *cmd[1:]], check=True)
            rec = json.loads((folder / "results.json").read_text())
            rows.append({"row": name, "pattern": pattern, "command": shlex.join(cmd),
                         "process_seconds": time.perf_counter() - t0, "record": rec})
    if args.dry_run:
        print(f"dry run: {len(METHODS) * len(PATTERNS)} commands parse; nothing was run")
        return
    first = rows[0]["record"]
    lines = [
        f"Paper protocol on {first['machine']['devices']}: SmolLM2-135M, C4, 8 x 2048 calibration, "
        "128 x 2048 evaluation, seed 0.",
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
