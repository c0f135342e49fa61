"""Streaming (``nlprune prune --stream``): the same run with one decoder layer in memory.

Two kinds of rows, each one `nlprune prune` per process, its peak resident memory measured by
wait4 (the whole process's high-water mark):

* ``pair`` rows (SmolLM2-135M, the cpu protocol): the run in memory and streamed, side by
  side; the masks' sha256 (masks.safetensors, canonical bytes), the C4 perplexity and the
  attention error must be identical, and the peak memory of each is recorded;
* ``big`` rows (an 8B- or 1B-shaped model with seeded random weights, written to disk layer
  by layer on first use): streamed only, with the peak against ``nlprune plan --stream``'s
  and the prune seconds per layer.

    python benchmarks/stream/study.py --data-dir ../shared/data              # every row not yet recorded
    python benchmarks/stream/study.py --data-dir ../shared/data --rows wanda-50
    python benchmarks/stream/study.py --table                                # table.md from the records
    python benchmarks/stream/study.py --plans                                # the plans README quotes

Records: benchmarks/stream/records/<row>.json (a row whose record exists is skipped; --rerun
runs it again). Run folders go to --work-dir and are deleted after each row (an 8B run's
folder is ~30 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import CPU_CALIBRATION, CPU_EVAL, REPO_ROOT, git_state, machine_line, prune_run, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
SMOL = ["--model", "smollm2-135m", *CPU_CALIBRATION, *CPU_EVAL]
BIG = ["--random-weights", "0", "--prune-method"]

ROWS: dict[str, tuple[str, list[str]]] = {  # row -> (kind, flags without --stream)
    "wanda-50": ("pair", [*SMOL, "--prune-method", "wanda", "--sparsity-ratio", "0.5"]),
    "wanda-2of4": ("pair", [*SMOL, "--prune-method", "wanda", "--sparsity-type", "2:4"]),
    "sparsegpt-50": ("pair", [*SMOL, "--prune-method", "sparsegpt", "--sparsity-ratio", "0.5"]),
    "sparsegpt-2of4": ("pair", [*SMOL, "--prune-method", "sparsegpt", "--sparsity-type", "2:4"]),
    "llama3.1-8b-wanda": ("big", ["--model", "llama-3.1-8b", *BIG, "wanda", "--sparsity-ratio", "0.5",
                                  *CPU_CALIBRATION, "--dtype", "bfloat16", "--attention-windows", "0"]),
    "llama3.2-1b-wanda": ("big", ["--model", "llama-3.2-1b", *BIG, "wanda", "--sparsity-ratio", "0.5",
                                  *CPU_CALIBRATION]),
    "recommended-50": ("pair", ["--config", "recipes/recommended-50.toml"]),
    "recommended-2of4": ("pair", ["--config", "recipes/recommended-2of4.toml"]),
    "llama3.1-8b-sparsegpt": ("big", ["--model", "llama-3.1-8b", *BIG, "sparsegpt", "--sparsity-ratio", "0.5",
                                      *CPU_CALIBRATION, "--dtype", "bfloat16", "--attention-windows", "0"]),
    # Llama-3.1-8B's layer shape, 4 of its 32 layers (SparseGPT on all 32: most of an hour here): the
    # peak memory is one layer's, so it is the whole model's; the time is per layer
    "llama3.1-8b-4layers-sparsegpt": ("big", ["--model", "@llama-3.1-8b-4layers", *BIG, "sparsegpt",
                                              "--sparsity-ratio", "0.5", *CPU_CALIBRATION, "--dtype", "bfloat16",
                                              "--attention-windows", "0"]),
    "best-50": ("pair", [*SMOL, "--prune-method", "nonlinear", "--recipe", "best", "--sparsity-ratio", "0.5"]),
    "best-2of4": ("pair", [*SMOL, "--prune-method", "nonlinear", "--recipe", "best", "--sparsity-type", "2:4"]),
    # weights held in bfloat16 (--dtype): streamed == in memory still, and the perplexity against wanda-50's
    "wanda-50-bf16": ("pair", [*SMOL, "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--dtype", "bfloat16"]),
    "sparsegpt-2of4-bf16": ("pair", [*SMOL, "--prune-method", "sparsegpt", "--sparsity-type", "2:4",
                                     "--dtype", "bfloat16"]),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(run) -> dict:
    rec = run.record
    return {
        "command": run.command, "peak_rss_bytes": run.peak_rss_bytes, "wall_seconds": run.wall_seconds,
        "load_average": run.load_average, "prune_seconds": rec["prune_seconds"], "layer_seconds": rec["layer_seconds"],
        "read_seconds": rec.get("read_seconds"), "checkpoint_seconds": rec["checkpoint_seconds"],
        "masks_sha256": sha256(run.path / "masks.safetensors"), "perplexity": rec.get("perplexity"),
        "dense_perplexity": rec.get("dense_perplexity"),
        "attention_error": (rec.get("attention_error") or {}).get("per_layer"),
        "overall_sparsity": rec["sparsity"]["overall"], "record_code": rec["code"], "model": rec["model"]["name"],
    }


def plan_peak(flags: list[str], work: Path) -> dict:
    """`nlprune plan` with the row's model, method, calibration and attention-window flags, streamed."""
    keep = {"--model", "--prune-method", "--sparsity-ratio", "--sparsity-type", "--nsamples", "--seqlen",
            "--attention-windows", "--dtype"}
    args = [a for i, a in enumerate(flags) if a in keep or (i and flags[i - 1] in keep)]
    cmd = [sys.executable, "-m", "nlprune.cli", "plan", *args, "--stream"]
    subprocess.run([*cmd, "--output", str(work / "plan.json")], capture_output=True, text=True, check=True)
    plan = json.loads((work / "plan.json").read_text())
    return {"command": "nlprune plan " + " ".join(cmd[4:]), "peak_bytes": plan["peak_bytes"],
            "cpu_process_bytes": plan.get("cpu_process_bytes"), "peak_stage": plan["peak_stage"],
            "cpu_process_at": plan.get("cpu_process_at")}


