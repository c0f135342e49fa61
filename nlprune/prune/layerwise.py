"""Layer-wise sparsity from the command line's flags: uniform, OWL's plan, or a plan from a file.

``profile_request`` checks the flags (``--sparsity-profile``, ``--owl-m``, ``--owl-lambda``,
``--layer-sparsity``) against each other and the model's config before anything heavy is
loaded; ``build_profile`` then makes the :class:`~nlprune.sparsity.SparsityProfile` the
pipeline prunes with (OWL needs the calibration windows and the dense model for that).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM
from nlprune.prune.owl import OWL_LAMBDA, OWL_M, check_owl_options, owl_profile
from nlprune.sparsity import (
    LINEAR_SUBMODULES,
    PROFILE_CHOICES,
    PatternError,
    SparsityPattern,
    SparsityProfile,
    check_ratio,
    linear_name,
    parse_pattern,
    read_layer_sparsity,
)


def linear_sizes(config: LlamaConfig) -> dict[str, int]:
    """Weights in each prunable linear, by Hugging Face name."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv, i = config.num_key_value_heads * config.head_dim, config.intermediate_size
    shape = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
             "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {linear_name(layer, n): int(np.prod(shape[n])) for layer in range(config.num_hidden_layers)
            for n in LINEAR_SUBMODULES}


@dataclasses.dataclass(frozen=True)
class ProfileRequest:
    """What the flags ask for, checked: ``kind`` is ``uniform``, ``owl`` or ``file``."""

    kind: str
    target: SparsityPattern
    profile: SparsityProfile | None = None  # uniform and file: already built
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    file: dict[str, Any] | None = None  # the file's path and sha256, when the plan came from one
    plan: list[float] | dict[str, float] | None = None  # a file plan as read (list or dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"profile": self.kind}
        if self.kind == "owl":
            out.update(owl_m=self.owl_m, owl_lambda=self.owl_lambda)
        if self.file:
            out["file"] = self.file
        return out


def profile_request(
    config: LlamaConfig | None, sparsity_type: str, sparsity_ratio: float | None, sparsity_profile: str = "uniform",
    owl_m: float | None = None, owl_lambda: float | None = None,
    layer_sparsity: str | Path | list | dict | None = None,
) -> ProfileRequest:
    """Check the sparsity flags together; ``config`` (the model's, without weights) is needed
    only for a non-uniform request (layer counts, linear names)."""
    kind = str(sparsity_profile or "uniform").strip().lower()
    if kind not in PROFILE_CHOICES:
        raise PatternError(f"unknown --sparsity-profile {sparsity_profile!r}; choose one of {', '.join(PROFILE_CHOICES)}.")
    if kind != "owl" and (owl_m is not None or owl_lambda is not None):
        raise PatternError("--owl-m and --owl-lambda apply only with --sparsity-profile owl.")
    if kind == "owl" and layer_sparsity is not None:
        raise PatternError("give --sparsity-profile owl or --layer-sparsity, not both: each plans every layer's ratio.")
    if kind == "uniform" and layer_sparsity is None:
        target = parse_pattern(sparsity_type, sparsity_ratio)
        return ProfileRequest("uniform", target)
    if str(sparsity_type).strip().lower() != "unstructured":
        parse_pattern(sparsity_type, sparsity_ratio)  # an unknown type is named as usual
        flag = "--sparsity-profile owl" if kind == "owl" else "--layer-sparsity"
        raise PatternError(
            f"{flag} plans unstructured ratios per layer; N:M sparsity ({sparsity_type}) stays uniform. "
            "Use --sparsity-type unstructured, or drop the flag."
        )
    if kind == "owl":
        m, lam = check_owl_options(OWL_M if owl_m is None else owl_m, OWL_LAMBDA if owl_lambda is None else owl_lambda)
        return ProfileRequest("owl", parse_pattern("unstructured", sparsity_ratio), owl_m=m, owl_lambda=lam)
    return _file_request(config, sparsity_ratio, layer_sparsity)


def _file_request(config: LlamaConfig, sparsity_ratio: float | None, plan: str | Path | list | dict) -> ProfileRequest:
    file = None
    if isinstance(plan, (str, Path)):
        from nlprune.data.sources import sha256_file

        layers, linears = read_layer_sparsity(plan)
        file = {"path": str(Path(plan).resolve()), "sha256": sha256_file(Path(plan))}
    elif isinstance(plan, list) and plan:
        layers, linears = [check_ratio(r, f"--layer-sparsity: the ratio of layer {i}") for i, r in enumerate(plan)], None
    elif isinstance(plan, dict) and plan:
        layers = None
        linears = {k.removesuffix(".weight"): check_ratio(r, f"--layer-sparsity: the ratio of {k}") for k, r in plan.items()}
    else:
        raise PatternError(f"--layer-sparsity takes a JSON file, a list of ratios or a dict of linear ratios, not {plan!r}.")
    n_layers = config.num_hidden_layers
    linear_ratios = tuple(sorted((linears or {}).items()))
    sizes = linear_sizes(config)
    # Built once with a placeholder target: checks counts and names, and gives the planned overall ratio.
    probe = SparsityProfile(SparsityPattern(0.0), n_layers, None if layers is None else tuple(layers), linear_ratios, "file")
    complete = layers is not None or len(linear_ratios) == len(sizes)
    if not complete and sparsity_ratio is None:
        raise PatternError(
            f"the --layer-sparsity plan names {len(linear_ratios)} of the model's {len(sizes)} linears; give the "
            "others' ratio with --sparsity-ratio."
        )
    if complete:
        overall = probe.planned(sizes)["overall"]
        if sparsity_ratio is not None and abs(overall - sparsity_ratio) > 1e-4:
            raise PatternError(
                f"the --layer-sparsity plan prunes {overall:.4f} of the model overall, but --sparsity-ratio is "
                f"{sparsity_ratio:g}; leave --sparsity-ratio out (the plan sets every ratio) or make them agree."
            )
        target = SparsityPattern(check_ratio(overall, "the plan's overall ratio"))
    else:
        target = parse_pattern("unstructured", sparsity_ratio)
    profile = dataclasses.replace(probe, target=target)
    return ProfileRequest("file", target, profile=profile, file=file, plan=layers if layers is not None else linears)


def build_profile(
    request: ProfileRequest, model: LlamaForCausalLM | None, calibration: np.ndarray, batch_size: int = 8,
    progress: bool = True, mesh: Any = None, num_layers: int | None = None,
) -> tuple[SparsityProfile, dict[str, Any] | None]:
    """The profile to prune with, and OWL's record (None for the others). ``model`` None (a
    streamed run): ``num_layers`` instead; OWL, which runs the whole model, needs the model."""
    n_layers = model.config.num_hidden_layers if model is not None else num_layers
    if request.kind == "uniform":
        return SparsityProfile.uniform(request.target, n_layers), None
    if request.kind == "file":
        return request.profile, None
    return owl_profile(model, calibration, request.target, request.owl_m, request.owl_lambda, batch_size, progress, mesh)
