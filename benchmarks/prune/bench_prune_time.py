"""Pruning time of `nlprune prune` on SmolLM2-135M (8 x 512 calibration, all 30 layers), with a
cold and then a warm XLA compilation cache, as the issue's reference figures are measured:
pruning only (results.json's ``prune_seconds``: no model load, evaluation or checkpoint writes).

    .venv/bin/python benchmarks/prune/bench_prune_time.py --data-dir ../shared/data --repeats 2 \
        --output benchmarks/prune/archive/prune_time.json

Each run is its own `nlprune prune` process (common.prune_run; the cpu protocol's calibration,
common.CPU_CALIBRATION; its output discarded). "cold" points NLPRUNE_CACHE_DIR at an empty
folder (no compiled executables, so every jitted function compiles); the warm runs reuse it.
The load average before each run is recorded: on a shared machine, read the times with it.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import CPU_CALIBRATION, machine_line, prune_run, write_json  # noqa: E402

REFERENCE_SECONDS = {"wanda": 22.0, "sparsegpt": 48.0}  # the original PyTorch code, this machine kind


def run(method: str, pattern: str, args, cache: Path, out: Path) -> dict:
    flags = ["--model", args.model, "--prune-method", method, "--sparsity-ratio", "0.5", "--sparsity-type", pattern,
             *CPU_CALIBRATION]
    env = {**os.environ, "NLPRUNE_CACHE_DIR": str(cache)}
    done = prune_run(flags, out, args.data_dir, env=env, log=Path(os.devnull))
    return {"command": done.command, "prune_seconds": done.record["prune_seconds"],
            "load_average_before": done.load_average[0], "layer_seconds": done.record["layer_seconds"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--sparsity-type", default="unstructured")
    ap.add_argument("--repeats", type=int, default=2, help="warm runs per method")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    record = {"machine": machine_line(), "model": args.model, "sparsity_type": args.sparsity_type, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            cache = Path(tmp) / f"cache-{method}"  # a fresh, empty cache per method: cold
            out = Path(tmp) / f"run-{method}"
            cold = run(method, args.sparsity_type, args, cache, out)
            warm = [run(method, args.sparsity_type, args, cache, out) for _ in range(args.repeats)]
            warm_median = statistics.median(w["prune_seconds"] for w in warm)
            ref = REFERENCE_SECONDS.get(method)
            record["methods"][method] = {"cold": cold, "warm": warm, "warm_median_seconds": warm_median,
                                         "reference_seconds": ref}
            print(f"{method:10s} cold {cold['prune_seconds']:.1f} s (load {cold['load_average_before']:.1f})  "
                  f"warm median {warm_median:.1f} s" + (f"  reference {ref:.0f} s: ratio {warm_median / ref:.2f}" if ref else ""),
                  flush=True)
    write_json(args.output, record)


if __name__ == "__main__":
    main()
