"""Masks on a device mesh against one device, on the real model (issue 16): SmolLM2-135M, cpu
protocol, Wanda and SparseGPT at 50%, pruned on one device and on 4 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4: the default mesh, every device on 'data',
and data=2,model=2). Counts the mask entries that differ from the one-device run and, when any
do, the C4 perplexity of both.

    .venv/bin/python benchmarks/mesh/mesh_masks.py --data-dir ../shared/data --out benchmarks/mesh

Why they can differ: the statistics' sums over tokens run in another order on a mesh (per
device, then across devices), the forwards run on other batch shapes, and the Q4_1-quantised
weights hold many exactly equal magnitudes, so a last-bit difference can reorder a tie; a
flipped entry changes the next layer's inputs, so flips propagate.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import CPU_CALIBRATION, prune_run, write_json  # noqa: E402

MESHES = {"one-device": None, "data=4": "", "data=2,model=2": "data=2,model=2"}


def prune(method: str, mesh: str | None, out: Path, data_dir: str, evaluate: bool) -> dict:
    name = "one" if mesh is None else (mesh.replace(",", "_").replace("=", "") or "default")
    env = dict(os.environ)
    flags = ["--prune-method", method, "--sparsity-ratio", "0.5", *CPU_CALIBRATION, *(["--eval"] if evaluate else [])]
    if mesh is not None:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
        env["JAX_PLATFORMS"] = "cpu"
        flags += ["--mesh", mesh]
    done = prune_run(flags, out / "runs" / f"{method}-{name}", data_dir, env=env)
    return {"run": str(done.path), "record": done.record}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/mesh")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    args = ap.parse_args()
    from nlprune.packed_masks import load_packed_masks

    out = Path(args.out)
    rows, one_device_ppl = [], {}
    for method in args.methods:
        ref = prune(method, None, out, args.data_dir, evaluate=False)
        ref_masks = load_packed_masks(Path(ref["run"]) / "masks.safetensors")
        for name, mesh in MESHES.items():
            if mesh is None:
                continue
            got = prune(method, mesh, out, args.data_dir, evaluate=False)
            masks = load_packed_masks(Path(got["run"]) / "masks.safetensors")
            differ = int(sum(np.count_nonzero(masks[k] != ref_masks[k]) for k in ref_masks))
            total = int(sum(m.size for m in ref_masks.values()))
            first = next((k for k in ref_masks if np.any(masks[k] != ref_masks[k])), None)
            row = {"method": method, "mesh": name, "entries_differ": differ, "entries": total,
                   "fraction": differ / total, "first_differing_linear": first,
                   "devices": got["record"]["mesh"]["devices"]}
            if differ:
                row["perplexity"] = prune(method, mesh, out, args.data_dir, evaluate=True)["record"]["perplexity"]
                if method not in one_device_ppl:
                    one_device_ppl[method] = prune(method, None, out, args.data_dir, evaluate=True)["record"]["perplexity"]
                row["perplexity_one_device"] = one_device_ppl[method]
            rows.append(row)
            print(row, flush=True)
    write_json(out / "mesh_masks.json", {"rows": rows})


if __name__ == "__main__":
    main()
