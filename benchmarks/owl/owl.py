"""OWL's layer-wise sparsity against uniform sparsity, Wanda and SparseGPT on SmolLM2-135M.

Each row prunes SmolLM2-135M (cpu protocol: 8 x 512 C4 calibration windows, seed 0) with a
method at a ratio, uniform or with ``--sparsity-profile owl`` (M = 5, lambda = 0.08), then
measures C4 perplexity (128 x 512 validation windows) and the eight zero-shot tasks on the
first ``--limit`` examples of each (a subset). One extra row scores the dense model's tasks.
The record is rewritten after every row, and a rerun skips the rows it already holds, so an
interrupted run resumes:

    nice -n 10 .venv/bin/python benchmarks/owl/owl.py --data-dir ../shared/data --output benchmarks/owl/owl.json

A row is the same as the command line's

    nlprune prune --model smollm2-135m --prune-method wanda --sparsity-ratio 0.7 --sparsity-profile owl \\
        --nsamples 8 --seqlen 512 --eval --tasks boolq,rte,hellaswag,winogrande,arc_easy,openbookqa,piqa,lambada_openai \\
        --limit 100 --data-dir ../shared/data --output runs/owl-wanda-70
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import git_state, write_json  # noqa: E402

ROWS = [  # the 70% rows first: OWL's paper reports its gain mostly at high sparsity
    (method, ratio, profile)
    for ratio in (0.7, 0.5)
    for method in ("wanda", "sparsegpt")
    for profile in ("uniform", "owl")
]


def row_key(method: str, ratio: float, profile: str) -> str:
    return f"{method}-{round(ratio * 100)}-{profile}"


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from a prune's results record."""
    zs = record["zero_shot"]
    sparsity = record["sparsity"]
    return {
        "perplexity": record["perplexity"], "dense_perplexity": record["dense_perplexity"],
        "sparsity": sparsity["overall"], "per_layer": sparsity["per_layer"], "planned": sparsity["planned"],
        "mean_acc": zs["mean_acc"], "mean_acc_stderr": zs["mean_acc_stderr"],
        "tasks": {k: {m: v for m, v in e.items() if m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "examples", "subset")}
                  for k, e in zs["tasks"].items()},
        "prune_seconds": record["prune_seconds"], "eval": record["eval"], "calibration_files": record["calibration"]["files"],
        "zero_shot_seconds": zs["seconds"],
    }


def table(record: dict[str, Any]) -> str:
    """The record as a markdown table (what BENCHMARKS.md shows)."""
    rows, limit = record["rows"], record["protocol"]["limit"]
    lines = [
        f"| method | target | profile | C4 perplexity | mean acc, 8 tasks (first {limit} each: a subset) | "
        "sparsity measured | layers min-max | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if "dense" in rows:
        d = rows["dense"]
        dense_ppl = next((r["dense_perplexity"] for k, r in rows.items() if k != "dense"), None)
        ppl = f"{dense_ppl:.2f}" if dense_ppl is not None else "-"
        lines.append(f"| dense | - | - | {ppl} | {d['mean_acc']:.4f} ± {d['mean_acc_stderr']:.4f} | 0 | - | - |")
    for method, ratio, profile in ROWS:
        r = rows.get(row_key(method, ratio, profile))
        if r is None:
            lines.append(f"| {method} | {ratio:.0%} | {profile} | (not run) | | | | |")
            continue
        layers = f"{min(r['per_layer']):.4f}-{max(r['per_layer']):.4f}"
        lines.append(
            f"| {method} | {ratio:.0%} | {profile} | {r['perplexity']:.2f} | {r['mean_acc']:.4f} ± {r['mean_acc_stderr']:.4f} "
            f"| {r['sparsity']:.6f} | {layers} | {r['prune_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default="benchmarks/owl/owl.json")
    parser.add_argument("--limit", type=int, default=100, help="examples per task (a subset)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-nsamples", type=int, default=128)
    parser.add_argument("--rows", default=None, help="comma-separated row keys to run (default: all), e.g. wanda-70-owl")
    parser.add_argument("--table", action="store_true", help="print the record's table and run nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.output).read_text())))
        return

    from nlprune import api
    from nlprune.eval.tasks import DEFAULT_TASKS

    out = Path(args.output)
    record: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    protocol = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                "eval_nsamples": args.eval_nsamples, "eval_seqlen": 512, "tasks": list(DEFAULT_TASKS),
                "limit": args.limit, "owl_m": 5.0, "owl_lambda": 0.08}
    if record.get("protocol", protocol) != protocol:
        raise SystemExit(f"{out} holds rows of another protocol ({record['protocol']}); write elsewhere.")
    record["protocol"] = protocol
    rows = record.setdefault("rows", {})
    code = git_state()  # the code this process loaded (rows record it, not the tree at their end)
    wanted = None if args.rows is None else set(args.rows.split(","))
    loaded = api.load(args.model)

    if "dense" not in rows and (wanted is None or "dense" in wanted):
        start = time.perf_counter()
        zs = api.evaluate_tasks(loaded, DEFAULT_TASKS, data_dir=args.data_dir, limit=args.limit)
        rows["dense"] = {"mean_acc": zs["mean_acc"], "mean_acc_stderr": zs["mean_acc_stderr"],
                         "tasks": {k: {m: v for m, v in e.items() if m in ("acc", "acc_stderr", "acc_norm", "examples", "subset")}
                                   for k, e in zs["tasks"].items()},
                         "seconds": time.perf_counter() - start, "git": code}
        write_json(out, record)
    for method, ratio, profile in ROWS:
        key = row_key(method, ratio, profile)
        if key in rows or (wanted is not None and key not in wanted):
            continue
        print(f"--- {key}", flush=True)
        _, result = api.prune(
            loaded, method, ratio, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, data_dir=args.data_dir,
            do_eval=True, eval_nsamples=args.eval_nsamples, eval_seqlen=512, attention_windows=0,
            sparsity_profile=profile, tasks=DEFAULT_TASKS, limit=args.limit,
        )
        rows[key] = {"method": method, "ratio": ratio, "profile": profile, **summary(result),
                     "git": code, "load_average": list(os.getloadavg())}
        record.pop("git", None), record.pop("load_average_end", None)  # refreshed by write_json
        write_json(out, record)
        r = rows[key]
        print(f"{key}: perplexity {r['perplexity']:.2f}, mean acc {r['mean_acc']:.4f}, sparsity {r['sparsity']:.6f}",
              flush=True)


if __name__ == "__main__":
    main()
