"""Wall time of the main job, `bash scripts/main.sh`, as a new user meets it (issue 17).

"cold" runs with an empty NLPRUNE_CACHE_DIR: no XLA compilation cache and no cached dense
perplexity, as on a fresh clone after set-up; "warm" runs the same command again on that
cache. Set-up itself (`scripts/setup.sh`, which main.sh calls first) is already done, so its
check is included but no install. The record holds each run's wall seconds, the prune seconds
and evaluation seconds from its results.json, and the load average around it.

    .venv/bin/python benchmarks/main_job/main_job_time.py --output benchmarks/main_job/main_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import machine_line, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run(cache: Path, out: Path) -> dict:
    env = {**os.environ, "NLPRUNE_CACHE_DIR": str(cache)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(["bash", "scripts/main.sh", "--output", str(out)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rec = json.loads((out / "results.json").read_text())
    per = rec.get("perplexities", {}).get("c4", {})
    return {"wall_seconds": wall, "prune_seconds": rec["prune_seconds"], "eval_seconds": per.get("seconds"),
            "dense_cached": per.get("dense_cache", {}).get("cached"), "perplexity": rec.get("perplexity"),
            "method": rec["args"]["prune_method"], "options": rec["args"]["options"],
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="benchmarks/main_job/main_job.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "run"
        cold = run(cache, out)
        print(f"cold: {cold['wall_seconds']:.0f} s wall (prune {cold['prune_seconds']:.0f} s)", flush=True)
        warm = run(cache, out)
        print(f"warm: {warm['wall_seconds']:.0f} s wall (prune {warm['prune_seconds']:.0f} s)", flush=True)
    write_json(Path(args.output), {"command": "bash scripts/main.sh", "cold": cold, "warm": warm,
                                   "machine": machine_line()})


if __name__ == "__main__":
    main()
