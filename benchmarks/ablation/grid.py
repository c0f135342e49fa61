"""The ablation that decides the recommendation (issue 14): one batch, every row a whole-model
prune of SmolLM2-135M (cpu protocol: 8 x 512 calibration tokens from C4 train, seed 0) and its
perplexity on the C4 test set (128 x 512), on text unlike the calibration set (Wikipedia
paragraphs, LAMBADA fiction: 64 x 512 each) and on the validation sets (C4 validation and the
other halves of the Wikipedia and LAMBADA text: 32 x 512 each).

Rows, at 50%, 60%, 70% unstructured and at 2:4: {magnitude, Wanda, SparseGPT, non-linear q/k
(straight-through) with the SparseGPT fill-in, ALPS, RIA} x {no refit, --refit, --refit with the ridge
--refit-percdamp 0.1, 1.0 or 10 (suffix -damp0.1, -damp1, -damp10)}; `--recipe fast` (the
non-linear q/k with refit at fewer steps); the paper's recipe as
Algorithm 1 is written (full-batch steps) and in its earlier one-window-per-step form, and with
the certified and backtracking step rules (50% only: each full-batch row takes ~10x the others).

    .venv/bin/python benchmarks/ablation/grid.py --data-dir ../shared/data --out benchmarks/ablation
    .venv/bin/python benchmarks/ablation/grid.py --data-dir ../shared/data --out benchmarks/ablation --rows wanda-50 --table
    # the damping sweep: validation sets only (choices need no test set)
    .venv/bin/python benchmarks/ablation/grid.py --data-dir ../shared/data --out benchmarks/ablation/damping --validation-only \
        --rows ria+refit-damp0.1-50 ria+refit-damp10-50

Run directories go under OUT/runs (not committed); each row's record is OUT/results/NAME.json
(the run's results.json plus the command, the load average and the batch), written when the
row finishes, so an interrupted batch resumes where it stopped. ``--table`` only rebuilds
OUT/table.md and OUT/table.json from the records. Prune seconds are compared with SparseGPT's
(no refit, same pattern) in the same batch: read them with the batch's load averages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import machine_line, prune_run, write_json  # noqa: E402

from nlprune.runconfig import protocol_path, read_config_file  # noqa: E402

PROTOCOL = ["--protocol", "cpu"]  # nlprune/protocols/cpu.toml: 8 x 512 calibration, the test and validation sets
TEST_SETS = ("c4", "wikipedia", "lambada")
VALIDATION_SETS = ("c4-validation", "wikipedia-validation", "lambada-validation")
SET_TITLES = {"c4": "C4 test", "wikipedia": "Wikipedia", "lambada": "LAMBADA", "c4-validation": "C4 validation",
              "wikipedia-validation": "Wikipedia validation", "lambada-validation": "LAMBADA validation"}


def protocol_settings(name: str) -> dict:
    """A shipped protocol's settings (nlprune/protocols/NAME.toml), read as `--protocol` reads them."""
    return read_config_file(protocol_path(name), "--protocol")


def protocol_flags(name: str, validation_only: bool = False) -> list[str]:
    """``--protocol NAME``; for the damping sweep, the same protocol's validation windows only."""
    flags = ["--protocol", name]
    if validation_only:
        flags += ["--eval-datasets", ",".join(s for s in protocol_settings(name)["eval-datasets"]
                                              if s.split(":")[0] in VALIDATION_SETS)]
    return flags


def protocol_line(name: str) -> str:
    """The table's first line: what the rows were calibrated and measured on."""
    p = protocol_settings(name)
    sets = "; ".join(f"{SET_TITLES.get(n, n)} {c} x {p['eval-seqlen']}"
                     for n, c in (s.split(":") for s in p["eval-datasets"]))
    return (f"SmolLM2-135M, {name} protocol ({p['nsamples']} x {p['seqlen']} calibration tokens of C4 train, seed "
            f"{p['seed']}). Perplexity (windows x tokens): {sets}; Wikipedia and LAMBADA are text unlike the "
            "calibration set, the validation sets are for choosing. Means are geometric. Time: prune seconds and "
            "their ratio to SparseGPT (no refit, same pattern) in the same batch.")


