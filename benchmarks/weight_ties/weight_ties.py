"""How many of the default model's weights tie in magnitude: SmolLM2-135M-Instruct ships as a
Q4_1 GGUF (4-bit, 16 levels per block of 32 weights) that nlprune dequantises to float32, so
many weights of a row share their exact |w|. Magnitude-style scores then rank ties by position.

    .venv/bin/python benchmarks/weight_ties/weight_ties.py --out benchmarks/weight_ties/weight_ties.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import write_json  # noqa: E402
from nlprune import cards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/weight_ties/weight_ties.json")
    args = ap.parse_args()
    model = cards.load_model(cards.resolve_model(args.model))
    per_linear, total, tied, distinct = {}, 0, 0, 0
    for i, layer in enumerate(model.model.layers):
        for name, lin in layer.linears().items():
            w = np.sort(np.abs(np.asarray(lin.weight)), axis=1)
            same = np.zeros(w.shape, bool)  # equal to a neighbour in the sorted row = tied
            same[:, 1:] |= w[:, 1:] == w[:, :-1]
            same[:, :-1] |= w[:, 1:] == w[:, :-1]
            new = np.ones(w.shape, bool)
            new[:, 1:] = w[:, 1:] != w[:, :-1]
            per_linear[f"{i}.{name}"] = float(same.mean())
            total, tied, distinct = total + w.size, tied + int(same.sum()), distinct + int(new.sum())
    record = {"model": args.model, "weights": total, "tied_share": tied / total,
              "distinct_per_row_share": distinct / total, "tied_share_per_linear": per_linear,
              "what": "share of weights whose |w| equals another |w| of the same row (exact float32 equality)"}
    print(f"{args.model}: {tied / total:.1%} of the weights tie in |w| with another weight of their row; "
          f"distinct |w| per row: {distinct / total:.1%} of the row")
    write_json(args.out, record)


if __name__ == "__main__":
    main()
