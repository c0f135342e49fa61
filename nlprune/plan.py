"""Memory planning: the peak memory per device of `nlprune prune`, from the config alone.

``plan_memory(config, method=..., nsamples=..., seqlen=..., data=..., model=...)`` walks the
pipeline's stages for the last decoder layer (where the most pruned layers are held) and adds
up, per device, what each stage holds in float32:

  weights       the dense model (linears' rows over 'model', the rest replicated) and the
                pruned linears so far (weight + boolean mask each), in --dtype's precision
                (float32 or bfloat16) and the layer being pruned as a float32 copy;
  hidden states the calibration windows' hidden states (windows over 'data'): the layer's
                input, and the intermediates the true-sequential order keeps;
  activations   one forward batch's temporaries: the attention scores (windows x heads x
                seq x seq), the MLP's gate/up outputs;
  Hessians      X^T X of the group being pruned (SparseGPT; replicated) and its factor work;
  method work   the temporaries of pruning one group of weights (scores, sort keys, OBS);
  attention n x n
                the non-linear step: the dense target attention of every KV group (all
                windows, unless recomputed per step) and the gradient's working set for
                the groups solved at once;
                after the last layer, the held-out attention error's full n x n attention
                of the dense and the pruned layer (one metric window at a time).

On a CPU the device's memory is the process's, which also holds the runtime (JAX, the
tokenizer, the loaders' leftovers) and, while the run directory is written, Orbax's host
copies of the pruned model's arrays: ``cpu_process_bytes`` adds both (one device).

The per-stage multipliers (how many copies of a buffer XLA keeps alive) were measured on CPU
against the peak resident memory of real runs (tests/test_plan.py checks one within 30%, and
the committed Llama-3.2-1B-shaped and SmolLM2 runs of benchmarks/llama1b/llama1b.py within 20%);
an accelerator's allocator may keep more or fewer. ``suggestions`` re-plans with each option
that lowers the peak: smaller forward batches, no stored targets in the non-linear gradient
(recomputed per step, or chunked windows), more devices on 'data' or 'model'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nlprune.modeling.llama import QUERY_BLOCK, LlamaConfig
from nlprune.prune.base import MemoryShape
from nlprune.sparsity import parse_pattern

from nlprune.methods import DEFAULT_METHOD

F32 = 4  # bytes: nlprune prunes in float32
MASK = 1  # bytes per weight of a pruned linear's boolean mask
STORED = {"float32": 4, "bfloat16": 2}  # bytes per held weight (--dtype)

# Measured copies of a buffer kept alive at once (see the module docstring).
ATTN_FORWARD_COPIES = 1.75  # scores + probabilities of a forward batch's causal attention blocks
MLP_FORWARD_COPIES = 2.0  # gate and up outputs of a forward batch
WEIGHT_WORK_COPIES = 4.0  # scores, sort keys, mask, pruned weight of the group being pruned
FACTOR_COPIES = 4.5  # SparseGPT: X^T X's block temporaries (on CPU not yet released when the
# factorisation starts) and the factor's own (damped H, L, L^-1, U)
OBS_COPIES = 4.0  # SparseGPT: W^T, errors, keep mask, the updated weights
ATTN_ERROR_COPIES = 4.0  # held-out attention error: scores, probabilities of the dense and the pruned layer
ATTN_ERROR_BATCH = 1  # windows per call of the metric (nlprune.eval.attention_error, as api.prune calls it)
# CPU process only (device memory elsewhere is not the process's):
RUNTIME_BYTES = 1.1 * 2**30  # JAX, XLA's compiled code, the tokenizer, the calibration text
LOADER_RESIDUE = 0.1  # of the dense weights: what loading them leaves allocated (GGUF, random init)
WRITE_COPIES = 0.5  # of the pruned model's weights: Orbax's host copies while the run is written

STAGES = ("q/k/v", "attention forward", "o", "gate/up", "mlp forward", "down", "layer output", "attention error")
CATEGORIES = ("weights", "hidden states", "activations", "Hessians", "method work", "attention n x n")


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """What the plan depends on besides the config (the prune command's options)."""

    method: str = DEFAULT_METHOD
    sparsity_type: str = "unstructured"  # N:M lets a block-ranked method's pruned rows shard over 'model'
    nsamples: int = 8
    seqlen: int = 512
    data: int = 1  # mesh axis sizes
    model: int = 1
    batch_size: int = 8  # windows per forward pass (per device)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's options, as given
    attention_windows: int = 4  # held-out windows of the attention-error metric (api.prune's default)
    stream: bool = False  # --stream: one decoder layer resident (read from disk, written to the run)
    dtype: str = "float32"  # --dtype: the precision the weights are held in (computed in float32)

    def configured_method(self):
        """The method as a prune with these options would run it (options resolved, validated)."""
        from nlprune.methods import get_method

        return get_method(self.method, **self.options)


@dataclasses.dataclass
class Suggestion:
    option: str
    peak_bytes: int
    what: str


@dataclasses.dataclass
class MemoryPlan:
    """Peak memory per device (bytes) and its breakdown, for one configuration."""

    model: str
    settings: PlanSettings
    method_options: dict[str, Any]  # the method's options as the prune would resolve them
    stages: dict[str, dict[str, int]]  # stage -> category -> bytes per device
    peak_stage: str
    dense_weight_bytes: int  # what the loaded model holds before pruning starts
    notes: list[str]
    suggestions: list[Suggestion] = dataclasses.field(default_factory=list)
    cpu_process_bytes: int | None = None  # one device on a CPU: the process's peak resident set
    cpu_process_at: str | None = None  # where that peak is: a stage, or writing the run

    @property
    def devices(self) -> int:
        return self.settings.data * self.settings.model

    @property
    def peak_bytes(self) -> int:
        return sum(self.stages[self.peak_stage].values())

    @property
    def breakdown(self) -> dict[str, int]:
        return dict(self.stages[self.peak_stage])

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(peak_bytes=self.peak_bytes, devices=self.devices)
        return d

    def table(self) -> str:
        s = self.settings
        lines = [
            f"{self.model}: {s.method} on {s.nsamples} x {s.seqlen} calibration tokens, mesh data={s.data},"
            f"model={s.model} ({self.devices} device{'s' if self.devices > 1 else ''}), "
            f"{'float32' if s.dtype == 'float32' else s.dtype + ' weights, float32 computation'}",
            f"peak per device: {gib(self.peak_bytes)} (stage: {self.peak_stage}, last layer)",
            *([f"on a CPU (its memory is the process's): {gib(self.cpu_process_bytes)} at {self.cpu_process_at}, "
               "with the runtime and the run directory's writing"] if self.cpu_process_bytes else []),
            "",
            "| per device | at the peak | " + " | ".join(STAGES) + " |",
            "|---|---|" + "---|" * len(STAGES),
        ]
        for c in CATEGORIES:
            row = [gib(self.stages[st].get(c, 0)) for st in STAGES]
            lines.append(f"| {c} | {gib(self.breakdown.get(c, 0))} | " + " | ".join(row) + " |")
        lines.append(
            "| **total** | **" + gib(self.peak_bytes) + "** | "
            + " | ".join(gib(sum(self.stages[st].values())) for st in STAGES) + " |"
        )
        lines += [""] + [f"note: {n}" for n in self.notes]
        if self.suggestions:
            lines += ["", "options that lower the peak:"]
            lines += [
                f"  {x.option:<28} -> {gib(x.peak_bytes)} per device ({x.what})" for x in self.suggestions
            ]
        return "\n".join(lines)


def gib(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**10:.1f} KiB" if b else "0"


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _linears(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each prunable linear of one layer."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    H, I = c.hidden_size, c.intermediate_size
    return {
        "q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
        "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I),
    }


# the linears each stage prunes, and those pruned before it in the layer
_PRUNES = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def plan_memory(config: LlamaConfig, name: str = "model", **settings: Any) -> MemoryPlan:
    """The memory plan of pruning ``config`` with ``settings`` (see :class:`PlanSettings`)."""
    s = PlanSettings(**settings)
    _validate(s)
    if s.seqlen > config.max_position_embeddings:  # a prune would refuse it: so does its plan
        raise ValueError(
            f"plan: seqlen {s.seqlen} is longer than {name}'s context of {config.max_position_embeddings} "
            f"tokens; plan for a seqlen of at most {config.max_position_embeddings}."
        )
    plan = _plan(config, name, s)
    plan.suggestions = _suggest(config, name, s, plan.peak_bytes)
    return plan


def _validate(s: PlanSettings) -> None:
    for k in ("nsamples", "seqlen", "data", "model", "batch_size"):
        v = getattr(s, k)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"plan: {k} must be an integer >= 1, got {v!r}")
    if not isinstance(s.attention_windows, int) or s.attention_windows < 0:
        raise ValueError(f"plan: attention_windows must be an integer >= 0, got {s.attention_windows!r}")
    if s.dtype not in STORED:
        raise ValueError(f"plan: unknown dtype {s.dtype!r}; choose one of {', '.join(STORED)}")
    from nlprune.methods import available_methods

    if s.method not in available_methods():
        raise ValueError(f"plan: unknown method {s.method!r}; known methods: {', '.join(available_methods())}")


@dataclasses.dataclass
class _Layout:
    """What one planned run holds per device, in elements or bytes (see the module docstring)."""

    lins: dict[str, tuple[int, int]]  # (out, in) of each prunable linear
    lin_pruned: dict[str, int]  # elements per device of each pruned linear
    dense: int  # bytes of the weights loaded before pruning starts
    other: int  # elements of the embeddings, head and norms
    held_layers: int  # pruned layers held before the last one
    stored: int  # bytes per held weight (--dtype)
    frees_dense: bool  # streamed, and the method never reads the dense layer: replaced weights are freed
    hessian: bool  # the method (or its refit) builds X^T X
    tokens: int  # calibration tokens per device
    call: int  # windows per forward call per device
    window_shards: int  # devices the calibration windows spread over

    @property
    def layer_pruned(self) -> int:
        return sum(self.lin_pruned.values())

    def pruned_before(self, stage: str) -> int:
        """Bytes of the pruned linears (weight + boolean mask) held when ``stage`` runs: every
        earlier layer's (stored) and this layer's done so far (its float32 copy)."""
        done = []
        for st, names in _PRUNES.items():
            if st == stage:
                break
            done += names
        if stage == "attention forward":
            done = list(_PRUNES["q/k/v"])
        elif stage == "mlp forward":
            done = [*_PRUNES["q/k/v"], *_PRUNES["o"], *_PRUNES["gate/up"]]
        elif stage == "layer output":
            done = list(self.lins)
        this_layer = (MASK if self.frees_dense else F32 + MASK) * sum(self.lin_pruned[k] for k in done)
        return (self.stored + MASK) * self.held_layers * self.layer_pruned + this_layer

    def prune_work(self, method, stage: str) -> tuple[int, int]:
        """(Hessians, method work) of pruning one stage's linears."""
        names = _PRUNES[stage]
        in_f = self.lins[names[0]][1]
        if self.hessian:
            by_shape: dict[tuple[int, int], int] = {}
            for k in names:
                by_shape[self.lins[k]] = by_shape.get(self.lins[k], 0) + self.lin_pruned[k]
            factor = max(FACTOR_COPIES, method.hessian_copies)  # the refit's factorisation, or the method's own
            work = max(OBS_COPIES, method.work_copies)
            return F32 * in_f * in_f * (1 + factor), int(F32 * work * max(by_shape.values()))
        return 0, int(F32 * max(WEIGHT_WORK_COPIES, method.work_copies) * max(self.lin_pruned[k] for k in names))


def _layout(c: LlamaConfig, s: PlanSettings, method, notes: list[str]) -> _Layout:
    lins = _linears(c)
    H, L = c.hidden_size, c.num_hidden_layers
    # windows over 'data' when they divide, else replicated (as nlprune.parallel places them)
    d = s.data if s.nsamples % s.data == 0 else 1
    if s.data > 1 and d == 1:
        notes.append(f"{s.nsamples} windows do not divide over data={s.data}: the hidden states are replicated")
    n_dev = s.nsamples // d

    def rows_dev(out: int) -> int:
        return out // s.model if out % s.model == 0 else out

    layer_lin = sum(rows_dev(o) * i for o, i in lins.values())  # elements per device
    other = c.vocab_size * H * (1 if c.tie_word_embeddings else 2) + (2 * L + 1) * H
    # streamed: only the layer being pruned, read from disk and pruned as a float32 copy (the
    # embedding rows of the calibration tokens are read alone; the other layers stay on disk);
    # in memory: the model in --dtype's precision, and the float32 copy of the layer in hand
    stored = STORED[s.dtype]
    if s.stream:
        dense = F32 * (layer_lin + 2 * H)
    else:
        dense = stored * (other + L * layer_lin) + (F32 * layer_lin if stored != F32 else 0)
    pattern = parse_pattern(s.sparsity_type, 0.5 if s.sparsity_type == "unstructured" else None)
    rows_shard = method.shards_rows(pattern)
    if s.model > 1 and not rows_shard:
        notes.append(f"{method.name} {pattern.name} ranks more than a row at a time: the pruned weights are replicated")
    lin_pruned = {k: (rows_dev(o) if rows_shard else o) * i for k, (o, i) in lins.items()}
    return _Layout(lins, lin_pruned, dense, other, 0 if s.stream else L - 1, stored,
                   s.stream and not method.needs_dense_layer, method.needs_hessian, n_dev * s.seqlen,
                   min(s.batch_size, n_dev), d)


def _stages(c: LlamaConfig, s: PlanSettings, method, lay: _Layout, notes: list[str]) -> dict[str, dict[str, int]]:
    """Each stage of the last layer's pruning: what it holds, by category."""
    H, I, seq = c.hidden_size, c.intermediate_size, s.seqlen
    nh, G, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    hid, call = F32 * lay.tokens * H, lay.call
    stages: dict[str, dict[str, int]] = {}

    def stage(name_, hidden, acts=0, hess=0, work=0, nn=0, weights=None):
        weights = lay.dense + lay.pruned_before(name_) if weights is None else weights
        stages[name_] = {
            "weights": int(weights), "hidden states": int(hidden), "activations": int(acts),
            "Hessians": int(hess), "method work": int(work), "attention n x n": int(nn),
        }

    # q/k/v: the layer input and the attention input (input_layernorm(h)), and what the method
    # itself holds there (the non-linear solve's n x n attention)
    h_, w_ = lay.prune_work(method, "q/k/v")
    extra = method.qkv_memory(MemoryShape(c, s.nsamples, seq, s.data, s.model, lay.window_shards))
    notes += extra.notes
    stage("q/k/v", 2 * hid + extra.hidden, 0, h_, max(w_, extra.work), extra.attention)
    q_tokens = F32 * call * seq * (nh + 2 * G) * hd
    # the forward attention goes in blocks of QUERY_BLOCK queries against the keys up to each
    # block's end (llama.Attention.context); XLA keeps every block's scores alive at once
    causal = sum((min(b + QUERY_BLOCK, seq) - b) * min(b + QUERY_BLOCK, seq) for b in range(0, seq, QUERY_BLOCK))
    ctx = F32 * lay.tokens * nh * hd
    stage("attention forward", hid + ctx, F32 * ATTN_FORWARD_COPIES * call * nh * causal + q_tokens)
    stage("o", hid + ctx, 0, *lay.prune_work(method, "o"))
    stage("gate/up", 3 * hid, 0, *lay.prune_work(method, "gate/up"))
    act = F32 * lay.tokens * I
    stage("mlp forward", 2 * hid + act, F32 * MLP_FORWARD_COPIES * call * seq * I)
    stage("down", 2 * hid + act, 0, *lay.prune_work(method, "down"))
    stage("layer output", 3 * hid + act)
    if s.attention_windows:  # after the last layer: the dense and the pruned model side by side
        b = min(s.attention_windows, ATTN_ERROR_BATCH)
        stage("attention error", 2 * F32 * b * seq * H, 0, 0, 0, F32 * ATTN_ERROR_COPIES * b * nh * seq * seq,
              weights=lay.dense + lay.pruned_before("layer output"))
    else:
        stage("attention error", 0, weights=0)
    return stages


def _notes(s: PlanSettings, method, lins: dict[str, tuple[int, int]]) -> list[str]:
    notes = []
    if not method.needs_hessian:
        notes.append(f"{method.name} needs no Hessian (only ||x_j||^2 per input feature)")
    elif method.options.refit and not method.uses_hessian:
        notes.append("--refit: each group's Hessian X^T X and its least-squares work are held while it is re-fitted")
    if s.model > 1:
        bad = [k for k, (o, _) in lins.items() if o % s.model]
        if bad:
            notes.append(f"rows of {', '.join(bad)} do not divide over model={s.model}: replicated")
    if s.stream:
        notes.append("--stream: weights are the layer being pruned (read from disk) and its pruned linears, each a "
                     "weight and a boolean mask; every other layer stays on disk")
    else:
        notes.append("weights include the dense model (kept for the attention-error metric) and the pruned "
                     "linears so far, each a weight and a boolean mask")
    return notes


def _plan(c: LlamaConfig, name: str, s: PlanSettings) -> MemoryPlan:
    method = s.configured_method()  # the plan asks the method what it holds, never its name
    notes: list[str] = []
    lay = _layout(c, s, method, notes)
    stages = _stages(c, s, method, lay, notes)
    notes += _notes(s, method, lay.lins)
    peak = max(stages, key=lambda k: sum(stages[k].values()))
    plan = MemoryPlan(name, s, json_ready(method.options.as_dict()), stages, peak, lay.dense, notes)
    if s.data * s.model == 1:  # a CPU: the device's memory is the process's
        final_weights = lay.dense + lay.pruned_before("layer output")
        L = c.num_hidden_layers
        if s.stream:  # the layer's state while it is written; at the end the packed masks of every
            # layer (1 bit a weight; the embeddings and head are copied file to file in chunks)
            writing = max(final_weights + WRITE_COPIES * lay.stored * lay.layer_pruned, L * lay.layer_pruned / 8)
        else:
            writing = final_weights + WRITE_COPIES * lay.stored * (lay.other + L * lay.layer_pruned)
        plan.cpu_process_bytes = int(RUNTIME_BYTES + LOADER_RESIDUE * lay.dense + max(writing, plan.peak_bytes))
        plan.cpu_process_at = "writing the run" if writing > plan.peak_bytes else f"stage {peak}"
    return plan


def _suggest(c: LlamaConfig, name: str, s: PlanSettings, peak: int) -> list[Suggestion]:
    """Single changes of the options that lower the peak, each re-planned: the method's own
    (:meth:`~nlprune.prune.base.PruningMethod.memory_alternatives`), then the forward batch and
    more devices on 'data'."""
    d = s.data if s.nsamples % s.data == 0 else 1
    shape = MemoryShape(c, s.nsamples, s.seqlen, s.data, s.model, d)
    tries = list(s.configured_method().memory_alternatives(shape))
    if s.batch_size > 1:
        tries.insert(0, (f"--batch-size {max(1, s.batch_size // 4)}", {"batch_size": max(1, s.batch_size // 4)},
                         "fewer windows per forward pass: smaller attention and MLP temporaries"))
    for dd in (2, 4, 8):
        if s.nsamples % (s.data * dd) == 0:
            tries.append((f"--mesh data={s.data * dd},model={s.model}", {"data": s.data * dd},
                          "calibration windows over more devices"))
            break
    out = []
    for option, change, what in tries:
        if "options" in change:
            change = {**change, "options": {**s.options, **change["options"]}}
        alt = _plan(c, name, dataclasses.replace(s, **change))
        if alt.peak_bytes < peak:
            out.append(Suggestion(option, alt.peak_bytes, what))
    return sorted(out, key=lambda x: x.peak_bytes)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24G``, ``512MiB``, ``1.5TiB`` or a number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--memory {text!r}: write a size such as 80GiB, 24G or 512MiB.")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def fit_memory(config: LlamaConfig, name: str, budget: int, **settings: Any) -> tuple[MemoryPlan | None, list[str]]:
    """The plan of the least change to ``settings`` that brings the peak per device under
    ``budget``, with the flags that make it; (None, []) when
    no setting can. Tried in order: as given; --stream; then smaller forward batches; then
    each of the method's own memory options; then both; then each of those with the weights
    held in bfloat16."""
    s = PlanSettings(**settings)
    shape = MemoryShape(config, s.nsamples, s.seqlen, s.data, s.model, s.data if s.nsamples % s.data == 0 else 1)
    batches = [(f"--batch-size {b}", {"batch_size": b}) for b in (4, 2, 1) if b < s.batch_size]
    own = [(flag, change) for flag, change, _ in s.configured_method().memory_alternatives(shape)
           if not {"data", "model"} & set(change)]  # the budget is per device: no more devices
    tries = [([], {}), (["--stream"], {"stream": True})]
    tries += [(["--stream", flag], {"stream": True, **change}) for flag, change in batches + own]
    tries += [(["--stream", f1, f2], {"stream": True, **c1, **c2}) for f1, c1 in own for f2, c2 in batches]
    if s.dtype != "bfloat16":  # last: it rounds the weights, the others only reorder the work
        tries += [([*flags, "--dtype bfloat16"], {**change, "dtype": "bfloat16"}) for flags, change in tries]
    for flags, change in tries:
        if "options" in change:
            change = {**change, "options": {**s.options, **change["options"]}}
        plan = _plan(config, name, dataclasses.replace(s, **change))
        if plan.peak_bytes <= budget:
            return plan, [f for f in flags if not (f == "--stream" and s.stream)]
    return None, []


def json_ready(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in values.items()}


def config_of(model: str) -> tuple[LlamaConfig, str]:
    """The config of a card name, a Hugging Face folder or a .gguf file, without its weights."""
    import json
    from pathlib import Path

    from nlprune import cards

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise cards.ModelNotFound(f"{path} is a folder without config.json: not a Hugging Face model.")
        return LlamaConfig.from_hf_dict(json.loads((path / "config.json").read_text())), path.name
    if path.suffix == ".gguf":
        from nlprune.convert.gguf import import_gguf, config_from_gguf

        reader = import_gguf().GGUFReader(str(path))  # metadata only: tensors are memory-mapped
        return LlamaConfig.from_hf_dict(config_from_gguf(reader)), path.stem
    return cards.card_config(cards.get_card(model)), model
