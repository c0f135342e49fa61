"""Sparsity patterns: which entries of a score matrix survive (the ground floor of pruning).

Every pruning method reduces to "score each weight, keep the best". This module owns the
second half: turning scores into an exact binary mask for a pattern, and checking masks.

Conventions (shared by every method):
  * scores and weights are shaped like Hugging Face's ``nn.Linear.weight``: (out, in).
  * higher score = more important = kept.
  * ``unstructured`` at ratio r prunes exactly ``int(r * group_size)`` entries of each
    comparison group; N:M keeps exactly N of every M consecutive input columns in each row.
  * comparison groups of unstructured sparsity:
      - ``row``: each output row (Magnitude's default, Wanda);
      - ``matrix``: the whole matrix;
      - ``block``: each slab of all rows x ``blocksize`` consecutive input columns (SparseGPT
        selects its mask block by block; a last, narrower slab keeps its own
        ``int(r * rows * width)`` count).
  * ties are broken by position: the earlier entry is pruned first, so counts are exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np

PATTERN_CHOICES = ("unstructured", "2:4", "4:8")
GROUP_CHOICES = ("row", "matrix", "block")
DEFAULT_BLOCKSIZE = 128  # SparseGPT's column-block width


class PatternError(ValueError):
    """A sparsity ratio or pattern that cannot be honoured."""


@dataclasses.dataclass(frozen=True)
class SparsityPattern:
    """Unstructured at ``ratio``, or N:M (keep ``n`` of every ``m`` along the input axis)."""

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def __post_init__(self):
        if not (0.0 <= self.ratio < 1.0):
            raise PatternError(
                f"sparsity ratio {self.ratio} is outside [0, 1): it is the fraction of weights "
                "removed, e.g. 0.5 for half."
            )
        if self.is_nm:
            if not (self.m and 0 < self.n < self.m):
                raise PatternError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M.")
            implied = 1.0 - self.n / self.m
            if abs(self.ratio - implied) > 1e-9:
                raise PatternError(
                    f"sparsity type {self.n}:{self.m} removes {implied:g} of the weights, but "
                    f"--sparsity-ratio is {self.ratio:g}; pass --sparsity-ratio {implied:g} "
                    "or leave it out."
                )

    def check_width(self, in_features: int, what: str = "weight") -> None:
        if self.is_nm and in_features % self.m:
            raise PatternError(
                f"{self.n}:{self.m} sparsity needs the input width to be a multiple of "
                f"{self.m}, but {what} has {in_features} input columns."
            )


def parse_pattern(sparsity_type: str, ratio: float | None = None) -> SparsityPattern:
    """``"unstructured"`` with a ratio, or ``"N:M"`` (ratio optional, implied by N:M)."""
    sparsity_type = sparsity_type.strip().lower()
    if sparsity_type == "unstructured":
        if ratio is None:
            raise PatternError("unstructured sparsity needs a ratio, e.g. --sparsity-ratio 0.5.")
        return SparsityPattern(float(ratio))
    match = re.fullmatch(r"(\d+):(\d+)", sparsity_type)
    if not match:
        raise PatternError(
            f"unknown sparsity type {sparsity_type!r}; use 'unstructured' or N:M such as "
            f"{', '.join(PATTERN_CHOICES[1:])}."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PatternError(f"N:M pattern {n}:{m} needs 0 < N < M.")
    implied = 1.0 - n / m
    return SparsityPattern(implied if ratio is None else float(ratio), n, m)


def sortable_keys(scores: jax.Array) -> jax.Array:
    """int32 keys with the same order as the float32 scores (IEEE bits, negatives flipped)."""
    scores = scores.astype(jnp.float32)
    scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 ties with +0.0, as in a sort
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _count_dtype(width: int) -> jnp.dtype:
    """float32 counts are exact below 2**24 and reduce faster than int32 on CPU."""
    return jnp.float32 if width < 2**24 else jnp.int32


def _kth_smallest_key(keys: jax.Array, k: int | jax.Array) -> jax.Array:
    """Per row of ``keys`` (last axis), the k-th smallest value (1-based), by bisection.

    ~30 vectorised counting passes instead of a full sort per row (slower on CPU).
    """
    count_dtype = _count_dtype(keys.shape[-1])
    lo, hi = keys.min(-1), keys.max(-1)

    def still_open(bounds):
        lo, hi = bounds
        return jnp.any(lo < hi)

    def halve(bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        at_or_below = jnp.where(keys <= mid[..., None], 1, 0).astype(count_dtype).sum(-1)
        enough = at_or_below >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.while_loop(still_open, halve, (lo, hi))
    return lo


def keep_top_k_last_axis(scores: jax.Array, n_prune: int | jax.Array) -> jax.Array:
    """Boolean mask that drops exactly the ``n_prune`` lowest scores along the last axis.

    Ties are broken by position (the earlier index is pruned first) so the count is exact.
    ``n_prune`` may be a traced integer (SparseGPT's last, padded block prunes more).
    """
    width = scores.shape[-1]
    if isinstance(n_prune, int) and n_prune == 0:
        return jnp.ones(scores.shape, bool)
    if isinstance(n_prune, int) and n_prune >= width:
        return jnp.zeros(scores.shape, bool)
    keys = sortable_keys(scores)
    if width <= 16:
        # N:M groups: an M x M comparison table is cheaper than sorting many tiny rows.
        earlier = jnp.tril(jnp.ones((width, width), bool), k=-1)  # earlier[i, j] = j < i
        lower = (keys[..., None, :] < keys[..., :, None]) | (
            (keys[..., None, :] == keys[..., :, None]) & earlier
        )
        return lower.sum(-1) >= n_prune
    count_dtype = _count_dtype(width)
    threshold = _kth_smallest_key(keys, n_prune)[..., None]
    below = keys < threshold
    tied = keys == threshold
    n_tied_needed = n_prune - below.astype(count_dtype).sum(-1, keepdims=True)

    def first_tied_only():  # a cumsum is slow on CPU: skip it when no row has excess ties
        return tied & (jnp.cumsum(tied.astype(count_dtype), -1) <= n_tied_needed)

    excess_ties = jnp.any(tied.astype(count_dtype).sum(-1, keepdims=True) > n_tied_needed)
    pruned = below | jax.lax.cond(excess_ties, first_tied_only, lambda: tied)
    return ~pruned


def block_bounds(in_features: int, blocksize: int) -> list[tuple[int, int]]:
    """(start, end) of SparseGPT's column blocks; the last one may be narrower."""
    if blocksize < 1:
        raise PatternError(f"blocksize must be a positive number of columns, got {blocksize}.")
    return [(s, min(s + blocksize, in_features)) for s in range(0, in_features, blocksize)]


def mask_from_scores(
    scores: jax.Array,
    pattern: SparsityPattern,
    group: str = "row",
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> jax.Array:
    """Binary (bool) mask of ``scores``' shape keeping the highest scores under ``pattern``.

    ``group`` is the comparison group of unstructured sparsity: each output ``row`` (Wanda),
    the whole ``matrix``, or each ``block`` of ``blocksize`` input columns over all rows
    (SparseGPT). N:M is always per row, in consecutive groups of M columns.
    Works on any leading batch axes: the last two are (out, in).
    """
    out_f, in_f = scores.shape[-2:]
    if pattern.is_nm:
        pattern.check_width(in_f)
        grouped = scores.reshape(*scores.shape[:-1], in_f // pattern.m, pattern.m)
        return keep_top_k_last_axis(grouped, pattern.m - pattern.n).reshape(scores.shape)
    if group == "row":
        return keep_top_k_last_axis(scores, int(in_f * pattern.ratio))
    if group == "matrix":
        flat = scores.reshape(*scores.shape[:-2], out_f * in_f)
        return keep_top_k_last_axis(flat, int(out_f * in_f * pattern.ratio)).reshape(scores.shape)
    if group == "block":
        return jnp.concatenate(
            [
                mask_from_scores(scores[..., start:end], pattern, "matrix")
                for start, end in block_bounds(in_f, blocksize)
            ],
            axis=-1,
        )
    raise PatternError(f"unknown comparison group {group!r}; use one of {GROUP_CHOICES}.")


def pruned_per_group(
    shape: tuple[int, ...],
    pattern: SparsityPattern,
    group: str,
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> int:
    """How many entries each comparison group loses (for ``block``: a full-width block)."""
    out_f, in_f = shape[-2:]
    if pattern.is_nm:
        return pattern.m - pattern.n
    if group == "row":
        return int(in_f * pattern.ratio)
    if group == "matrix":
        return int(out_f * in_f * pattern.ratio)
    if group == "block":
        return int(out_f * min(blocksize, in_f) * pattern.ratio)
    raise PatternError(f"unknown comparison group {group!r}; use one of {GROUP_CHOICES}.")


def _pruned_and_wanted(
    keep: np.ndarray, pattern: SparsityPattern, group: str, blocksize: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per comparison group: how many entries the mask prunes, and how many it should."""
    out_f, in_f = keep.shape
    if pattern.is_nm:
        pattern.check_width(in_f, "the mask")
        pruned = (~keep).reshape(out_f, in_f // pattern.m, pattern.m).sum(-1).ravel()
        return pruned, np.full(pruned.shape, pattern.m - pattern.n)
    if group == "row":
        return (~keep).sum(-1), np.full(out_f, int(in_f * pattern.ratio))
    if group == "matrix":
        return np.array([(~keep).sum()]), np.array([int(out_f * in_f * pattern.ratio)])
    if group == "block":
        bounds = block_bounds(in_f, blocksize)
        pruned = np.array([(~keep[:, s:e]).sum() for s, e in bounds])
        return pruned, np.array([int(out_f * (e - s) * pattern.ratio) for s, e in bounds])
    raise PatternError(f"unknown comparison group {group!r}; use one of {GROUP_CHOICES}.")


def assert_mask(
    mask, pattern: SparsityPattern, group: str = "row", blocksize: int = DEFAULT_BLOCKSIZE
) -> None:
    """chex-checked invariants: binary, and exactly the asked count pruned per group."""
    mask = np.asarray(mask)
    chex.assert_rank(mask, 2)
    binary = mask.dtype == bool or bool(np.isin(mask, (0, 1)).all())
    chex.assert_equal(bool(binary), True, custom_message="mask is not binary")
    pruned, want = _pruned_and_wanted(mask.astype(bool), pattern, group, blocksize)
    bad = np.flatnonzero(pruned != want)
    where = f"per {group}" + (f" of {blocksize} columns" if group == "block" else "")
    chex.assert_equal(
        bad.size,
        0,
        custom_message=(
            f"{pattern.name} at ratio {pattern.ratio:g} {where}: expected "
            f"{want[bad[:5]].tolist()} pruned, got {pruned[bad[:5]].tolist()} in groups "
            f"{bad[:5].tolist()}"
        ),
    )


# --------------------------------------------------------------------------------------------
# Profiles: a pattern per (layer, linear)
# --------------------------------------------------------------------------------------------

# The prunable linears of a decoder layer and the submodule each sits in (Hugging Face names).
LINEAR_SUBMODULES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
PROFILE_CHOICES = ("uniform", "owl")


def linear_name(layer: int, linear: str) -> str:
    """The Hugging Face name of a linear, e.g. ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{layer}.{LINEAR_SUBMODULES[linear]}.{linear}"


def check_ratio(value: object, what: str) -> float:
    """A sparsity ratio: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PatternError(f"{what} must be a number in [0, 1), got {value!r}.")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise PatternError(f"{what} is {value:g}, outside [0, 1): a ratio is the fraction of weights removed.")
    return value


@dataclasses.dataclass(frozen=True)
class SparsityProfile:
    """The sparsity pattern of every prunable linear of a model: (layer, linear) -> pattern.

    ``target`` is the run's pattern, kept wherever nothing else is planned. ``layer_ratios``
    (one unstructured ratio per decoder layer: OWL's plan, or a --layer-sparsity list) and
    ``linear_ratios`` (ratios by Hugging Face linear name, which win over the layer's) make the
    profile non-uniform; both are unstructured only (an N:M target stays uniform). ``source``
    says where the plan came from: ``uniform``, ``owl`` or ``file``.
    """

    target: SparsityPattern
    num_layers: int
    layer_ratios: tuple[float, ...] | None = None
    linear_ratios: tuple[tuple[str, float], ...] = ()
    source: str = "uniform"

    def __post_init__(self):
        if not self.is_uniform and self.target.is_nm:
            raise PatternError(
                f"per-layer and per-linear sparsity (--sparsity-profile owl, --layer-sparsity) is unstructured "
                f"only: {self.target.name} stays uniform; use --sparsity-type unstructured or drop the profile."
            )
        if self.layer_ratios is not None:
            if len(self.layer_ratios) != self.num_layers:
                raise PatternError(
                    f"the layer sparsity plan has {len(self.layer_ratios)} ratios but the model has "
                    f"{self.num_layers} layers; give one ratio per layer."
                )
            for i, r in enumerate(self.layer_ratios):
                check_ratio(r, f"the sparsity ratio of layer {i}")
        valid = {linear_name(i, n) for i in range(self.num_layers) for n in LINEAR_SUBMODULES}
        for name, r in self.linear_ratios:
            if name not in valid:
                raise PatternError(
                    f"unknown linear {name!r} in the layer sparsity plan; names are Hugging Face's, e.g. "
                    f"{linear_name(0, 'q_proj')!r}, for layers 0..{self.num_layers - 1} and linears "
                    f"{', '.join(LINEAR_SUBMODULES)}."
                )
            check_ratio(r, f"the sparsity ratio of {name}")

    @classmethod
    def uniform(cls, target: SparsityPattern, num_layers: int) -> SparsityProfile:
        return cls(target, num_layers)

    @property
    def is_uniform(self) -> bool:
        return self.layer_ratios is None and not self.linear_ratios

    def ratio(self, layer: int, linear: str) -> float:
        """The fraction of ``linear`` (short name, e.g. ``q_proj``) of ``layer`` to prune."""
        by_name = dict(self.linear_ratios)
        name = linear_name(layer, linear)
        if name in by_name:
            return by_name[name]
        return self.target.ratio if self.layer_ratios is None else self.layer_ratios[layer]

    def pattern(self, layer: int, linear: str) -> SparsityPattern:
        if self.is_uniform:
            return self.target
        ratio = self.ratio(layer, linear)
        return self.target if ratio == self.target.ratio else SparsityPattern(ratio)

    def layer_patterns(self, layer: int) -> dict[str, SparsityPattern]:
        """Every prunable linear of ``layer`` (short names) -> its pattern."""
        return {n: self.pattern(layer, n) for n in LINEAR_SUBMODULES}

    def planned(self, sizes: dict[str, int]) -> dict[str, object]:
        """The planned ratios, weighted by ``sizes`` (weights per linear, Hugging Face names):
        per layer, overall, and per linear where the plan names linears."""
        per_layer, total, removed = [], 0, 0.0
        for i in range(self.num_layers):
            n = [sizes[linear_name(i, lin)] for lin in LINEAR_SUBMODULES]
            r = [self.ratio(i, lin) for lin in LINEAR_SUBMODULES]
            per_layer.append(float(np.dot(n, r) / sum(n)))
            total, removed = total + sum(n), removed + float(np.dot(n, r))
        out: dict[str, object] = {"profile": self.source, "target": self.target.ratio,
                                  "per_layer": per_layer, "overall": removed / total}
        if self.linear_ratios:
            out["per_linear"] = dict(self.linear_ratios)
        return out


def read_layer_sparsity(path: str | Path) -> tuple[list[float] | None, dict[str, float] | None]:
    """A --layer-sparsity file: a JSON list (one ratio per decoder layer) or a JSON object
    (Hugging Face linear name -> ratio; a ``.weight`` suffix is allowed). Every ratio must be
    in [0, 1); the counts and names are checked against the model by :class:`SparsityProfile`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--layer-sparsity file {path} does not exist.")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise PatternError(f"--layer-sparsity file {path} is not JSON ({e}); give a list of ratios or an object.") from None
    if isinstance(value, list):
        if not value:
            raise PatternError(f"--layer-sparsity file {path} holds an empty list; give one ratio per layer.")
        return [check_ratio(r, f"{path}: the ratio of layer {i}") for i, r in enumerate(value)], None
    if isinstance(value, dict) and value:
        out = {}
        for name, r in value.items():
            key = name[: -len(".weight")] if name.endswith(".weight") else name
            out[key] = check_ratio(r, f"{path}: the ratio of {name}")
        return None, out
    raise PatternError(
        f"--layer-sparsity file {path} must hold a list of ratios (one per layer) or an object of "
        f"linear name -> ratio, not {type(value).__name__} {str(value)[:40]!r}."
    )