PATTERNS = {"50": ["--sparsity-ratio", "0.5"], "60": ["--sparsity-ratio", "0.6"], "70": ["--sparsity-ratio", "0.7"],
            "2:4": ["--sparsity-type", "2:4"]}
# --refit-percdamp of the refit rows: "+refit" is the default (0.01), the others name theirs
DAMPINGS = {"": [], "-damp0.1": ["--refit-percdamp", "0.1"], "-damp1": ["--refit-percdamp", "1.0"],
            "-damp10": ["--refit-percdamp", "10"]}
NL_QK = ["--prune-method", "nonlinear", "--straight-through", "--linear-method", "sparsegpt"]


def rows() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p, pattern in PATTERNS.items():
        for name, args in (("magnitude", ["--prune-method", "magnitude"]), ("wanda", ["--prune-method", "wanda"]),
                           ("sparsegpt", ["--prune-method", "sparsegpt"]), ("nonlinear-qk", NL_QK),
                           ("alps", ["--prune-method", "alps"]), ("ria", ["--prune-method", "ria"])):
            out[f"{name}-{p}"] = args + pattern
            for suffix, damping in DAMPINGS.items():
                out[f"{name}+refit{suffix}-{p}"] = args + pattern + ["--refit", *damping]
        out[f"fast-{p}"] = ["--prune-method", "nonlinear", "--recipe", "fast", *pattern]
        out[f"fast-damp1-{p}"] = ["--prune-method", "nonlinear", "--recipe", "fast", "--refit-percdamp", "1.0", *pattern]
        out[f"paper-{p}"] = ["--prune-method", "nonlinear", *pattern]
        out[f"paper-1window-{p}"] = ["--prune-method", "nonlinear", "--window-batch", "1", *pattern]
    out["paper-certified-50"] = ["--prune-method", "nonlinear", "--step-rule", "certified", *PATTERNS["50"]]
    out["paper-backtracking-50"] = ["--prune-method", "nonlinear", "--step-rule", "backtracking", *PATTERNS["50"]]
    return out


def seeded(protocol: list[str], seed: int) -> list[str]:
    """The protocol at calibration seed ``seed`` (the command line's --seed wins over the protocol's 0)."""
    return list(protocol) + (["--seed", str(seed)] if seed else [])


def split_name(name: str) -> tuple[str, int]:
    """'wanda-50@seed1' -> ('wanda-50', 1); a name without a seed is calibration seed 0."""
    base, _, seed = name.partition("@seed")
    return base, int(seed or 0)


def run_row(name: str, args: list[str], out: Path, data_dir: str, batch: str, protocol: list[str] = PROTOCOL) -> dict:
    protocol = seeded(protocol, split_name(name)[1])
    done = prune_run([*args, *protocol], out / "runs" / name.replace(":", "of"), data_dir)
    record = done.record
    record["row"] = {"name": name, "command": done.command, "batch": batch, "wall_seconds": done.wall_seconds,
                     "load_average": list(done.load_average)}
    return record


def summary(record: dict) -> dict:
    ppl = {k: v["pruned"] for k, v in record["perplexities"].items()}
    dense = {k: v["dense"] for k, v in record["perplexities"].items()}

    def gmean(names):
        if not all(n in ppl for n in names):
            return None  # a validation-only row (the damping sweep)
        return math.exp(sum(math.log(ppl[n]) for n in names) / len(names))

    wiki_val = record["perplexities"].get("wikipedia-validation", {})
    return {
        "name": record["row"]["name"], "command": record["row"]["command"], "batch": record["row"]["batch"],
        "perplexity": ppl, "dense": dense, "test_mean": gmean(TEST_SETS), "validation_mean": gmean(VALIDATION_SETS),
        # Wikipedia's validation half: by article since 2026-12-07 (its part says so), by passage before
        "split": "article" if "without" in wiki_val.get("part", "") else "passage",
        "prune_seconds": record["prune_seconds"], "load_average": record["row"]["load_average"],
        "attention_error": record.get("attention_error", {}).get("mean"),
    }


