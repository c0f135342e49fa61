"""Zero-shot accuracy of the main table's methods on SmolLM2-135M: the eight tasks on a subset.

Each row prunes SmolLM2-135M with the cpu protocol (8 x 512 C4-train calibration windows,
seed 0) exactly as the ablation's row of the same name (benchmarks/ablation/grid.py), then scores
the pruned run with lm-evaluation-harness on the first ``--limit`` examples of each of
boolq, rte, hellaswag, winogrande, arc_easy, openbookqa, piqa and lambada_openai (a subset:
the record and the table say so). Two command lines per row, both in the record (the prune
run by common.prune_run, recorded as typed less its --data-dir, --output and --overwrite):

    nlprune prune --model smollm2-135m <the row's flags> --nsamples 8 --seqlen 512 --seed 0 \\
        --data-dir ../shared/data --output benchmarks/tasks/runs/<row>
    nlprune eval --run benchmarks/tasks/runs/<row> --tasks <the eight> --limit 250 \\
        --data-dir ../shared/data --output benchmarks/tasks/runs/<row>/tasks.json

The record is rewritten after every row and a rerun skips the rows it holds (rows recorded
before each example's outcome was kept are scored again, the earlier scores kept under
``previous``), so an interrupted run resumes. ``--table`` also pairs rows on the same
examples (``nlprune compare-tasks``: paired differences, McNemar) into TABLE_paired.json:

    nice -n 10 .venv/bin/python benchmarks/tasks/task_table.py --data-dir ../shared/data
    .venv/bin/python benchmarks/tasks/task_table.py --table     # the markdown table BENCHMARKS.md shows, and the plot
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py, ablation/grid.py
from ablation.grid import rows as ablation_rows  # noqa: E402
from common import CPU_CALIBRATION, git_state, prune_run, write_json  # noqa: E402

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "openbookqa", "piqa", "lambada_openai")
# (row key, ablation row, what it is). The recommended recipe of each pattern, then the
# plain baselines and the non-linear method with refit (--recipe best).
ROWS = [
    ("recommended-50", "wanda+refit-damp1-50", "Wanda --refit --refit-percdamp 1.0 (recommended at 50%)"),
    ("wanda-50", "wanda-50", "Wanda"),
    ("sparsegpt-50", "sparsegpt-50", "SparseGPT"),
    ("nonlinear-best-50", "nonlinear-qk+refit-50", "non-linear q/k + refit (--recipe best)"),
    ("dense", None, "dense"),
    ("recommended-2:4", "sparsegpt+refit-2:4", "SparseGPT --refit (recommended at 2:4)"),
    ("wanda-2:4", "wanda-2:4", "Wanda"),
    ("sparsegpt-2:4", "sparsegpt-2:4", "SparseGPT"),
    ("nonlinear-best-2:4", "nonlinear-qk+refit-2:4", "non-linear q/k + refit (--recipe best)"),
]


def run(args: list[str]) -> float:
    """Run `nlprune ARGS` in a fresh process; its wall seconds."""
    print("$ nlprune", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nlprune.cli", *args], check=True)
    return time.perf_counter() - start


def summary(zs: dict[str, Any]) -> dict[str, Any]:
    # the per-example outcomes and the files' hashes let --table pair two rows (compare-tasks)
    keep = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "examples", "subset", "files", "examples_correct")
    return {"mean_acc": zs["mean_acc"], "mean_acc_stderr": zs["mean_acc_stderr"], "seconds": zs["seconds"],
            "tasks": {k: {m: v for m, v in e.items() if m in keep} for k, e in zs["tasks"].items()}}


def table(record: dict[str, Any]) -> str:
    rows, limit = record["rows"], record["protocol"]["limit"]
    head = " | ".join(t.replace("_openai", "") for t in TASKS)
    lines = [
        f"| pattern | method | {head} | mean ± s.e. | mean without boolq | tasks s | prune s |",
        "|---|---|" + "---|" * (len(TASKS) + 4),
    ]
    for key, _, label in ROWS:
        r = rows.get(key)
        pattern = "-" if key == "dense" else ("50%" if key.endswith("-50") else "2:4")
        if r is None:
            lines.append(f"| {pattern} | {label} | " + " | " * len(TASKS) + "(not run) | | |")
            continue
        accs = " | ".join(f"{r['tasks'][t]['acc']:.3f}" for t in TASKS)
        prune_s = "-" if r.get("prune_seconds") is None else f"{r['prune_seconds']:.0f}"
        rest = [t for t in TASKS if t != "boolq"]
        m7 = sum(r["tasks"][t]["acc"] for t in rest) / len(rest)
        se7 = math.sqrt(sum(r["tasks"][t]["acc_stderr"] ** 2 for t in rest)) / len(rest)
        lines.append(f"| {pattern} | {label} | {accs} | {r['mean_acc']:.4f} ± {r['mean_acc_stderr']:.4f} "
                     f"| {m7:.4f} ± {se7:.4f} | {r['seconds']:.0f} | {prune_s} |")
    lines.append(f"\nFirst {limit} examples of each task (a subset; lm-eval's acc, standard errors in the record). "
                 "The mean without boolq is shown too: boolq's first 250 examples are 62.4% 'yes', the dense "
                 "model scores 0.416 (below answering 'yes' always) and pruned rows 0.40-0.63, so boolq moves "
                 "with the yes/no tilt pruning gives the model, not with its reading.")
    return "\n".join(lines)


# Paired comparisons the table reports: the recommended recipe of each pattern against the
# other rows of that pattern, and every pruned row against the dense model.
PAIRS = [("recommended-50", "wanda-50"), ("recommended-50", "sparsegpt-50"), ("recommended-50", "nonlinear-best-50"),
         ("nonlinear-best-50", "wanda-50"), ("sparsegpt-50", "wanda-50"),
         ("recommended-2:4", "wanda-2:4"), ("recommended-2:4", "sparsegpt-2:4"),
         ("recommended-2:4", "nonlinear-best-2:4")]


def paired_table(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Each pair's mean difference (A - B) with its paired s.e. and p, and the tasks whose McNemar
    p is below 0.05; pairs whose rows were recorded without per-example outcomes are listed as such."""
    from nlprune.eval.tasks.paired import compare

    rows = record["rows"]
    pairs = PAIRS + [(k, "dense") for k, _, _ in ROWS if k != "dense"]
    lines = ["| A | B | mean acc A - B ± paired s.e. | p (normal) | tasks with McNemar p < 0.05 (A - B) |",
             "|---|---|---|---|---|"]
    results = {}
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        if not all("examples_correct" in t for k in (a, b) for t in rows[k]["tasks"].values()):
            lines.append(f"| {a} | {b} | (recorded without per-example outcomes) | | |")
            continue
        res = compare(rows[a], rows[b])
        results[f"{a} vs {b}"] = res
        sig = ", ".join(f"{t.replace('_openai', '')} {r['difference']:+.3f} (p {r['mcnemar_p']:.3f})"
                        for t, r in res["tasks"].items() if r["mcnemar_p"] < 0.05) or "none"
        lines.append(f"| {a} | {b} | {res['mean_difference']:+.4f} ± {res['mean_difference_stderr']:.4f} "
                     f"| {res['mean_p']:.3f} | {sig} |")
    return "\n".join(lines), results


