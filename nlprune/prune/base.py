"""The contract between pruning methods and the pipeline.

The pipeline (:mod:`nlprune.prune.pipeline`) prunes one decoder layer at a time, group by
group, where a group is the linears that read the same input (``INPUT_GROUPS``: q/k/v, o,
gate/up, down). For each group it builds one :class:`GroupContext` and calls
``method.prune_group(ctx)``. The default implementation prunes each weight of the group
from the statistics of its input (``prune_many``), which is all magnitude, Wanda and
SparseGPT need; a method that needs more (the non-linear method's q/k solve, its refits)
overrides ``prune_group`` and reads what it needs from the context. Every hook the pipeline
calls is declared here, with its default.

A method's options are a frozen dataclass (:class:`MethodOptions`), built and validated once
where a run starts (``nlprune.methods.get_method(name, **options)``); the command line's
method flags are generated from its fields. Adding a method is one file:

    @dataclasses.dataclass(frozen=True)
    class MineOptions(MethodOptions):
        alpha: float = option(1.0, "how much alpha")

    @register_method
    class Mine(PruningMethod):
        name = "mine"
        Options = MineOptions

        def _prune(self, weight, stats, pattern):
            ...  # self.options.alpha
            return PruneResult(mask, jnp.where(mask, weight, 0))

plus its import in ``nlprune/methods.py``. ``prune`` / ``prune_many`` validate the inputs and
check the mask invariants (binary, exact count per comparison group, pruned weights exactly 0)
on every result.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import parallel
from nlprune.modeling.llama import DecoderLayer
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import DEFAULT_BLOCKSIZE, SparsityPattern, assert_mask

# Linears that read the same input, pruned together (the keys of DecoderLayer.linear_inputs),
# in the order the pipeline prunes them.
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class PruneResult(NamedTuple):
    """``mask``: bool, True = kept; ``weight``: the updated weight, already times the mask."""

    mask: jax.Array
    weight: jax.Array


# --------------------------------------------------------------------------------------------
# Options: one frozen dataclass per method
# --------------------------------------------------------------------------------------------


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, flag: str | None = None,
           type: type | None = None) -> Any:
    """A field of a method's options: its default and what the command line needs (help text,
    choices, the flag's name when it is not ``--field-name``, the value type when the default is
    None)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "flag": flag, "type": type}
    )


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: the refit every method can take, and the resolution.

    ``refit``: once a group's masks are fixed, its kept weights are re-fitted by least
    squares (:func:`nlprune.prune.refit.refit_group`), the same stages for every method.
    """

    refit: bool = option(
        False, "every method: re-fit the kept weights once the masks are fixed: least squares on the fixed mask "
        "(SparseGPT's update, then --refit-cg conjugate-gradient steps), o_proj and down_proj towards the dense "
        "sublayer's output on the same inputs (nonlinear: q/k by --refit-steps gradient steps instead)",
    )
    refit_cg: int = option(20, "every method --refit: conjugate-gradient steps polishing towards the row-wise "
                               "least squares (20)")
    refit_percdamp: float = option(
        0.01, "every method --refit: damping of the refit's X^T X, a fraction of its mean diagonal: a ridge that "
        "pulls the re-fitted weights towards the unpruned ones (0.01, SparseGPT's)",
    )

    @classmethod
    def build(cls, method: str, **given: Any) -> MethodOptions:
        """Options from the values a user gave (the rest keep their defaults), validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(
                f"pruning method {method!r} got unknown option(s) {unknown}; it accepts: "
                f"{', '.join(sorted(known)) or 'none'}."
            )
        values = cls.resolve(given)
        loose = [f"--{k.replace('_', '-')}" for k in sorted(given) if k.startswith("refit_")]
        if loose and not values.get("refit", False):
            raise ValueError(f"{', '.join(loose)} appl{'ies' if len(loose) == 1 else 'y'} only with --refit")
        options = cls(**values)
        options.validate()
        return options

    @classmethod
    def resolve(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The field values before validation: what was given (a method with presets adds
        them here)."""
        return dict(given)

    def validate(self) -> None:
        """Raise ValueError naming the flag and the fix when a value cannot be used."""
        if isinstance(self.refit_cg, bool) or not isinstance(self.refit_cg, (int, np.integer)) or self.refit_cg < 0:
            raise ValueError(f"--refit-cg must be an integer >= 0, got {self.refit_cg!r}")
        damp = self.refit_percdamp
        if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)) or not (np.isfinite(damp) and damp > 0):
            raise ValueError(f"--refit-percdamp must be a finite number > 0, got {damp!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_type(field: dataclasses.Field) -> type:
    """The value type of an option field (bool, int, float or str)."""
    explicit = field.metadata.get("type")
    if explicit is not None:
        return explicit
    if field.default is None:
        raise TypeError(f"option {field.name} defaults to None: give its type with option(..., type=...)")
    return type(field.default)


def option_flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


# --------------------------------------------------------------------------------------------
# What the pipeline hands a method for one group of one layer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupContext:
    """Everything about one group of one layer that a method may use to prune it.

    ``layer`` is the layer as pruned so far (the groups before this one are done) and
    ``dense_layer`` the layer before any pruning; ``weights`` the group's current weights,
    placed on the mesh for pruning (in the order of ``names``); ``stats`` the statistics of the
    group's input over the calibration windows; ``hidden`` the layer's calibration inputs
    (windows, seq, hidden) with the RoPE tables ``cos``/``sin``; ``batch_size`` the windows per
    forward pass. ``sequential``: the statistics (and ``inputs``) come from the already-pruned
    groups before this one (true-sequential); False: from the dense layer. ``inputs``: the
    group's inputs themselves (windows, seq, features), present when the method asked for
    them (:meth:`PruningMethod.needs_inputs`).
    """

    group: str
    layer: DecoderLayer
    dense_layer: DecoderLayer | None  # None when the method does not read it (needs_dense_layer)
    weights: tuple[jax.Array, ...]
    stats: LayerStats
    pattern: SparsityPattern
    hidden: jax.Array
    cos: jax.Array
    sin: jax.Array
    batch_size: int
    sequential: bool = True
    inputs: jax.Array | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return INPUT_GROUPS[self.group]


# --------------------------------------------------------------------------------------------
# What a method tells the memory plan (nlprune.plan) about itself
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryShape:
    """A planned run as a method's memory hooks see it: the model's config, the calibration
    windows, the mesh's axis sizes and how many devices the windows spread over."""

    config: Any  # nlprune.modeling.llama.LlamaConfig
    nsamples: int
    seqlen: int
    data: int
    model: int
    window_shards: int


@dataclasses.dataclass
class MethodMemory:
    """Bytes per device a method holds at the q/k/v stage beyond the linear pipeline's:
    ``attention`` (the plan's "attention n x n"), a floor on the stage's ``work``, ``hidden``
    states it keeps, and notes for the plan's reader."""

    attention: int = 0
    work: int = 0
    hidden: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The method interface
# --------------------------------------------------------------------------------------------


class PruningMethod(abc.ABC):
    """Base of every method: ``name``, ``Options`` and ``_prune`` (one weight); they may
    override ``_prune_many`` (share work between weights that read the same input, such as
    SparseGPT's inverse Hessian) and the pipeline hooks below."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    uses_hessian: ClassVar[bool] = False  # the method itself prunes from X^T X
    updates_weights: ClassVar[bool] = False  # the kept weights change (not only the mask)
    fills_in: ClassVar[bool] = True  # prunes any linear from its input statistics alone (a fill-in)
    # For nlprune plan: buffers the size of the weights being pruned (all of a shared input's
    # same-shape weights) and of X^T X that the method holds beyond the pipeline's (the
    # pipeline's own counts are the floor: nlprune.plan)
    work_copies: ClassVar[float] = 0.0
    hessian_copies: ClassVar[float] = 0.0

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, not {type(self.options).__name__}")
        self.reports: list[dict[str, Any]] = []  # per-layer diagnostics, recorded in results.json

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Options))

    @classmethod
    def from_options(cls, **given: Any) -> PruningMethod:
        """The method configured with the options a user gave, validated once."""
        return cls(cls.Options.build(cls.name, **given))

    # -- hooks the pipeline calls -------------------------------------------------------------

    @property
    def needs_hessian(self) -> bool:
        """Whether the statistics must carry X^T X: the method's own need, or the refit's."""
        return self.uses_hessian or self.options.refit

    @property
    def needs_dense_layer(self) -> bool:
        """Whether ``ctx.dense_layer`` (the layer before any of its pruning) is read: the refit
        fits towards the dense outputs. Without it the true-sequential pipeline lets each
        pruned linear's dense weights go (a layer's worth of memory on a large model)."""
        return self.options.refit

    def refits_itself(self, group: str) -> tuple[str, ...]:
        """Linears of ``group`` whose kept weights the method re-fits itself under ``refit``
        (the pipeline's least-squares refit leaves them alone)."""
        return ()

    @property
    def kept_weights_damping(self) -> float | None:
        """The damping of the least squares the method's kept weights already solve on their
        masks (SparseGPT's update), or None: the refit then need not redo it at that damping."""
        return None

    def refit_blocksize(self) -> int:
        """Column block width of the least-squares refit."""
        return DEFAULT_BLOCKSIZE

    def needs_inputs(self, group: str) -> bool:
        """Whether ``prune_group`` needs the group's inputs themselves in ``ctx.inputs``."""
        return False

    def comparison_group(self, pattern: SparsityPattern) -> tuple[str, int]:
        """(group, blocksize) in which unstructured masks have an exact count (sparsity.py)."""
        return "row", DEFAULT_BLOCKSIZE

    def check_pattern(self, pattern: SparsityPattern) -> None:
        """Raise PatternError (naming the flag and the fix) if the method cannot prune to
        ``pattern`` with its options; called where a run starts, before anything loads."""

    def shards_rows(self, pattern: SparsityPattern) -> bool:
        """Whether each weight's rows can be pruned apart (rows over the mesh's 'model' axis):
        per-row rankings and N:M; a ranking over blocks of rows or the whole matrix cannot."""
        return pattern.is_nm or self.comparison_group(pattern)[0] == "row"

    def qkv_memory(self, shape: MemoryShape) -> MethodMemory:
        """What pruning q/k/v holds beyond the linear pipeline's statistics and work (nlprune plan)."""
        return MethodMemory()

    def memory_alternatives(self, shape: MemoryShape) -> list[tuple[str, dict[str, Any], str]]:
        """Settings of this method that lower its memory: (the flags, the change, what it does).
        The change names option values (``{"options": {...}}``) or mesh axes (``{"model": 4}``)."""
        return []

    def prune_group(self, ctx: GroupContext) -> dict[str, PruneResult]:
        """Prune the linears of one group: name -> result."""
        return dict(zip(ctx.names, self.prune_many(ctx.weights, ctx.stats, ctx.pattern), strict=True))

    # -- one weight at a time -----------------------------------------------------------------

    @abc.abstractmethod
    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        """Prune one weight; inputs are already validated."""

    def _prune_many(self, weights: Sequence[jax.Array], stats: LayerStats, pattern: SparsityPattern) -> list[PruneResult]:
        return [self._prune(w, stats, pattern) for w in weights]

    def prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern, *, check: bool = True) -> PruneResult:
        """Prune ``weight`` (out, in) given its input's ``stats``."""
        return self.prune_many([weight], stats, pattern, check=check)[0]

    def prune_many(
        self, weights: Sequence[jax.Array], stats: LayerStats, pattern: SparsityPattern, *, check: bool = True
    ) -> list[PruneResult]:
        """Prune several weights that read the same input (hence share ``stats``)."""
        weights = [jnp.asarray(w) for w in weights]
        for i, weight in enumerate(weights):
            self._validate(weight, stats, pattern, f"weight {i} {tuple(weight.shape)}")
        results = self._prune_many(weights, stats, pattern)
        if check:
            group, blocksize = self.comparison_group(pattern)
            for weight, result in zip(weights, results, strict=True):
                check_result(result, weight, pattern, group, blocksize)
        return results

    def _validate(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern, what: str) -> None:
        if weight.ndim != 2:
            raise ValueError(f"{what}: expected an (out, in) matrix, not rank {weight.ndim}.")
        if weight.shape[1] != stats.in_features:
            raise ValueError(
                f"{what} has {weight.shape[1]} input columns but its statistics have "
                f"{stats.in_features} features: pass the statistics of this linear's input."
            )
        pattern.check_width(weight.shape[1], what)
        if self.uses_hessian and not stats.has_hessian:
            raise ValueError(
                f"method {self.name!r} needs the Hessian X^T X: build the statistics with "
                "with_hessian=True (or with_hessian=method.needs_hessian)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


def check_result(
    result: PruneResult,
    weight: jax.Array,
    pattern: SparsityPattern,
    group: str | None = "row",
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> None:
    """chex-checked invariants of one pruned weight (raises AssertionError on a violation):
    a binary mask with exactly the pattern's count per comparison ``group`` (None: a mask
    chosen and counted before, e.g. kept by a refit), pruned weights exactly 0, all finite."""
    mask, pruned = parallel.to_host(result.mask), parallel.to_host(result.weight)  # may be sharded
    chex.assert_shape([mask, pruned], weight.shape)
    chex.assert_equal(mask.dtype, np.dtype(bool), custom_message="mask must be bool")
    chex.assert_equal(pruned.dtype, np.dtype(weight.dtype), custom_message="dtype changed")
    if group is not None:
        assert_mask(mask, pattern, group, blocksize)
    n_nonzero_pruned = int(np.count_nonzero((pruned != 0) & ~mask))
    chex.assert_equal(
        n_nonzero_pruned, 0, custom_message=f"{n_nonzero_pruned} pruned weights are not exactly 0"
    )
    n_bad = int(pruned.size - np.count_nonzero(np.isfinite(pruned)))
    chex.assert_equal(n_bad, 0, custom_message=f"{n_bad} pruned weights are NaN or inf")


# --------------------------------------------------------------------------------------------
# Registry (nlprune.methods imports every method module and is the public entry)
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available to ``get_method(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two pruning methods are named {name!r}: {_REGISTRY[name]} and {cls}.")
    _REGISTRY[name] = cls
    return cls


def registered_methods() -> dict[str, type[PruningMethod]]:
    """The method classes registered so far, by name."""
    return dict(sorted(_REGISTRY.items()))


def fill_in_methods() -> tuple[str, ...]:
    """The registered methods that prune a linear from its input statistics alone: what the
    non-linear method may fill in with."""
    return tuple(name for name, cls in sorted(_REGISTRY.items()) if cls.fills_in)


def method_class(name: str) -> type[PruningMethod]:
    """The class registered as ``name``, or a ValueError listing the known ones."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[key]
