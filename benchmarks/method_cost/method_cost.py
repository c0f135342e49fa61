"""Prune time of each method against SparseGPT's, measured side by side (issue 14's cost goal:
the recommended recipe at <= 3x SparseGPT's time).

SmolLM2-135M, cpu protocol (8 x 512 calibration tokens of C4 train, seed 0), pruning only
(results.json's ``prune_seconds``: no model load, evaluation or checkpoint writes). Rounds
alternate the rows (round r runs every row once, in an order rotated by r), all with the same
warm compilation cache, and each row's ratio to SparseGPT is taken within its round; the table
gives the median over rounds.

    .venv/bin/python benchmarks/method_cost/method_cost.py --data-dir ../shared/data --rounds 2 \\
        --output benchmarks/method_cost/method_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import CPU_CALIBRATION, machine_line, prune_run, write_json  # noqa: E402

PROTOCOL = ["--model", "smollm2-135m", *CPU_CALIBRATION]
ROWS = {
    "sparsegpt": ["--prune-method", "sparsegpt"],
    "wanda": ["--prune-method", "wanda"],
    "sparsegpt+refit": ["--prune-method", "sparsegpt", "--refit"],
    "wanda+refit": ["--prune-method", "wanda", "--refit"],
    "nonlinear best": ["--prune-method", "nonlinear", "--recipe", "best"],
    "nonlinear fast": ["--prune-method", "nonlinear", "--recipe", "fast"],
}
PATTERNS = {"50": ["--sparsity-ratio", "0.5"], "2:4": ["--sparsity-type", "2:4"]}


def run(args: list[str], data_dir: str, work: Path) -> dict:
    done = prune_run(args, work / "run", data_dir, log=work / "run.log")
    return {"command": done.command, "prune_seconds": done.record["prune_seconds"],
            "load_average_before": done.load_average[0], "load_average_after": done.load_average[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--patterns", nargs="+", default=["50"], choices=list(PATTERNS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", default="benchmarks/method_cost/method_cost.json")
    args = ap.parse_args()
    rows = ["sparsegpt"] + [r for r in args.rows if r != "sparsegpt"]
    print(f"{len(rows)} rows x {len(args.patterns)} patterns x {args.rounds} rounds on {machine_line()}", flush=True)
    record: dict = {"protocol": PROTOCOL, "rounds": [], "machine": machine_line()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # one untimed run first, so every timed run finds the compilation cache warm
        run([*PROTOCOL, *ROWS["sparsegpt"], *PATTERNS[args.patterns[0]]], args.data_dir, work)
        for r in range(args.rounds):
            order = rows[r % len(rows):] + rows[: r % len(rows)]
            this = {}
            for p in args.patterns:
                for name in order:
                    res = run([*PROTOCOL, *ROWS[name], *PATTERNS[p]], args.data_dir, work)
                    this[f"{name} @ {p}"] = res
                    print(f"round {r}: {name} @ {p}: {res['prune_seconds']:.1f} s (load {res['load_average_before']})",
                          flush=True)
            record["rounds"].append(this)
    table = {}
    for key in record["rounds"][0]:
        p = key.rsplit(" @ ", 1)[1]
        secs = [rd[key]["prune_seconds"] for rd in record["rounds"]]
        ratios = [rd[key]["prune_seconds"] / rd[f"sparsegpt @ {p}"]["prune_seconds"] for rd in record["rounds"]]
        table[key] = {"median_seconds": statistics.median(secs), "median_ratio_to_sparsegpt": statistics.median(ratios),
                      "seconds": secs, "ratios": ratios}
    record["table"] = table
    write_json(Path(args.output), record)
    print("| row | median prune s | x SparseGPT (same round, median) |\n|---|---|---|")
    for key, t in table.items():
        print(f"| {key} | {t['median_seconds']:.1f} | {t['median_ratio_to_sparsegpt']:.2f} |")


if __name__ == "__main__":
    main()
