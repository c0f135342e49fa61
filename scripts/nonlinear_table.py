"""Collect the whole-model rows of the non-linear variants into one table.

Reads the OUT/table_*.json files that ``scripts/bench_prune.py --out OUT --table table_NAME``
wrote (one entry per ``nlprune prune ... --eval`` run, with its exact command and flags) and
writes OUT/table.md and OUT/table.json: rows grouped by pattern, with perplexity, held-out
attention error, pruning seconds and their ratio to the SparseGPT row of the same pattern
measured in the same batch of runs. A run repeated in a later file replaces the earlier one.

    .venv/bin/python scripts/nonlinear_table.py --out benchmarks/nonlinear
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _options(out: Path, row: dict) -> dict:
    """The run's resolved method options, from OUT/results/<its --output folder name>.json."""
    words = row["command"].split()
    name = Path(words[words.index("--output") + 1]).name
    path = out / "results" / f"{name}.json"
    return json.loads(path.read_text())["args"]["options"] if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/nonlinear")
    args = ap.parse_args()
    out = Path(args.out)
    rows: dict[str, dict] = {}
    for path in sorted(out.glob("table_*.json"), key=lambda p: p.stat().st_mtime):
        for r in json.loads(path.read_text()):
            rows[r["command"]] = r
    rows_list = list(rows.values())
    order = {"unstructured": 0, "2:4": 1, "4:8": 2}
    rows_list.sort(key=lambda r: (order.get(r["pattern"], 9), r["method"] != "sparsegpt", r["perplexity"]))
    sgpt = {r["pattern"]: r["prune_seconds"] for r in rows_list if r["method"] == "sparsegpt"}
    dense = rows_list[0]["dense_perplexity"] if rows_list else float("nan")
    lines = [
        f"Dense C4 perplexity {dense:.2f}. Exact commands: table.json.",
        "",
        "| pattern | method | flags | C4 ppl | attention error | prune s | x SparseGPT time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_list:
        ratio = f"{r['prune_seconds'] / sgpt[r['pattern']]:.1f}" if r["pattern"] in sgpt else "-"
        flags = r.get("flags") or "(defaults)"
        options = _options(out, r)
        if options.get("refit"):  # the resolved refit settings (their defaults changed between runs)
            flags += f" [refit-steps {options['refit_steps']}, refit-cg {options['refit_cg']}]"
        r["options"] = options
        lines.append(
            f"| {r['pattern']} | {r['method']} | {flags} | {r['perplexity']:.2f} | "
            f"{r['attention_error']:.2e} | {r['prune_seconds']:.1f} | {ratio} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(rows_list, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
