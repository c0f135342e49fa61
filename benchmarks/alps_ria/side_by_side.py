"""ALPS and RIA in nlprune against their original code, side by side (issue 24).

For each row (method x pattern), one after the other in one session: the original code
(``reference.py``, its own process), ``nlprune prune`` in the originals' order and in its
default true-sequential order (each its own process), all on
SmolLM2-135M under the cpu protocol (8 x 512 C4 train calibration, seed 0; C4 perplexity on
the 128 x 512 test windows, by nlprune's evaluator on both sides). nlprune runs with
``--no-true-sequential``: like both originals, it collects every linear's statistics from the
dense layer, then prunes the layer. Pruning time only on both sides (no model load, no
evaluation). Each row's record is ``results/ROW.json`` (both sides, the masks' agreement, the
load before and after); a row whose record exists is skipped, so the script resumes.

    .venv/bin/python benchmarks/alps_ria/side_by_side.py --alps-repo PATH --ria-repo PATH \\
        --data-dir ../shared/data                       # every row not yet recorded
    .venv/bin/python benchmarks/alps_ria/side_by_side.py --table   # table.md from the records
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import CPU_CALIBRATION, CPU_EVAL, git_state, machine_line, prune_run  # noqa: E402

PATTERNS = {"50": ("unstructured", 0.5), "70": ("unstructured", 0.7), "2of4": ("2:4", None)}
ROWS = [f"{m}-{p}" for m in ("ria", "alps") for p in PATTERNS]
PPL_TOLERANCE = 0.02
TIME_GOAL = 0.5


def pattern_flags(row: str) -> list[str]:
    kind, ratio = PATTERNS[row.split("-", 1)[1]]
    return ["--sparsity-type", kind] + ([] if ratio is None else ["--sparsity-ratio", str(ratio)])


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall seconds."""
    start = datetime.datetime.now()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {proc.returncode}); its output: {log}")
    return (datetime.datetime.now() - start).total_seconds()


def nlprune_masks(run_dir: Path) -> dict[str, np.ndarray]:
    from nlprune import api
    from nlprune.sparsity import linear_name

    model, _ = api.load_run(run_dir)
    return {linear_name(i, name): np.asarray(lin.mask) != 0
            for i, layer in enumerate(model.model.layers) for name, lin in layer.linears().items()}


