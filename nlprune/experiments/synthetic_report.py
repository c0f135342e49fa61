"""``nlprune synthetic``'s outputs and command line: the CSV, one PNG per panel of the
paper's Figure 2, summary.json (the rows come from :mod:`nlprune.experiments.synthetic`)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax

from nlprune.experiments.synthetic import (
    CSV_COLUMNS,
    CSV_NAME,
    METHODS,
    PANEL_FILES,
    Settings,
    run_rows,
)

# --------------------------------------------------------------------------------------------
# Output: CSV, plots, summary
# --------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row[c]) for c in CSV_COLUMNS})


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a ``synthetic.csv`` with numbers parsed (blank = None)."""

    def parse(column, text):
        if text == "" or column in ("panel", "method"):
            return None if text == "" else text
        return int(text) if column in ("k", "n", "loss_rises") else float(text)

    with open(path, newline="") as fh:
        return [{c: parse(c, row[c]) for c in CSV_COLUMNS} for row in csv.DictReader(fh)]


# method -> (label, colour, marker, linestyle); the plotted subset of METHODS
PLOT_STYLE = {
    "nonlinear-fixed": ("non-linear, paper eta = 0.1/lambda", "tab:red", "x", "-"),
    "nonlinear-certified": ("non-linear, certified step", "tab:blue", "o", "-"),
    "nonlinear-certified-row": ("non-linear, certified, per-output top-k", "tab:blue", ".", ":"),
    "nonlinear-global": ("non-linear, global step 1/L", "tab:gray", "+", ":"),
    "wanda": ("Wanda", "tab:green", "s", "-"),
    "sparsegpt": ("SparseGPT (mask)", "tab:orange", "^", "-"),
    "wanda-bilinear": ("bilinear Wanda |W_ab| |x_a| |x_b| (ours)", "tab:purple", "D", "--"),
    "magnitude": ("magnitude", "black", "v", "--"),
    "random": ("random", "tab:brown", "", ":"),
}
PANELS = {  # panel -> (x column, x label, log x, title)
    "a": ("lambda", "lambda (regularisation)", True, "(a) error vs lambda, n = {n}, rho = {rho}"),
    "b": ("n", "n (tokens per sequence)", True, "(b) error vs n, lambda = {lam}, rho = {rho}"),
    "c": ("rho", "rho (sparsity)", False, "(c) error vs rho, n = {n}, lambda = {lam}"),
}


def plot_panels(rows: list[dict], output_dir: str | Path, settings: Settings) -> list[Path]:
    """One PNG per panel: columns = data sets (k), rows = calibration / held-out error."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    paths = []
    for panel, (xcol, xlabel, logx, title) in PANELS.items():
        fig = Figure(figsize=(11, 8.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, len(settings.ks), squeeze=False, sharex=True)
        for col, k in enumerate(settings.ks):
            for r, (ycol, ylabel) in enumerate(
                (("error", "calibration error"), ("heldout_error", "held-out error"))
            ):
                ax = axes[r, col]
                for method, (label, colour, marker, style) in PLOT_STYLE.items():
                    pts = [row for row in rows
                           if row["panel"] == panel and row["k"] == k and row["method"] == method]
                    if not pts:
                        continue
                    if xcol == "lambda" and pts[0]["lambda"] is None:  # no lambda: flat line
                        ax.axhline(pts[0][ycol], color=colour, linestyle=style, label=label)
                        continue
                    pts.sort(key=lambda row: row[xcol])
                    ax.plot([p[xcol] for p in pts], [p[ycol] for p in pts], color=colour,
                            marker=marker, linestyle=style, label=label, markersize=5)
                default_x = {"lambda": settings.lam_default, "n": settings.n_default,
                             "rho": settings.rho_default}[xcol]
                ax.axvline(default_x, color="0.5", linewidth=0.8, linestyle="-.")
                ax.set_yscale("log")
                if logx:
                    ax.set_xscale("log", base=2 if xcol == "n" else 10)
                if xcol == "n":
                    ax.set_xticks(settings.n_values, [str(n) for n in settings.n_values])
                ax.grid(True, which="both", alpha=0.3)
                ax.set_title(f"k = {k} sequences: {ylabel}")
                ax.set_ylabel("sum ||f(M) - f(1)||_F^2 / (k n)")
                if r == 1:
                    ax.set_xlabel(xlabel)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9)
        fig.suptitle(
            title.format(n=settings.n_default, rho=settings.rho_default,
                         lam=settings.lam_default)
            + f"; d = {settings.d}, T = {settings.steps} (dash-dot: the default point)"
        )
        path = Path(output_dir) / PANEL_FILES[panel]
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def default_point_table(rows: list[dict], settings: Settings) -> str:
    """Error per method at the paper's default point (panel c at rho0 = n0, lam0, rho0)."""
    lines = [f"default point: n = {settings.n_default}, rho = {settings.rho_default}, "
             f"lambda = {settings.lam_default}, T = {settings.steps}  (error / held-out error)"]
    header = f"{'method':<26}" + "".join(f"{'k = ' + str(k):>24}" for k in settings.ks)
    lines.append(header)
    for method in METHODS:
        cells = []
        for k in settings.ks:
            match = [r for r in rows if r["panel"] == "c" and r["k"] == k
                     and r["method"] == method and r["rho"] == settings.rho_default]
            cells.append(f"{match[0]['error']:.5f} / {match[0]['heldout_error']:.5f}"
                         if match else "-")
        lines.append(f"{method:<26}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} is not empty; pass --overwrite to write into it "
            "anyway (files of the same name are replaced), or choose another --output"
        )
    output_dir.mkdir(parents=True, exist_ok=True)