def table(out: Path, protocol: str = "cpu") -> None:
    recs = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    every = [summary(r) for r in recs]
    rows_ = [r for r in every if split_name(r["name"])[1] == 0]
    order = list(rows())
    rows_.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    ref = {r["name"].rsplit("-", 1)[1]: r for r in rows_ if r["name"].startswith("sparsegpt-")}
    lines = [
        protocol_line(protocol),
        "",
        "| row | C4 test | Wikipedia | LAMBADA | test mean | C4 val | Wiki val | LAMBADA val | val mean | "
        "attn err (val) | prune s | x SparseGPT | batch, load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = [r for r in rows_ if r["test_mean"] is not None and r["validation_mean"] is not None]
    for split in ("passage", "article"):  # the dense model on each Wikipedia validation half
        of_split = [r for r in full if r["split"] == split]
        if of_split:
            d, old = of_split[0]["dense"], "†" if split == "passage" else ""
            lines.append(f"| dense | {d['c4']:.2f} | {d['wikipedia']:.2f} | {d['lambada']:.2f} | | "
                         f"{d['c4-validation']:.2f} | {d['wikipedia-validation']:.2f}{old} | {d['lambada-validation']:.2f} "
                         "| | | | | |")
    def cell(value, mark=""):
        return "" if value is None else f"{value:.2f}{mark}"

    for r in rows_:
        p = r["perplexity"]
        base = ref.get(r["name"].rsplit("-", 1)[1])
        ratio = f"{r['prune_seconds'] / base['prune_seconds']:.2f}" if base and base["batch"] == r["batch"] else "-"
        attn = f"{r['attention_error']:.2e}" if r["attention_error"] is not None else ""
        old = "†" if r["split"] == "passage" else ""
        test_mean = cell(r["test_mean"])
        lines.append(
            f"| {r['name']} | {cell(p.get('c4'))} | {cell(p.get('wikipedia'))} | {cell(p.get('lambada'))} | "
            f"{'**' + test_mean + '**' if test_mean else ''} | {cell(p.get('c4-validation'))} | "
            f"{cell(p.get('wikipedia-validation'), old)} | {cell(p.get('lambada-validation'))} | "
            f"{cell(r['validation_mean'], old)} | {attn} | {r['prune_seconds']:.1f} | {ratio} | {r['batch']}, "
            f"{r['load_average'][0]}-{r['load_average'][1]} |"
        )
    lines += ["", "Commands: table.json (`command` of each row, with `--data-dir DIR --output RUN_DIR`)."]
    if any(r["split"] == "passage" for r in rows_):
        lines += ["", "† Wikipedia validation half split by passage (records before 2026-12-07's fix): it shares "
                  "articles with the Wikipedia test half. Rows without † use the split by article; compare "
                  "validation means only between rows of the same split."]
    seeds = seed_table(every)
    lines += seeds["lines"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    write_json(out / "table.json", {"rows": every, "seeds": seeds["rows"]})
    if full:
        plot(full, out / "table.png")
    print("\n".join(lines))


def seed_table(every: list[dict]) -> dict:
    """Rows measured at calibration seeds 0, 1 and 2: validation and test means with their
    standard deviation over seeds, and per pattern each row against the best one on
    validation, paired by seed (the same calibration windows): the mean difference of the
    log validation means and its standard error. "wins"/"loses" only beyond twice the
    standard error, else "tie"."""
    import statistics

    by_row: dict[str, dict[int, dict]] = {}
    for r in every:
        base, seed = split_name(r["name"])
        by_row.setdefault(base, {})[seed] = r
    # a row's three seeds must share one Wikipedia split, and rows are compared within one split
    full = {n: v for n, v in by_row.items() if {0, 1, 2} <= set(v) and len({v[s]["split"] for s in (0, 1, 2)}) == 1}
    if not full:
        return {"lines": [], "rows": []}
    lines = ["", "Calibration seeds 0, 1, 2 (mean ± standard deviation over seeds; paired: the row's log "
             "validation mean minus the best row's, seed by seed, as a percentage, ± its standard error):", "",
             "| row | val mean | test mean | vs best on validation (paired) | verdict |", "|---|---|---|---|---|"]
    out_rows = []
    for p in PATTERNS:
        names = [n for n in full if n.endswith("-" + p)]
        if not names:
            continue
        split = "article" if any(full[n][0]["split"] == "article" for n in names) else "passage"
        names = [n for n in names if full[n][0]["split"] == split]
        val = {n: [full[n][s]["validation_mean"] for s in (0, 1, 2)] for n in names}
        best = min(names, key=lambda n: statistics.mean(math.log(v) for v in val[n]))
        for n in sorted(names, key=lambda n: statistics.mean(math.log(v) for v in val[n])):
            test = [full[n][s]["test_mean"] for s in (0, 1, 2)]
            diffs = [100 * (math.log(a) - math.log(b)) for a, b in zip(val[n], val[best])]
            mean_d, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            verdict = "best" if n == best else ("loses" if mean_d > 2 * se else "tie")
            mark = "†" if split == "passage" else ""
            lines.append(f"| {n} | {statistics.mean(val[n]):.2f} ± {statistics.stdev(val[n]):.2f}{mark} | "
                         f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f} | "
                         f"{'' if n == best else f'{mean_d:+.2f}% ± {se:.2f}'} | {verdict} |")
            out_rows.append({"name": n, "validation_means": val[n], "test_means": test, "best": best,
                             "paired_log_difference_percent": diffs, "mean": mean_d, "standard_error": se,
                             "verdict": verdict})
    return {"lines": lines, "rows": out_rows}


def refit_damping(name: str) -> tuple[str, str, float] | None:
    """'alps+refit-damp0.1-70' -> ('alps', '70', 0.1); '+refit' alone is the default 0.01."""
    base, pattern = name.rsplit("-", 1)
    method, sep, rest = base.partition("+refit")
    if not sep:
        return None
    flag = DAMPINGS.get(rest)
    if flag is None:
        return None
    return method, pattern, float(flag[1]) if flag else 0.01


def damping_table(sweep: Path, ablation: Path) -> None:
    """The damping sweep: per method and pattern, the validation mean at each --refit-percdamp,
    from the sweep's validation-only rows and the ablation's full rows (seed 0, Wikipedia
    validation split by article only: the sweep compares within one split)."""
    every = [summary(json.loads(p.read_text())) for d in (sweep, ablation) for p in sorted((d / "results").glob("*.json"))]
    curves: dict[tuple[str, str], dict[float, dict]] = {}
    for r in every:
        key = refit_damping(r["name"]) if split_name(r["name"])[1] == 0 and r["split"] == "article" else None
        if key and r["validation_mean"] is not None:
            curves.setdefault(key[:2], {})[key[2]] = r
    curves = {k: c for k, c in curves.items() if len(c) > 1}  # a sweep has more than one damping
    points = sorted({d for c in curves.values() for d in c})
    lines = ["SmolLM2-135M, cpu protocol, seed 0: validation mean (geometric, C4 / Wikipedia / LAMBADA "
             "validation, 32 x 512 each; Wikipedia split by article) of `--refit` at each `--refit-percdamp`; "
             "the lowest of each row in bold.", "",
             "| method | pattern | " + " | ".join(f"damping {d:g}" for d in points) + " | no refit |",
             "|---|---|" + "---|" * (len(points) + 1)]
    plain = {(split_name(r["name"])[0].rsplit("-", 1)[0], r["name"].rsplit("-", 1)[1]): r for r in every
             if "+refit" not in r["name"] and r["split"] == "article" and r["validation_mean"] is not None}
    out_rows = []
    for (method, pattern), curve in sorted(curves.items()):
        best = min(curve, key=lambda d: curve[d]["validation_mean"])
        cells = [("**{:.2f}**" if d == best else "{:.2f}").format(curve[d]["validation_mean"]) if d in curve else ""
                 for d in points]
        base = plain.get((method, pattern))
        no_refit = f"{base['validation_mean']:.2f}" if base else ""
        lines.append(f"| {method} | {pattern} | " + " | ".join(cells) + f" | {no_refit} |")
        out_rows.append({"method": method, "pattern": pattern, "best_damping": best,
                         "validation_mean": {str(d): curve[d]["validation_mean"] for d in curve},
                         "no_refit": base["validation_mean"] if base else None,
                         "commands": {str(d): curve[d]["command"] for d in curve},
                         "names": {str(d): curve[d]["name"] for d in curve}})
    (sweep / "table.md").write_text("\n".join(lines) + "\n")
    write_json(sweep / "table.json", {"rows": out_rows})
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (method, pattern), curve in sorted(curves.items()):
        ds = sorted(curve)
        base = curve[ds[0]]["validation_mean"]
        ax.plot(ds, [100 * (curve[d]["validation_mean"] / base - 1) for d in ds], marker="o", label=f"{method}, {pattern}")
    ax.set_xscale("log")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("--refit-percdamp")
    ax.set_ylabel(f"validation mean, % vs damping {points[0]:g}" if points else "")
    ax.set_title("SmolLM2-135M: the refit's damping per regime (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(sweep / "table.png", dpi=110)
    plt.close(fig)


def plot(rows_: list[dict], path: Path) -> None:
    """Per pattern, each row's perplexity on the three test sets and its validation mean
    (log scale: the failed rows sit orders of magnitude above the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = [p for p in PATTERNS if any(r["name"].endswith("-" + p) for r in rows_)]
    fig, axes = plt.subplots(len(patterns), 1, figsize=(11, 4.2 * len(patterns)), squeeze=False)
    sets = [("c4", "C4 test"), ("wikipedia", "Wikipedia"), ("lambada", "LAMBADA")]
    for ax, p in zip(axes[:, 0], patterns):
        rs = [r for r in rows_ if r["name"].endswith("-" + p)]
        width = 0.2
        for i, (key, label) in enumerate(sets):
            ax.bar([j + i * width for j in range(len(rs))], [r["perplexity"][key] for r in rs], width, label=label)
        ax.bar([j + 3 * width for j in range(len(rs))], [r["validation_mean"] for r in rs], width,
               label="validation mean", color="0.4")
        ax.set_xticks([j + 1.5 * width for j in range(len(rs))], [r["name"].rsplit("-", 1)[0] for r in rs],
                      rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(f"SmolLM2-135M, {p}{'% unstructured' if p.isdigit() else ''}: lower is better")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/ablation")
    ap.add_argument("--rows", nargs="*", default=None, help="rows to run (default: every row)")
    ap.add_argument("--batch", default=time.strftime("%Y-%m-%d %H:%M"), help="the batch's name in the records")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0],
                    help="calibration seeds of each row (records of seed S > 0 are named ROW@seedS)")
    ap.add_argument("--protocol", default="cpu", choices=("cpu", "field"),
                    help="nlprune/protocols/NAME.toml (default cpu); the field protocol's rows go in their own --out")
    ap.add_argument("--validation-only", action="store_true",
                    help="evaluate the validation sets only (the damping sweep: choices need no test set)")
    ap.add_argument("--rerun", nargs="*", default=[], metavar="ROW",
                    help="rows to run again although their record exists (it is replaced; git keeps the old one), "
                         "e.g. a row measured before the Wikipedia split by article")
    ap.add_argument("--table", action="store_true", help="only rebuild the table from the records")
    ap.add_argument("--damping-table", action="store_true",
                    help="only rebuild the damping sweep's table and plot (OUT: the sweep; its full rows from "
                    "benchmarks/ablation)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.damping_table:
        damping_table(out, Path(__file__).resolve().parent)
        return
    if not args.table:
        chosen = rows() if args.rows is None else {n: rows()[n] for n in args.rows}
        todo = {(n if s == 0 else f"{n}@seed{s}"): a for s in args.seeds for n, a in chosen.items()}
        print(f"{len(todo)} rows on {machine_line()}", flush=True)
        for name, row_args in todo.items():
            path = out / "results" / f"{name.replace(':', 'of')}.json"
            if path.exists() and name not in args.rerun:
                print(f"{name}: done before, skipped", flush=True)
                continue
            protocol = protocol_flags(args.protocol, args.validation_only)
            if args.protocol == "field" and "nonlinear" in row_args:
                row_args = [*row_args, "--recompute-targets"]  # 128 x 2048 targets do not fit (nlprune plan)
            write_json(path, run_row(name, row_args, out, args.data_dir, args.batch, protocol))
    table(out, args.protocol)


if __name__ == "__main__":
    main()
