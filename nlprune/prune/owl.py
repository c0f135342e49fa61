"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2024), a per-layer sparsity plan.

Layers whose weights carry more outliers are pruned less. One pass of the calibration
windows through the dense model, layer by layer as the pipeline goes, gives each layer's
outlier ratio: the fraction of the Wanda scores |W_ij| * ||x_j|| of its seven linears (taken
together) above ``m`` times their mean. The ratios are mapped linearly onto an interval of
width 2 * lambda, the layer with the most outliers at its low end (pruned least), and shifted
so that their mean is the target: the layers here have equal sizes, so the model-wide
sparsity is the target. (OWL's reference centres the interval on the mean of the mapped
ratios, not on its midpoint, so the extremes are within 2 * lambda of the target, not always
lambda; nlprune does the same.)

nlprune then rounds each layer's ratio to a multiple of 1/g, g the greatest common divisor of
the linears' input widths, distributing the rounding (largest remainders first) so that the
layers' counts sum to the target's: each row of every linear then prunes a whole number of
weights and the measured model-wide sparsity is the target's, not off by the rows' rounding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nlprune import parallel
from nlprune.modeling.forward import embed, rope_tables
from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM
from nlprune.prune.base import INPUT_GROUPS
from nlprune.prune.pipeline import collect_stats, propagate
from nlprune.sparsity import PatternError, SparsityPattern, SparsityProfile

OWL_M = 5.0  # outliers: scores above M times the layer's mean score
OWL_LAMBDA = 0.08  # the layers' ratios spread over an interval of width 2 * lambda


