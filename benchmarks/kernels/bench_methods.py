"""Time each pruning method on SmolLM2-135M-shaped matrices with random calibration data.

Per decoder layer: q (576x576), k and v (192x576) read the attention input; o (576x576) the
attention output; gate and up (1536x576) the MLP input; down (576x1536) the MLP hidden
state. Each input has 8 windows x 512 = 4096 calibration tokens. One "layer" = building each
input's statistics (X^T X only if the method needs it) + pruning its weights with
``prune_many``, as the pipeline does. Reports the median of ``--repeats`` runs after a
warm-up (which compiles), and the 30-layer extrapolation.

    python benchmarks/kernels/bench_methods.py [--methods wanda sparsegpt] [--sparsity-type 2:4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from nlprune.methods import available_methods, get_method
from nlprune.prune import LayerStats
from nlprune.sparsity import parse_pattern

HIDDEN, KV, INTERMEDIATE = 576, 192, 1536
N_LAYERS = 30
TOKENS = 8 * 512

# input name -> (input width, weight shapes reading it)
LAYER = {
    "attn_in": (HIDDEN, [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN)]),  # q, k, v
    "attn_out": (HIDDEN, [(HIDDEN, HIDDEN)]),  # o
    "mlp_in": (HIDDEN, [(INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN)]),  # gate, up
    "mlp_mid": (INTERMEDIATE, [(HIDDEN, INTERMEDIATE)]),  # down
}


def random_layer(seed: int) -> dict[str, tuple[jax.Array, list[jax.Array]]]:
    """Activations with a few large-scale features (like real LLM inputs), and weights."""
    rng = np.random.default_rng(seed)
    layer = {}
    for name, (width, shapes) in LAYER.items():
        scale = np.exp(rng.normal(0.0, 1.0, width)).astype(np.float32)
        x = rng.standard_normal((TOKENS, width), dtype=np.float32) * scale
        weights = [jax.device_put(0.02 * rng.standard_normal(s, dtype=np.float32)) for s in shapes]
        layer[name] = (jax.device_put(x), weights)
    return layer


def prune_layer(method, layer, pattern, check: bool) -> list:
    results = []
    for x, weights in layer.values():
        stats = LayerStats.from_inputs(x, with_hessian=method.needs_hessian)
        results += method.prune_many(weights, stats, pattern, check=check)
    return jax.block_until_ready(results)


def time_method(name: str, layer, pattern, repeats: int, check: bool) -> tuple[float, list[float]]:
    """(first-layer seconds, compiles included; seconds of each later run)."""
    method = get_method(name)
    times = []
    for _ in range(repeats + 1):  # the first run compiles every shape once
        start = time.perf_counter()
        prune_layer(method, layer, pattern, check)
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(available_methods()))
    parser.add_argument("--sparsity-type", default="unstructured")
    parser.add_argument("--sparsity-ratio", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-check", action="store_true", help="skip the invariant checks")
    args = parser.parse_args()
    ratio = args.sparsity_ratio
    if args.sparsity_type == "unstructured" and ratio is None:
        ratio = 0.5
    pattern = parse_pattern(args.sparsity_type, ratio)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; pattern {pattern.name} "
          f"ratio {pattern.ratio:g}; {TOKENS} calibration tokens; checks "
          f"{'off' if args.no_check else 'on'}")
    layer = random_layer(0)
    print(f"{'method':<10} {'per layer (s)':>14} {'min':>7} {'max':>7} {N_LAYERS:>3}-layer (s) "
          f"{'first layer, compiling (s)':>27}")
    for name in args.methods:
        first, times = time_method(name, layer, pattern, args.repeats, not args.no_check)
        median = statistics.median(times)
        print(f"{name:<10} {median:>14.3f} {min(times):>7.3f} {max(times):>7.3f} "
              f"{N_LAYERS * median:>12.2f} {first:>27.2f}")


if __name__ == "__main__":
    main()
