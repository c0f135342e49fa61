"""Where a prune's time goes: seconds per stage, summed over layers, for any method and options.

    .venv/bin/python benchmarks/profile/profile_prune.py --data-dir ../shared/data --prune-method nonlinear \
        --options '{"recipe": "best"}' --layers 6 --output benchmarks/profile/nonlinear-best.json

Prunes the first --layers decoder layers of the model (the pipeline as `nlprune prune` runs it,
true-sequential, cpu protocol calibration) with a timer around each stage: the pipeline's
batched forwards and statistics, the method's calls (SparseGPT/Wanda prune_many, the non-linear
q/k solve, its gradient refit, the o/down least-squares stages, CG polish). Each timer blocks
until its outputs are ready (JAX dispatches asynchronously) and counts its own time only, not
that of the timed stages inside it. Layer 0 (tracing and compilation) is reported apart.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import inspect
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import write_json  # noqa: E402
from nlprune import api  # noqa: E402
from nlprune.data import calibration_windows  # noqa: E402
from nlprune.methods import get_method  # noqa: E402
from nlprune.nonlinear import method as nonlinear_method  # noqa: E402
from nlprune.prune import LayerStats, pipeline, refit  # noqa: E402
from nlprune.prune.base import PruningMethod  # noqa: E402
from nlprune.sparsity import parse_pattern  # noqa: E402

# (owner, attribute, stage name): the functions timed, looked up where their callers find them
STAGES = [
    (pipeline, "batched", "forward passes (batched)"),  # every forward over the calibration windows
    (LayerStats, "from_chunks", "statistics (norms, X^T X)"),  # its one caller: the pipeline's per-group stats
    (PruningMethod, "prune_many", "linear methods' prune_many"),
    (nonlinear_method, "solve_qk", "nonlinear: q/k mask solve"),
    (nonlinear_method, "refit_attention", "nonlinear: q/k gradient refit"),
    (nonlinear_method, "prune_attention_output", "nonlinear: output-objective solve"),
    (refit, "o_stage", "refit: o_proj stage"),
    (refit, "down_stage", "refit: down_proj stage"),
    (refit, "obs_refit", "refit: least squares on a fixed mask"),
    (refit, "cg_polish", "refit: CG polish"),
]


def _block(out) -> None:
    """Wait for every JAX array in ``out`` (pytrees, NamedTuples and plain dataclasses alike)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    for leaf in jax.tree.leaves(out, is_leaf=lambda x: dataclasses.is_dataclass(x) and not isinstance(x, type)):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
        elif dataclasses.is_dataclass(leaf):
            _block(leaf)


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._stack: list[list[float]] = []  # per open timer: [inner seconds]

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                _block(out)
            finally:
                total = time.perf_counter() - t0
                (inner,) = self._stack.pop()
                self.seconds[name] += total - inner
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][0] += total
            return out

        return timed

    @contextlib.contextmanager
    def installed(self):
        # getattr_static: a classmethod is restored as the classmethod, not as a bound method
        saved = [(owner, attr, inspect.getattr_static(owner, attr)) for owner, attr, _ in STAGES]
        for owner, attr, name in STAGES:
            setattr(owner, attr, self.wrap(getattr(owner, attr), name))
        try:
            yield self
        finally:
            for owner, attr, fn in reversed(saved):
                setattr(owner, attr, fn)

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--prune-method", default="nonlinear")
    ap.add_argument("--options", default="{}", help="the method's options as JSON, e.g. '{\"recipe\": \"best\"}'")
    ap.add_argument("--sparsity-type", default="unstructured")
    ap.add_argument("--sparsity-ratio", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6, help="prune the first N decoder layers")
    ap.add_argument("--output", default=None, help="write the split as JSON here")
    args = ap.parse_args()

    loaded = api.load(args.model)
    model = loaded.model
    if not 2 <= args.layers <= len(model.model.layers):
        raise SystemExit(f"--layers must be in [2, {len(model.model.layers)}], got {args.layers}")
    model = eqx.tree_at(lambda m: m.model.layers, model, list(model.model.layers[: args.layers]))
    windows, _ = calibration_windows(loaded.tokenizer, args.nsamples, args.seqlen, 0, data_dir=args.data_dir,
                                     max_seqlen=model.config.max_position_embeddings)
    pattern = parse_pattern(args.sparsity_type, args.sparsity_ratio if args.sparsity_type == "unstructured" else None)
    options = json.loads(args.options)

    timers = Timers()
    per_layer: list[dict[str, float]] = []

    def on_layer_done(i, _model, _hidden):
        per_layer.append(timers.snapshot())

    with timers.installed():
        _, report = pipeline.prune_model(model, windows, get_method(args.prune_method, **options), pattern,
                                         on_layer_done=on_layer_done)
    # seconds of each stage in layer 0 and in the layers after it
    first = per_layer[0]
    rest = {k: timers.seconds[k] - first.get(k, 0.0) for k in timers.seconds}
    layer_s = report.layer_seconds
    rows = []
    for _, _, name in STAGES:
        if name in timers.seconds:
            rows.append({"stage": name, "layer0_s": first.get(name, 0.0), "per_layer_s": rest[name] / (len(layer_s) - 1),
                         "calls_per_layer": timers.calls[name] / len(layer_s)})
    untimed0 = layer_s[0] - sum(first.values())
    untimed = (sum(layer_s[1:]) - sum(rest.values())) / (len(layer_s) - 1)
    rows.append({"stage": "untimed (dispatch, set_linears, Python)", "layer0_s": untimed0, "per_layer_s": untimed,
                 "calls_per_layer": None})
    mean_rest = sum(layer_s[1:]) / (len(layer_s) - 1)
    print(f"{args.prune_method} {options} {pattern.name}: layer 0 {layer_s[0]:.2f} s, "
          f"layers 1-{len(layer_s) - 1} {mean_rest:.2f} s each (mean)")
    print("| stage | layer 0 s | s per later layer | share | calls per layer |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["per_layer_s"]):
        calls = "-" if r["calls_per_layer"] is None else f"{r['calls_per_layer']:.0f}"
        print(f"| {r['stage']} | {r['layer0_s']:.2f} | {r['per_layer_s']:.3f} | "
              f"{r['per_layer_s'] / mean_rest:.0%} | {calls} |")
    write_json(args.output, {"command_args": vars(args), "layer_seconds": layer_s, "stages": rows,
                             "devices": [str(d) for d in jax.devices()]})


if __name__ == "__main__":
    main()