def run_synthetic(
    output_dir: str | Path = "runs/synthetic",
    seed: int = 0,
    quick: bool = False,
    *,
    steps: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    settings: Settings | None = None,
) -> Path:
    """Run all three panels, write the CSV, the PNGs and summary.json; return the CSV path.

    ``settings`` overrides everything (``quick`` and ``steps`` then do nothing); ``quick``
    is a tiny version with every panel and method; ``steps`` overrides T.
    """
    output_dir = Path(output_dir)
    if settings is None:
        settings = Settings.quick() if quick else Settings()
        if steps is not None:
            settings = dataclasses.replace(settings, steps=steps)
    prepare_output(output_dir, overwrite)
    start = time.perf_counter()
    rows, timing = run_rows(settings, seed, progress)
    csv_path = output_dir / CSV_NAME
    write_csv(rows, csv_path)
    pngs = plot_panels(rows, output_dir, settings)
    summary = {
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "data": "see nlprune/experiments/synthetic.py (module docstring): X = s o N(0, I), "
                "s = exp(0.5 N(0,1)) normalised, W = 2/(d sqrt(d_h)) W_Q W_K^T, "
                "numpy.random.default_rng(seed)",
        "error": "sum_i ||f_i(M) - f_i(1)||_F^2 / (k n), binary mask",
        "wall_seconds": time.perf_counter() - start,
        "compile_seconds": timing["compile_seconds"],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "files": [CSV_NAME] + [p.name for p in pngs],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(default_point_table(rows, settings), file=sys.stderr)
    return csv_path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def cmd_synthetic(args: argparse.Namespace) -> int:
    csv_path = run_synthetic(
        args.output, seed=args.seed, quick=args.quick, steps=args.steps,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    out = csv_path.parent
    print(f"wrote {csv_path} and {', '.join(str(out / f) for f in PANEL_FILES.values())}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``nlprune synthetic`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "synthetic",
        help="reproduce the paper's Figure 2 (synthetic data): CSV + one PNG per panel",
        description="Sweeps lambda, n and rho on seeded synthetic attention heads (d = 64, "
        "k = 16 and 64 sequences) and compares the attention error of the non-linear mask "
        "with Wanda's, SparseGPT's and simple floors. See nlprune/experiments/synthetic.py.",
    )
    p.add_argument("--output", default="runs/synthetic",
                   help="output folder (default runs/synthetic); must be empty or new")
    p.add_argument("--seed", type=int, default=0, help="seed of the data draw (default 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="gradient steps T (default 100, the paper's)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny version (d = 16, two points per sweep): a smoke test")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output folder, replacing earlier results")
    p.add_argument("--no-progress", "--no_progress", action="store_true",
                   help="no progress bar")
    p.set_defaults(func=cmd_synthetic)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m nlprune.experiments.synthetic [options]`` (same as ``nlprune synthetic``)."""
    parser = argparse.ArgumentParser(prog="nlprune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synthetic", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as e:
        print(f"nlprune synthetic: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