def plot(record: dict[str, Any], path: Path) -> None:
    """Per-task accuracy of each row, one panel per pattern, the dense model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = record["rows"]
    dense = rows.get("dense")
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, suffix, title in ((axes[0], "-50", "50% unstructured"), (axes[1], "-2:4", "2:4")):
        keys = [k for k, _, _ in ROWS if k.endswith(suffix) and k in rows]
        x = np.arange(len(TASKS) + 1)
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            r = rows[key]
            acc = [r["tasks"][t]["acc"] for t in TASKS] + [r["mean_acc"]]
            err = [r["tasks"][t]["acc_stderr"] for t in TASKS] + [r["mean_acc_stderr"]]
            label = next(lab for k, _, lab in ROWS if k == key)
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, acc, width, yerr=err, capsize=2, label=label)
        if dense is not None:
            d = [dense["tasks"][t]["acc"] for t in TASKS] + [dense["mean_acc"]]
            ax.scatter(x, d, marker="_", s=400, color="black", zorder=3, label="dense")
        ax.set_xticks(x, [t.replace("_openai", "") for t in TASKS] + ["mean"], rotation=30)
        ax.set_title(f"SmolLM2-135M, {title}")
        ax.set_ylim(0, 0.95)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    axes[0].set_ylabel(f"accuracy (first {record['protocol']['limit']} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("NLPRUNE_DATA_DIR"))
    parser.add_argument("--output", default="benchmarks/tasks/task_table.json")
    parser.add_argument("--runs", default="benchmarks/tasks/runs", help="where the pruned runs go (git-ignored)")
    parser.add_argument("--limit", type=int, default=250, help="examples per task (a subset)")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (default: all), e.g. wanda-50,dense")
    parser.add_argument("--keep-runs", action="store_true", help="keep each pruned run (default: delete after scoring)")
    parser.add_argument("--table", action="store_true", help="print the record's table, draw its plot, run nothing")
    args = parser.parse_args()
    out = Path(args.output)
    if args.table:
        record = json.loads(out.read_text())
        print(table(record))
        text, results = paired_table(record)
        print("\nPaired on the same examples (`nlprune compare-tasks`):\n" + text)
        out.with_name(out.stem + "_paired.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(record, out.with_suffix(".png"))
        return
    if not args.data_dir:
        raise SystemExit("give --data-dir (the shared data folder with c4/ and tasks/) or set NLPRUNE_DATA_DIR")

    record: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    protocol = {"model": "smollm2-135m", "nsamples": 8, "seqlen": 512, "seed": 0, "tasks": list(TASKS),
                "limit": args.limit}
    if record.get("protocol", protocol) != protocol:
        raise SystemExit(f"{out} holds rows of another protocol ({record['protocol']}); write elsewhere.")
    record["protocol"] = protocol
    rows = record.setdefault("rows", {})
    flags = ablation_rows()
    wanted = None if args.rows is None else set(args.rows.split(","))
    code = git_state()
    common = ["--data-dir", args.data_dir]
    for key, ablation_key, label in ROWS:
        if wanted is not None and key not in wanted:
            continue
        if key in rows and all("examples_correct" in t for t in rows[key]["tasks"].values()):
            continue  # rows recorded before the outcomes were kept are scored again
        print(f"--- {key}: {label}", flush=True)
        run_dir = Path(args.runs) / key.replace(":", "of")
        tasks_json = run_dir / "tasks.json"
        eval_args = ["eval", "--tasks", ",".join(TASKS), "--limit", str(args.limit), *common,
                     "--output", str(tasks_json), "--overwrite"]
        row: dict[str, Any] = {"label": label, "ablation_row": ablation_key, "prune_seconds": None}
        if ablation_key is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            eval_args += ["--model", "smollm2-135m"]
        else:
            prune_flags = ["--model", "smollm2-135m", *flags[ablation_key], *CPU_CALIBRATION]
            print("$ nlprune prune", " ".join(prune_flags), flush=True)
            pruned = prune_run(prune_flags, run_dir, args.data_dir)
            row.update(prune_command=pruned.command, prune_seconds=pruned.record["prune_seconds"],
                       sparsity=pruned.record["sparsity"]["overall"])
            eval_args += ["--run", str(run_dir)]
        wall = run(eval_args)
        row.update(summary(json.loads(tasks_json.read_text())), eval_command=eval_args, eval_wall_seconds=wall,
                   git=code, load_average=list(os.getloadavg()))
        if key in rows:  # the same protocol again: say whether its scores moved
            before = rows[key]
            row["previous"] = {"mean_acc": before["mean_acc"], "git": before.get("git"),
                               "same_accuracies": all(before["tasks"][t]["acc"] == row["tasks"][t]["acc"] for t in TASKS)}
        rows[key] = row
        record.pop("git", None), record.pop("load_average_end", None)  # refreshed by write_json
        write_json(out, record)
        print(f"{key}: mean acc {row['mean_acc']:.4f} ± {row['mean_acc_stderr']:.4f}", flush=True)
        if not args.keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