def sliced_model(card: str, layers: int, where: Path) -> Path:
    """A folder with a card's config cut to its first ``layers`` layers and the card's tokenizer
    (``--random-weights`` then writes weights of that shape): ``@CARD-NlayerS`` in a row's flags."""
    from nlprune import cards

    folder = where / f"{card}-{layers}layers"
    card_ = cards.get_card(card)
    config = {**cards.card_config(card_).to_hf_dict(), "num_hidden_layers": layers}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tok = card_["tokenizer"]
    shutil.copy(cards.package_dir(tok["package"]) / tok["file"], folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tok["bos_token"], "eos_token": tok["eos_token"], "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def resolve_flags(flags: list[str], where: Path) -> list[str]:
    out = []
    for f in flags:
        if f.startswith("@"):
            card, _, layers = f[1:].rpartition("-")
            f = str(sliced_model(card, int(layers.removesuffix("layers")), where))
        out.append(f)
    return out


def run_row(name: str, data_dir: str, work: Path) -> dict:
    kind, flags = ROWS[name]
    work.mkdir(parents=True, exist_ok=True)
    flags = resolve_flags(flags, HERE / "models")
    out = {"row": name, "kind": kind, "code": git_state(), "machine": machine_line()}
    try:
        if kind == "pair":
            memory = summary(prune_run(flags, work / f"{name}-memory", data_dir, log=work / f"{name}-memory.log"))
            stream = summary(prune_run([*flags, "--stream"], work / f"{name}-stream", data_dir,
                                       log=work / f"{name}-stream.log"))
            out.update(memory=memory, stream=stream, identical={
                k: memory[k] == stream[k] for k in ("masks_sha256", "perplexity", "attention_error", "overall_sparsity")})
        else:
            stream = summary(prune_run([*flags, "--stream"], work / name, data_dir, log=work / f"{name}.log"))
            out.update(stream=stream, plan=plan_peak(flags, work))
    finally:
        for p in work.glob(f"{name}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else None
    return out


def gib(b) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def table(records: dict[str, dict]) -> str:
    lines = ["| row | masks sha256 equal | C4 ppl in memory | streamed | peak RSS GiB in memory | streamed | "
             "prune s in memory | streamed | commit (streamed run) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        if r["kind"] != "pair":
            continue
        m, s = r["memory"], r["stream"]
        lines.append(f"| {name} | {r['identical']['masks_sha256']} | {m['perplexity']:.4f} | {s['perplexity']:.4f} | "
                     f"{gib(m['peak_rss_bytes'])} | {gib(s['peak_rss_bytes'])} | {m['prune_seconds']:.1f} | "
                     f"{s['prune_seconds']:.1f} | {s['record_code']['commit'][:7]} |")
    lines += ["", "| row | peak RSS GiB (wait4) | plan GiB (--stream, process) | plan / measured | prune s | "
              "s per layer (median) | read s | checkpoint s | commit (run) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        if r["kind"] != "big":
            continue
        s, plan = r["stream"], r["plan"]
        per = sorted(s["layer_seconds"])[len(s["layer_seconds"]) // 2]
        planned = plan.get("cpu_process_bytes") or plan["peak_bytes"]
        lines.append(f"| {name} | {gib(s['peak_rss_bytes'])} | {gib(planned)} | {planned / s['peak_rss_bytes']:.2f} | "
                     f"{s['prune_seconds']:.1f} | {per:.1f} | {s['read_seconds']:.1f} | {s['checkpoint_seconds']:.1f} | "
                     f"{s['record_code']['commit'][:7]} |")
    return "\n".join(lines) + "\n"


# What README's "What 8B and 70B need" quotes from `nlprune plan` (no weights needed): the 8 x 512
# streamed peaks of the 70B shape, and the settings `--memory 80GiB` picks at 128 x 2048.
PLANS = [
    [*size, "--model", model, "--prune-method", method, *extra]
    for model in ("llama-3.1-8b", "llama-3.1-70b") for method in ("wanda", "sparsegpt")
    for size, extra in ((["--nsamples", "128", "--seqlen", "2048"], ["--memory", "80GiB"]),
                        (["--nsamples", "128", "--seqlen", "2048"], ["--memory", "80GiB", "--dtype", "bfloat16"]),
                        (["--nsamples", "8", "--seqlen", "512"], ["--stream"]))
]


def run_plans(work: Path) -> dict:
    """Each of :data:`PLANS` through the command line: its first line and its plan's numbers."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for flags in PLANS:
        cmd = [sys.executable, "-m", "nlprune.cli", "plan", *flags, "--output", str(work / "plan.json")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        plan = json.loads((work / "plan.json").read_text())
        lines = [line for line in out.splitlines() if line.startswith(("peak per device", "on a CPU"))]
        rows.append({"command": "nlprune plan " + " ".join(flags), "lines": lines,
                     "peak_bytes": plan["peak_bytes"], "cpu_process_bytes": plan.get("cpu_process_bytes")})
    return {"row": "plans", "code": git_state(), "plans": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("NLPRUNE_DATA_DIR"))
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--work-dir", default="/tmp/nlprune-stream")
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--table", action="store_true", help="only write table.md from the records")
    ap.add_argument("--plans", action="store_true", help="only record README's `nlprune plan` numbers (records/plans.json)")
    args = ap.parse_args()
    records_dir = HERE / "records"
    if args.plans:
        write_json(records_dir / "plans.json", run_plans(Path(args.work_dir)))
        return 0
    if not args.table:
        if not args.data_dir:
            ap.error("--data-dir (or NLPRUNE_DATA_DIR) is needed to run rows")
        os.chdir(REPO_ROOT)  # recipe paths are relative to the repository
        for name in args.rows:
            path = records_dir / f"{name}.json"
            if path.exists() and not args.rerun:
                print(f"{name}: recorded, skipped")
                continue
            print(f"{name}: running", flush=True)
            write_json(path, run_row(name, args.data_dir, Path(args.work_dir)))
    records = {p.stem: json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))}
    records = {k: records[k] for k in ROWS if k in records}
    (HERE / "table.md").write_text(table(records))
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
