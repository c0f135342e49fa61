"""Wall time of a sharded vs a one-device `nlprune prune` of SmolLM2-135M (wanda, sparsegpt).

    .venv/bin/python benchmarks/sharding/bench_sharding.py --data-dir ../shared/data

Each run is its own `nlprune prune` process (common.prune_run); the sharded ones see 4 simulated
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, set before JAX starts) and run with
--mesh data=2,model=2 and --mesh model=4. On a CPU with few cores the 4 "devices" share the
same cores, so this measures the overhead of sharding (partitioned programs, collectives,
resharding), not a speed-up. Per configuration: one warm-up run (fills the persistent
compilation cache), then --repeats timed runs; the table gives medians of `prune_seconds`
(pruning only) and of the whole process. The load average is recorded: the machine may be
shared. Writes OUT/results.json and OUT/table.md.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import prune_run  # noqa: E402

CONFIGS = [("one device", None, 1), ("data=2,model=2", "data=2,model=2", 4), ("model=4", "model=4", 4)]


def run(method: str, mesh: str | None, devices: int, args, out: Path) -> dict:
    flags = ["--model", args.model, "--prune-method", method, "--sparsity-ratio", "0.5",
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--mesh", mesh or "data=1"]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = prune_run(flags, out, args.data_dir, env=env)
    rec = done.record
    return {
        "command": ("XLA_FLAGS=" + env["XLA_FLAGS"] + " " if devices > 1 else "") + done.command,
        "prune_seconds": rec["prune_seconds"], "wall_seconds": done.wall_seconds, "load_before": done.load_average[0],
        "load_after": done.load_average[1], "mesh": rec["mesh"], "peak_rss_bytes": rec["peak_rss_bytes"],
        "overall_sparsity": rec["sparsity"]["overall"], "attention_error": rec.get("attention_error", {}).get("mean"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/sharding")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for method in args.methods:
        for label, mesh, devices in CONFIGS:
            folder = out / "runs" / f"{method}-{label.replace(' ', '-').replace(',', '_').replace('=', '')}"
            print(f"{method} on {label}: warm-up", flush=True)
            run(method, mesh, devices, args, folder)
            runs = []
            for r in range(args.repeats):
                runs.append(run(method, mesh, devices, args, folder))
                print(f"  run {r + 1}: prune {runs[-1]['prune_seconds']:.1f} s, process {runs[-1]['wall_seconds']:.1f} s "
                      f"(load {runs[-1]['load_before']:.2f})", flush=True)
            rows.append({
                "method": method, "mesh": label, "devices": devices, "runs": runs,
                "prune_seconds_median": statistics.median(r["prune_seconds"] for r in runs),
                "wall_seconds_median": statistics.median(r["wall_seconds"] for r in runs),
            })
    record = {
        "what": "nlprune prune of SmolLM2-135M, sharded on 4 simulated CPU devices vs one device",
        "nsamples": args.nsamples, "seqlen": args.seqlen, "repeats": args.repeats,
        "cpu_cores": os.cpu_count(), "note": "the simulated devices share the machine's cores: overhead, not speed-up",
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    base = {r["method"]: r for r in rows if r["devices"] == 1}
    lines = [
        f"| method | mesh | devices | prune s (median of {args.repeats}) | vs one device | process s | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["prune_seconds_median"] / base[r["method"]]["prune_seconds_median"]
        load = statistics.mean(x["load_before"] for x in r["runs"])
        lines.append(f"| {r['method']} | {r['mesh']} | {r['devices']} | {r['prune_seconds_median']:.1f} | "
                     f"{ratio:.2f}x | {r['wall_seconds_median']:.1f} | {load:.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
