"""Behaviour fingerprint of the pruning code: whole-model runs (cpu protocol), the sha256
of each run's masks (their contents: the packed file's bytes also hold safetensors metadata in
no fixed order) and its C4 perplexity. Run it before and after a change that must not change
behaviour, and compare the two records.

    .venv/bin/python benchmarks/redesign/behaviour_check.py --data-dir ../shared/data --out /tmp/before
    ... change the code ...
    .venv/bin/python benchmarks/redesign/behaviour_check.py --data-dir ../shared/data --out /tmp/after \\
        --compare /tmp/before/behaviour.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import CPU_PROTOCOL, prune_run, write_json  # noqa: E402

RUNS = {
    "wanda-50": ["--prune-method", "wanda", "--sparsity-ratio", "0.5"],
    "wanda-2:4": ["--prune-method", "wanda", "--sparsity-type", "2:4"],
    "sparsegpt-50": ["--prune-method", "sparsegpt", "--sparsity-ratio", "0.5"],
    "sparsegpt-2:4": ["--prune-method", "sparsegpt", "--sparsity-type", "2:4"],
    "nonlinear-best-50": ["--prune-method", "nonlinear", "--recipe", "best", "--sparsity-ratio", "0.5"],
    "nonlinear-best-2:4": ["--prune-method", "nonlinear", "--recipe", "best", "--sparsity-type", "2:4"],
    "nonlinear-paper-50": ["--prune-method", "nonlinear", "--sparsity-ratio", "0.5"],
    "wanda-refit-damp1-50": ["--prune-method", "wanda", "--refit", "--refit-percdamp", "1.0", "--sparsity-ratio", "0.5"],
    "ria-refit-damp1-50": ["--prune-method", "ria", "--refit", "--refit-percdamp", "1.0", "--sparsity-ratio", "0.5"],
    "alps-refit-2:4": ["--prune-method", "alps", "--refit", "--sparsity-type", "2:4"],
}


def masks_sha256(path: Path) -> str:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True, help="folder for the run directories and behaviour.json")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--compare", default=None, help="an earlier behaviour.json to compare against")
    args = ap.parse_args()
    out = Path(args.out)
    rows = {}
    for name in args.runs:
        done = prune_run([*RUNS[name], *CPU_PROTOCOL], out / name.replace(":", "of"), args.data_dir)
        record = done.record
        rows[name] = {"command": done.command, "masks_sha256": masks_sha256(done.path / "masks.safetensors"),
                      "perplexity": record["perplexity"], "dense_perplexity": record["dense_perplexity"],
                      "sparsity": record["sparsity"]["overall"]}
        print(f"{name}: {rows[name]['masks_sha256'][:16]} ppl {rows[name]['perplexity']:.4f}", flush=True)
    result = {"rows": rows}
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["rows"]
        result["compared_to"] = args.compare
        result["identical"] = {
            n: before[n]["masks_sha256"] == r["masks_sha256"] and before[n]["perplexity"] == r["perplexity"]
            for n, r in rows.items() if n in before
        }
        for n, same in result["identical"].items():
            print(f"{n}: {'identical' if same else 'DIFFERENT'}")
    write_json(out / "behaviour.json", result)


if __name__ == "__main__":
    main()
