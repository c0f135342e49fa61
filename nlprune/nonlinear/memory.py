"""What the non-linear q/k solve holds at the q/k/v stage, for ``nlprune plan``: the dense
target attention of every KV group (all windows, unless recomputed per step or chunked), the
gradient's n x n working set for the groups solved at once, and the settings that lower it.

The copy counts were measured on CPU against real runs' peak resident memory (tests/test_plan.py,
benchmarks/llama1b/llama1b.py)."""

from __future__ import annotations

from typing import Any

from nlprune.nonlinear.options import NonlinearOptions
from nlprune.prune.base import MemoryShape, MethodMemory

F32 = 4
TARGET_BUILD_COPIES = 4.0  # scores, masked scores, exponentials, the stacked targets
SOLVE_COPIES = 8.0  # forward and backward n x n buffers per group and window (AMD EPYC; XLA
# compiled for another CI machine's CPU kept 4: there the plan is up to ~1.75x the peak)


def group_shards(groups: int, data: int, model: int) -> int:
    """Devices the KV groups spread over (nlprune.parallel.group_axes)."""
    for size in (data * model, model, data):
        if size > 1 and groups % size == 0:
            return size
    return 1


def qk_refit_steps(o: NonlinearOptions) -> int:
    """Gradient steps of --refit on the kept q/k weights (the probs objective's refit)."""
    return o.refit_steps if o.refit and o.objective == "probs" else 0


def qkv_memory(o: NonlinearOptions, s: MemoryShape) -> MethodMemory:
    c = s.config
    G, n, seq, d = c.num_key_value_heads, s.nsamples, s.seqlen, s.window_shards
    rep = c.num_attention_heads // G
    out = MethodMemory()
    g_axes = group_shards(G, s.data, s.model)
    if g_axes == 1 and s.data * s.model > 1:
        out.notes.append(f"{G} KV groups do not divide over the mesh: every device solves all of them")
    g_dev = G // g_axes
    per_group_window = F32 * rep * seq * seq
    wb = n if o.window_batch is None else o.window_batch
    chunk = o.window_chunk if o.window_chunk is not None and o.window_chunk < wb else None
    # the dense targets of every group and window: built where the q/k rows live (KV groups over
    # 'model' when it divides them, windows over 'data'), then resharded over the solve's axes
    g_build = G // s.model if G % s.model == 0 else G
    stored = max(TARGET_BUILD_COPIES * g_build * (n // d) * per_group_window,
                 G * n * per_group_window / g_axes + SOLVE_COPIES * g_dev * wb * per_group_window)
    if chunk is None and not o.recompute_targets:
        nn = stored
    else:  # no stored targets: each chunk (or step) recomputes its windows' dense attention
        nn = (SOLVE_COPIES + 2) * g_dev * (chunk or wb) * per_group_window
    if qk_refit_steps(o) and o.recompute_targets:  # unchunked steps on window_batch windows
        nn = max(nn, (SOLVE_COPIES + 2) * g_dev * wb * per_group_window)
    elif qk_refit_steps(o):  # the q/k refit stores every window's targets whatever the chunking
        nn = max(nn, stored)
    out.attention = int(nn)
    # the solve holds every window on every device (it slices windows per step), plus the
    # per-group copies of W_Q/W_K and their masks
    out.hidden = F32 * n * seq * c.hidden_size if d > 1 else 0
    q_rows, k_rows = c.num_attention_heads * c.head_dim, G * c.head_dim
    out.work = F32 * 4 * (q_rows + k_rows) * c.hidden_size
    return out


def memory_alternatives(o: NonlinearOptions, s: MemoryShape) -> list[tuple[str, dict[str, Any], str]]:
    tries: list[tuple[str, dict[str, Any], str]] = []
    if not o.recompute_targets:
        tries.append(("--recompute-targets", {"options": {"recompute_targets": True}},
                      "no stored dense targets: each step builds its own windows' (the same method, one more "
                      "dense forward a step)"))
    if not o.recompute_targets and (o.window_chunk is None or o.window_chunk > 1):
        # the solver stores the dense targets unless a step's windows are chunked, so chunking
        # needs steps of more than one window
        wb = o.window_batch if o.window_batch not in (None, 1) else s.nsamples
        flag = "" if o.window_batch == wb else f"--window-batch {wb} "
        tries.append((f"{flag}--window-chunk 1", {"options": {"window_batch": wb, "window_chunk": 1}},
                      "no stored dense targets; one window's n x n attention per KV group at a time"
                      + (" (steps see all windows: more compute per step)" if flag else "")))
        if qk_refit_steps(o):  # the q/k refit stores the targets whatever the chunking
            tries.append((f"{flag}--window-chunk 1 --refit-steps 0",
                          {"options": {"window_batch": wb, "window_chunk": 1, "refit_steps": 0}},
                          "no stored dense targets (steps see all windows, one at a time) and no gradient "
                          "refit of the kept q/k weights, which stores them: a different method, as --recipe fast"))
    for m in (2, 4, 8):
        if s.config.num_key_value_heads % (m * s.model) == 0:
            tries.append((f"--mesh data={s.data},model={m * s.model}", {"model": m * s.model},
                          f"{m}x the devices share the KV groups (fewer heads at once per device)"))
            break
    return tries