def check_owl_options(m: Any, lam: Any) -> tuple[float, float]:
    """(M, lambda) as floats, or a PatternError naming the flag and its range."""
    for flag, value in (("--owl-m", m), ("--owl-lambda", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
            raise PatternError(f"{flag} must be a number, got {value!r}.")
    if m <= 0:
        raise PatternError(f"--owl-m is {m:g}: outliers are the scores above M times the layer's mean, so M must be > 0 (OWL uses 5).")
    if not 0 <= lam < 1:
        raise PatternError(f"--owl-lambda is {lam:g}, outside [0, 1): it is the spread of the layers' ratios around the target (OWL uses 0.08).")
    return float(m), float(lam)


@jax.jit
def _score_total(weights: tuple[jax.Array, ...], norms: tuple[jax.Array, ...]) -> jax.Array:
    return sum(jnp.sum(jnp.abs(w) * n[None, :]) for w, n in zip(weights, norms))


@jax.jit
def _count_above(weights: tuple[jax.Array, ...], norms: tuple[jax.Array, ...], threshold: jax.Array) -> jax.Array:
    return sum(jnp.sum(jnp.abs(w) * n[None, :] > threshold) for w, n in zip(weights, norms))


def layer_outlier_ratio(weights: list[jax.Array], sq_norms: list[jax.Array], m: float) -> float:
    """Fraction of the Wanda scores |W_ij| * ||x_j|| of ``weights`` (taken together; each with
    its input's squared feature norms) above ``m`` times their mean."""
    weights = tuple(jnp.asarray(w, jnp.float32) for w in weights)
    norms = tuple(jnp.sqrt(jnp.asarray(s, jnp.float32)) for s in sq_norms)
    size = sum(w.size for w in weights)
    mean = _score_total(weights, norms) / size
    return float(_count_above(weights, norms, m * mean)) / size


def outlier_ratios(
    model: LlamaForCausalLM, calibration: np.ndarray, m: float = OWL_M, batch_size: int = 8, progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> list[float]:
    """Each layer's outlier ratio, from the calibration windows passed through the dense
    model layer by layer (every layer sees the dense outputs of the layers before it)."""
    with parallel.use_mesh(mesh):
        calibration = jnp.asarray(calibration, jnp.int32)
        cos, sin = parallel.replicate(rope_tables(model, calibration.shape[1]))
        hidden = parallel.shard_windows(embed(model, calibration))
        ratios = []
        for layer in tqdm(model.model.layers, desc="OWL outlier ratios (dense)", unit="layer", disable=not progress):
            layer = parallel.place_layer(layer)
            stats = collect_stats(layer, hidden, cos, sin, batch_size, with_hessian=False)
            lins = layer.linears()
            weights = [lins[n].weight for names in INPUT_GROUPS.values() for n in names]
            norms = [stats[g].sq_norms for g, names in INPUT_GROUPS.items() for _ in names]
            ratios.append(layer_outlier_ratio(weights, norms, m))
            hidden = propagate(layer, hidden, cos, sin, batch_size)
    return ratios


def owl_layer_ratios(outliers: list[float], target: float, lam: float) -> list[float]:
    """OWL's per-layer sparsity: the outlier ratios mapped linearly onto [0, 2 lambda] (most
    outliers -> most kept), centred on their mean, subtracted from the target."""
    o = np.asarray(outliers, np.float64)
    spread = o.max() - o.min()
    if spread == 0 or lam == 0:
        return [float(target)] * len(o)
    kept_more = (o - o.min()) / spread * 2 * lam
    return [float(r) for r in target - (kept_more - kept_more.mean())]


def ratio_granularity(config: LlamaConfig) -> int:
    """g: a ratio k/g prunes a whole number of weights from every row of every linear."""
    g = math.gcd(config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size)
    return g if g >= 32 else g * math.ceil(32 / g)  # too coarse a grid would undo the plan


def comparison_sizes(config: LlamaConfig, blocksize: int = 128) -> set[int]:
    """Sizes of the comparison groups a mask's count is taken over (rows, whole matrices,
    SparseGPT's column blocks) for every linear shape of ``config``."""
    h, q, i = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    sizes = set()
    for out, width in ((q, h), (kv, h), (h, q), (i, h), (h, i)):
        sizes |= {width, out * width, out * min(blocksize, width), out * (width % blocksize or blocksize)}
    return sizes


def exact_ratio(k: int, g: int, sizes: set[int]) -> float:
    """The float nearest above k/g for which int(size * ratio) is floor(size * k / g) for every
    size (k/g itself can fall a rounding error short of a whole count)."""
    r = k / g
    while any(int(s * r) < s * k // g for s in sizes):
        r = math.nextafter(r, 1.0)
    return r


def realisable_ratios(ratios: list[float], target: float, config: LlamaConfig) -> list[float]:
    """``ratios`` rounded to multiples of 1/g whose counts sum to round(target * g * layers)."""
    g = ratio_granularity(config)
    exact = np.asarray(ratios, np.float64) * g
    k = np.floor(exact).astype(np.int64)
    short = int(round(target * g * len(ratios))) - int(k.sum())
    order = np.argsort(-(exact - k), kind="stable")  # largest remainders first
    if short >= 0:
        k[order[:short]] += 1
    else:
        k[order[::-1][:-short]] -= 1
    sizes = comparison_sizes(config)
    return [exact_ratio(int(kk), g, sizes) for kk in k]


def owl_profile(
    model: LlamaForCausalLM, calibration: np.ndarray, target: SparsityPattern, m: float = OWL_M,
    lam: float = OWL_LAMBDA, batch_size: int = 8, progress: bool = True, mesh: jax.sharding.Mesh | None = None,
) -> tuple[SparsityProfile, dict[str, Any]]:
    """OWL's profile for ``model`` at ``target`` (unstructured), and its record (the outlier
    ratios, OWL's ratios before and after rounding to whole counts)."""
    m, lam = check_owl_options(m, lam)
    if target.is_nm:
        SparsityProfile(target, 1, (target.ratio,), source="owl")  # raises: N:M stays uniform
    outliers = outlier_ratios(model, calibration, m, batch_size, progress, mesh)
    planned = owl_layer_ratios(outliers, target.ratio, lam)
    bad = [(i, r) for i, r in enumerate(planned) if not 0 <= r < 1]
    if bad:
        i, r = bad[0]
        raise PatternError(
            f"OWL's plan puts layer {i} at sparsity {r:.4f}, outside [0, 1) (target {target.ratio:g}, "
            f"--owl-lambda {lam:g}); lower --owl-lambda."
        )
    ratios = realisable_ratios(planned, target.ratio, model.config)
    profile = SparsityProfile(target, len(ratios), tuple(ratios), source="owl")
    record = {"m": m, "lambda": lam, "outlier_ratios": outliers, "owl_ratios": planned,
              "granularity": ratio_granularity(model.config), "ratios": ratios}
    return profile, record
