"""Collect the whole-model rows of the non-linear variants into one table.

Reads the OUT/table_*.json files that ``benchmarks/prune/bench_prune.py --out OUT --table table_NAME``
wrote (one entry per ``nlprune prune ... --eval`` run, with its exact command and flags) and
writes OUT/table.md and OUT/table.json: rows grouped by pattern, with perplexity, held-out
attention error, pruning seconds and their ratio to the SparseGPT row of the same pattern
measured in the same batch of runs (a batch = one table_NAME.json), and OUT/table.png. A run
repeated in a later batch replaces the earlier one.

    .venv/bin/python benchmarks/nonlinear/nonlinear_table.py --out benchmarks/nonlinear \
        --batches table_unstructured table_2of4_part1 table_2of4_paper table_rest
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _options(out: Path, row: dict, batch: str) -> dict:
    """The run's resolved method options: the row's own, else its record's in
    OUT/results/BATCH/NAME.json or (older batches) OUT/results/NAME.json."""
    if "options" in row:
        return row["options"]
    words = row["command"].split()
    name = Path(words[words.index("--output") + 1]).name
    for path in (out / "results" / batch / f"{name}.json", out / "results" / f"{name}.json"):
        if path.exists():
            return json.loads(path.read_text())["args"]["options"]
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/nonlinear")
    ap.add_argument("--batches", nargs="*", default=None,
                    help="table names in the order they were run (default: OUT/table_*.json by modification time)")
    args = ap.parse_args()
    out = Path(args.out)
    paths = ([out / f"{b}.json" for b in args.batches] if args.batches
             else sorted(out.glob("table_*.json"), key=lambda p: p.stat().st_mtime))
    missing = [str(p) for p in paths if not p.exists()]
    if not paths or missing:
        raise SystemExit(f"no batch table {', '.join(missing) or f'{out}/table_*.json'}: write one with "
                         f"benchmarks/prune/bench_prune.py --out {out} --table table_NAME --rows ...")
    rows: dict[str, dict] = {}
    for path in paths:
        batch = json.loads(path.read_text())
        # prune time relative to SparseGPT's in the same batch (same machine load)
        sgpt = {r["pattern"]: r["prune_seconds"] for r in batch if r["method"] == "sparsegpt" and not r.get("flags")}
        for r in batch:
            r["batch"] = path.stem
            r["x_sparsegpt_time"] = r["prune_seconds"] / sgpt[r["pattern"]] if r["pattern"] in sgpt else None
            r["options"] = _options(out, r, path.stem)
            # a later batch's run of the same command and resolved options replaces the earlier
            # one (a default that changed between batches keeps both rows); every batch keeps its
            # SparseGPT rows, the references of its time ratios
            key = r["command"] + json.dumps(r["options"], sort_keys=True)
            rows[key + (path.stem if r["method"] == "sparsegpt" else "")] = r
    rows_list = list(rows.values())
    order = {"unstructured": 0, "2:4": 1, "4:8": 2}
    rows_list.sort(key=lambda r: (order.get(r["pattern"], 9), r["method"] != "sparsegpt", r["perplexity"]))
    dense = rows_list[0]["dense_perplexity"] if rows_list else float("nan")
    lines = [
        f"Dense C4 perplexity {dense:.2f}. Prune-time ratios are to the SparseGPT row of the same batch "
        "(one machine load); exact commands: table.json.",
        "",
        "| pattern | method | flags | C4 ppl | attention error | prune s | x SparseGPT time | batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_list:
        ratio = f"{r['x_sparsegpt_time']:.1f}" if r["x_sparsegpt_time"] is not None else "-"
        lines.append(
            f"| {r['pattern']} | {r['method']} | {_flags(r)} | {r['perplexity']:.2f} | "
            f"{r['attention_error']:.2e} | {r['prune_seconds']:.1f} | {ratio} | {r['batch']} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(rows_list, indent=2) + "\n")
    plot(rows_list, dense, out / "table.png")
    print("\n".join(lines))
    print(f"wrote {out}/table.md, table.json, table.png")


def _flags(row: dict) -> str:
    flags = row.get("flags") or "(defaults)"
    if row["options"].get("refit"):  # the resolved refit settings (their defaults changed between runs)
        flags += f" [refit-steps {row['options']['refit_steps']}, refit-cg {row['options']['refit_cg']}]"
    return flags


def plot(rows: list[dict], dense: float, path: Path) -> None:
    """One horizontal bar per run, a panel per pattern, log perplexity; SparseGPT's line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    n_bars = sum(r["pattern"] == p for r in rows for p in patterns)
    fig, axes = plt.subplots(len(patterns), 1, figsize=(11, 0.32 * n_bars + 1.5 * len(patterns)), squeeze=False)
    for ax, pattern in zip(axes[:, 0], patterns):
        # one bar per resolved setting: its runs in several batches (and spelt with different
        # flags) give the same perplexity, only their times differ
        seen: dict[str, dict] = {}
        for r in rows:
            if r["pattern"] == pattern:
                seen.setdefault(r["method"] + json.dumps(r["options"], sort_keys=True), r)
        sel = list(seen.values())[::-1]
        labels = [(r["method"] + " " + _flags(r)).replace("--", "") for r in sel]
        colors = ["tab:gray" if r["method"] == "sparsegpt" else "tab:blue" for r in sel]
        bars = ax.barh(range(len(sel)), [r["perplexity"] for r in sel], color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_yticks(range(len(sel)), labels, fontsize=7)
        for r in sel:
            if r["method"] == "sparsegpt":
                ax.axvline(r["perplexity"], color="tab:gray", ls="--", lw=1)
        ax.axvline(dense, color="k", ls=":", lw=1, label=f"dense {dense:.2f}")
        ax.set_xscale("log")
        ax.set_xlim(min(dense, min(r["perplexity"] for r in sel)) / 1.3, max(r["perplexity"] for r in sel) * 4)
        ax.set_xlabel("C4 perplexity (128 x 512, lower is better)")
        ax.set_title(f"SmolLM2-135M, 50% {pattern}")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