def reference_masks(path: Path, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    packed = np.load(path)
    return {k: np.unpackbits(packed[k])[: v.size].reshape(v.shape).astype(bool) for k, v in like.items()}


def one_row(row: str, args: argparse.Namespace, work: Path) -> dict:
    method = row.split("-", 1)[0]
    repo = args.alps_repo if method == "alps" else args.ria_repo
    if repo is None:
        raise SystemExit(f"row {row} needs --{method}-repo (a checkout of the original code)")
    ref_cmd = [sys.executable, str(HERE / "reference.py"), "--method", method, "--repo", str(repo),
               *pattern_flags(row), *CPU_CALIBRATION, "--data-dir", args.data_dir, "--masks", str(work / f"{row}.npz"),
               "--output", str(work / f"{row}-ref.json")]
    ours_flags = ["--model", "smollm2-135m", "--prune-method", method, *pattern_flags(row), *CPU_CALIBRATION,
                  "--no-true-sequential", *CPU_EVAL]
    default_flags = [c for c in ours_flags if c != "--no-true-sequential"]
    load = {"before": os.getloadavg()}
    print(f"{row}: the original code ...", flush=True)
    run(ref_cmd, work / f"{row}-ref.log")
    load["between"] = os.getloadavg()
    print(f"{row}: nlprune ...", flush=True)
    ours_run = prune_run(ours_flags, work / row, args.data_dir, log=work / f"{row}.log")
    load["after"] = os.getloadavg()
    print(f"{row}: nlprune in its default order (true-sequential) ...", flush=True)
    default_run = prune_run(default_flags, work / f"{row}-default", args.data_dir, log=work / f"{row}-default.log")
    load["after default"] = os.getloadavg()
    ref = json.loads((work / f"{row}-ref.json").read_text())
    ours, default = ours_run.record, default_run.record
    mine = nlprune_masks(work / row)
    theirs = reference_masks(work / f"{row}.npz", mine)
    differ = sum(int((mine[k] != theirs[k]).sum()) for k in mine) / sum(v.size for v in mine.values())
    ppl_ours = ours["perplexity"]
    return {
        "row": row, "method": method, "pattern": ref["pattern"], "ratio": ref["ratio"],
        "reference": {k: ref[k] for k in ("prune_seconds", "c4_perplexity", "measured_sparsity", "reference_commit",
                                          "adaptations", "torch", "torch_threads", "transformers")},
        "nlprune": {"prune_seconds": ours["prune_seconds"], "c4_perplexity": ppl_ours,
                    "measured_sparsity": ours["sparsity"]["overall"], "options": ours["args"].get("options")},
        "nlprune_default_order": {"prune_seconds": default["prune_seconds"], "c4_perplexity": default["perplexity"],
                                  "time_ratio": default["prune_seconds"] / ref["prune_seconds"],
                                  "perplexity_difference": default["perplexity"] / ref["c4_perplexity"] - 1},
        "perplexity_difference": ppl_ours / ref["c4_perplexity"] - 1,
        "time_ratio": ours["prune_seconds"] / ref["prune_seconds"],
        "masks_differ": differ,
        "commands": {"reference": " ".join(ref_cmd[1:]), "nlprune": ours_run.command,
                     "nlprune_default_order": default_run.command},
        "load_average": load, "machine": machine_line(), "git": git_state(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def spread(row: str, args: argparse.Namespace, work: Path) -> dict:
    """How far last-bit changes move nlprune's result for a row: the same run in the originals'
    order with 4 windows per forward pass instead of 8 (the statistics are the same sums in
    another order, the forwards' GEMMs blocked otherwise), against the batch of 8 (which also
    checks that the row's own nlprune run reproduces)."""
    method = row.split("-", 1)[0]
    runs = {}
    for batch in (8, 4):
        flags = ["--model", "smollm2-135m", "--prune-method", method, *pattern_flags(row), *CPU_CALIBRATION,
                 "--no-true-sequential", "--batch-size", str(batch), *CPU_EVAL]
        print(f"{row}: nlprune, {batch} windows per forward pass ...", flush=True)
        done = prune_run(flags, work / f"{row}-b{batch}", args.data_dir, log=work / f"{row}-b{batch}.log")
        runs[batch] = {"c4_perplexity": done.record["perplexity"], "prune_seconds": done.record["prune_seconds"],
                       "command": done.command}
    base = nlprune_masks(work / f"{row}-b8")
    for batch in (4,):
        other = nlprune_masks(work / f"{row}-b{batch}")
        runs[batch]["masks_differ_from_batch_8"] = (
            sum(int((base[k] != other[k]).sum()) for k in base) / sum(v.size for v in base.values()))
        runs[batch]["perplexity_difference_from_batch_8"] = runs[batch]["c4_perplexity"] / runs[8]["c4_perplexity"] - 1
    return {"row": row, "what": "nlprune's own spread under last-bit changes (windows per forward pass)",
            "runs": {str(k): v for k, v in runs.items()}, "load_average_end": os.getloadavg(),
            "machine": machine_line(), "git": git_state(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def table(out: Path) -> str:
    lines = [
        "SmolLM2-135M, cpu protocol (8 x 512 C4 train calibration, seed 0; C4 perplexity on 128 x 512 test "
        "windows, nlprune's evaluator on both sides). Each row: the original code, then `nlprune prune "
        "--no-true-sequential` (the originals' order: every linear's statistics from the dense layer, two "
        "forward passes per layer), then nlprune in its default true-sequential order (one forward pass per "
        "layer; other masks), one after the other; prune seconds are pruning only.", "",
        "| row | original ppl | nlprune ppl | difference | masks differ | original s | nlprune s | ratio | "
        "default order: ppl, s, ratio | load (before, between, after) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        path = out / "results" / f"{row}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        d = r["nlprune_default_order"]
        load = ", ".join(f"{r['load_average'][k][0]:.1f}" for k in ("before", "between", "after"))
        lines.append(
            f"| {row} | {r['reference']['c4_perplexity']:.2f} | {r['nlprune']['c4_perplexity']:.2f} | "
            f"{100 * r['perplexity_difference']:+.2f}% | {100 * r['masks_differ']:.2f}% | "
            f"{r['reference']['prune_seconds']:.1f} | {r['nlprune']['prune_seconds']:.1f} | {r['time_ratio']:.2f} | "
            f"{d['c4_perplexity']:.2f}, {d['prune_seconds']:.1f}, {d['time_ratio']:.2f} | {load} |"
        )
    spreads = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*-spread.json"))]
    if spreads:
        lines += ["", "nlprune's own spread (the originals' order, 4 windows per forward pass instead of 8: "
                  "the same sums in another order):", "",
                  "| row | batch 8 ppl | batch 4 ppl | difference | masks differ |", "|---|---|---|---|---|"]
        for sp in spreads:
            r = sp["runs"]
            lines.append(f"| {sp['row']} | {r['8']['c4_perplexity']:.2f} | {r['4']['c4_perplexity']:.2f} | "
                         f"{100 * r['4']['perplexity_difference_from_batch_8']:+.2f}% | "
                         f"{100 * r['4']['masks_differ_from_batch_8']:.2f}% |")
    lines += ["", f"Goals: perplexity within {100 * PPL_TOLERANCE:.0f}% of the original's, prune time at most "
              f"{TIME_GOAL}x. Commands and adaptations: results/ROW.json."]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def run_rows(args: argparse.Namespace, rows: list[str], suffix: str, measure) -> None:
    """``measure(row, args, work)`` for each row without a record results/ROW{suffix}.json (resumable)."""
    if not args.data_dir:
        raise SystemExit("--data-dir (or NLPRUNE_DATA_DIR) is needed: the local C4 files")
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        for row in rows:
            path = args.out / "results" / f"{row}{suffix}.json"
            if path.exists():
                print(f"{row}: recorded ({path}), skipped")
                continue
            record = measure(row, args, Path(tmp))
            path.write_text(json.dumps(record, indent=2, default=str) + "\n")
            print(f"{row}: recorded ({path})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alps-repo", type=Path, help="checkout of github.com/mazumder-lab/ALPS")
    p.add_argument("--ria-repo", type=Path,
                   help="checkout of github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning")
    p.add_argument("--data-dir", default=os.environ.get("NLPRUNE_DATA_DIR"))
    p.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--table", action="store_true", help="only write table.md from the records")
    p.add_argument("--spread", nargs="+", choices=ROWS, default=[],
                   help="instead: nlprune's own spread on these rows under last-bit changes (results/ROW-spread.json)")
    args = p.parse_args(argv)
    if args.spread:
        run_rows(args, args.spread, "-spread", spread)
    elif not args.table:
        run_rows(args, args.rows, "", one_row)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
