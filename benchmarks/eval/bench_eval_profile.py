"""Where perplexity evaluation spends its time, piece by piece, and how close it is to the
machine's float32 ceiling.

    .venv/bin/python benchmarks/eval/bench_eval_profile.py --data-dir ../shared/data \\
        --output benchmarks/eval/profile.json

Four measurements, in one process (plus two child processes for the start-up times):

1. Peak float32 GEMM rate of the cores: a big matmul in JAX and in torch (2 threads),
   alternating; best and median GFLOP/s, and GFLOP per CPU-second (a per-core figure
   that a loaded machine disturbs less).
2. FLOPs per token of the model (linears, LM head, causal attention) at the window length.
3. One steady-state 8 x 512 batch of each evaluation forward, traced with JAX's profiler:
   ``current`` (nlprune.modeling.inference) and ``previous`` (the pruning pipeline's
   layer forward, nlprune.modeling.forward.run_layer, then the head in chunks of 256
   positions that held (batch, 256, vocab) logits: perplexity's code before the change).
   Every executed XLA op is attributed to a piece by the ``jax.named_scope`` names of the
   forward code; its time on each XLA thread is summed (core-seconds). ``not running XLA
   ops`` is the rest of 2 cores x wall: Python dispatch, host transfers, synchronisation
   between the threads, and on a shared machine, time taken by other processes.
   Then the whole 128 x 512 pass of each, batch by batch (the first batch compiles).
4. Time to the first evaluated batch in a fresh process, with an empty XLA compilation
   cache and again with the cache it left (the cache ``nlprune`` uses:
   $NLPRUNE_CACHE_DIR/xla, entries for compilations over 0.5 s).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from nlprune.modeling.inference import PIECES

PIECE_RE = {p: re.compile(r"[/(]" + p + r"[/)]|^" + p + r"/") for p in PIECES}
CONTROL_FLOW = ("while", "conditional", "call")


# --------------------------------------------------------------------------- FLOPs


def flops_per_token(config, seqlen: int, query_block: int | None = None) -> dict[str, float]:
    """Multiply-adds x 2 per token. Attention: scores and context over the keys each query
    sees (exact causal: (seqlen + 1) / 2 on average; with query blocks, up to the block's
    end)."""
    c = config
    hd, heads, kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    per_layer = c.hidden_size * (heads * hd + 2 * kv * hd) + heads * hd * c.hidden_size
    per_layer += 3 * c.hidden_size * c.intermediate_size
    if query_block:
        ends = [min(s + query_block, seqlen) for s in range(0, seqlen, query_block)]
        keys = sum(min(query_block, seqlen - s) * e for s, e in zip(range(0, seqlen, query_block), ends)) / seqlen
    else:
        keys = (seqlen + 1) / 2
    return {
        "linears": 2.0 * per_layer * c.num_hidden_layers,
        "attention": 2.0 * 2 * heads * hd * keys * c.num_hidden_layers,
        "lm_head": 2.0 * c.vocab_size * c.hidden_size,
    }


# --------------------------------------------------------------------------- peak GEMM


def peak_gemm(sizes, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    out = {}
    for m, k, n in sizes:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        mm = jax.jit(jnp.matmul)
        runs = {"jax": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
        times = {name: ([], []) for name in runs}
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
        flops = 2.0 * m * k * n
        out[f"{m}x{k}x{n}"] = {
            name: {"gflops_best": flops / min(w) / 1e9, "gflops_median": flops / float(np.median(w)) / 1e9,
                   "gflops_per_cpu_second": flops / float(np.median(c)) / 1e9}
            for name, (w, c) in times.items()
        }
    return out


# --------------------------------------------------------------------------- trace attribution


def instruction_pieces(hlo_text: str) -> dict[tuple[str, str], str | None]:
    """(module, instruction) of a compiled module -> the piece its op_name names (a fusion takes
    its own op_name's piece, else the most common piece among the instructions it calls);
    None for control flow (a loop's thunk only waits for its body's)."""
    meta, calls, opcode, members = {}, {}, {}, collections.defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and " = " not in line:
            computation = head.group(1)
            continue
        inst = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+(?:\s*\{[^}]*\})?\s+([\w\-]+)\(", line)
        if not inst:
            inst = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\(.*?\)\s+([\w\-]+)\(", line)
        if not inst:
            continue
        name = inst.group(1)
        op_name = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        meta[name] = op_name.group(1) if op_name else ""
        calls[name] = called.group(1) if called else None
        opcode[name] = inst.group(2)
        members[computation].append(name)

    def piece(name: str, depth: int = 0) -> str:
        for p, pattern in PIECE_RE.items():
            if pattern.search(meta.get(name, "")):
                return p
        if calls.get(name) and depth < 4:
            votes = collections.Counter(piece(n, depth + 1) for n in members.get(calls[name], []))
            votes.pop("other XLA ops", None)
            if votes:
                return votes.most_common(1)[0][0]
        return "other XLA ops"

    module = re.match(r"HloModule\s+([\w.\-]+)", hlo_text).group(1)
    return {(module, name): (None if opcode[name] in CONTROL_FLOW else piece(name)) for name in meta}


def trace_wall_seconds(run, pieces_of: dict[tuple[str, str], str | None], trace_dir: str) -> tuple[dict[str, float], float]:
    """Run ``run()`` under the profiler and split its wall time among pieces: at each instant,
    equally among the XLA ops running then on any thread (a parallel op's helper threads
    record no events of their own, so this credits their work to the op it serves); instants
    with no op running go to ``no XLA op running`` (Python dispatch, host transfers,
    synchronisation, and on a shared machine, other processes' time slices)."""
    import jax

    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    boundaries = []  # (time ns, +1/-1, piece)
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                piece = pieces_of.get((stats.get("hlo_module"), stats.get("hlo_op")))
                if piece:
                    boundaries += [(ev.start_ns, 1, piece), (ev.start_ns + ev.duration_ns, -1, piece)]
    boundaries.sort(key=lambda b: (b[0], b[1]))
    seconds: dict[str, float] = collections.Counter()
    active: collections.Counter = collections.Counter()
    prev = boundaries[0][0] if boundaries else 0
    for t, step, piece in boundaries:
        n = sum(active.values())
        if n and t > prev:
            for p, k in active.items():
                seconds[p] += (t - prev) * k / n / 1e9
        active[piece] += step
        if active[piece] == 0:
            del active[piece]
        prev = t
    seconds["no XLA op running"] = max(0.0, wall - sum(seconds.values()))
    return dict(seconds), wall


# --------------------------------------------------------------------------- the two forwards


def make_paths(model):
    """name -> (batch function returning the summed NLL, list of (jitted fn, args) to get
    the compiled modules from)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from nlprune.modeling import forward, inference

    @eqx.filter_jit
    def previous_head(model, h, ids, chunk: int = 256):
        h = model.final_hidden(h)[:, :-1]
        targets = ids[:, 1:]
        b, n, d = h.shape
        pad = (-n) % chunk
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).transpose(1, 0, 2, 3)
        targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).transpose(1, 0, 2)
        valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)
        w = model.head_weight()

        def chunk_nll(args):
            hc, tc, vc = args
            with jax.named_scope("head_logits"):
                logits = hc @ w.T
            with jax.named_scope("head_logsumexp"):
                logz = jax.nn.logsumexp(logits, axis=-1)
            with jax.named_scope("head_target"):
                picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
            return jnp.sum((logz - picked) * vc[None, :])

        return jnp.sum(jax.lax.map(chunk_nll, (h, targets, valid)))

    @eqx.filter_jit
    def embed(model, ids):
        with jax.named_scope("embed"):
            return forward.embed(model, ids), *forward.rope_tables(model, ids.shape[1])

    def previous(ids):
        h, cos, sin = embed(model, ids)
        for layer in model.model.layers:
            h = forward.run_layer(layer, h, cos, sin)
        return previous_head(model, h, ids)

    def current(ids):
        return jnp.sum(inference.batch_token_nll(model, ids))

    def modules(name, ids):
        h, cos, sin = inference.embed_and_rope(model, ids)
        layer = model.model.layers[0]
        if name == "previous":
            fns = [(embed, (model, ids)), (forward.run_layer, (layer, h, cos, sin)), (previous_head, (model, h, ids))]
        else:
            fns = [(inference.embed_and_rope, (model, ids)), (inference.run_layer, (layer, h, cos, sin)),
                   (inference.token_nll, (model, h, ids))]
        return [fn.lower(*a).compile().compiled.as_text() for fn, a in fns]

    return {"previous": previous, "current": current}, modules


# --------------------------------------------------------------------------- start-up (child)


def first_batch_child(args) -> None:
    """Run in a fresh process: time imports, loading, and the first two batches."""
    t_start = time.perf_counter()
    import jax

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import jax.numpy as jnp

    from nlprune import api
    from nlprune.data import eval_windows
    from nlprune.eval.perplexity import batch_nll

    t_import = time.perf_counter()
    loaded = api.load(args.model)
    t_load = time.perf_counter()
    windows, _ = eval_windows(loaded.tokenizer, args.dataset, 2 * args.batch, args.seqlen,
                              data_dir=args.data_dir, progress=False)
    t_windows = time.perf_counter()
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        float(batch_nll(loaded.model, jnp.asarray(windows[i * args.batch : (i + 1) * args.batch], jnp.int32)))
        times.append(time.perf_counter() - t0)
    print(json.dumps({"imports_s": t_import - t_start, "load_s": t_load - t_import, "windows_s": t_windows - t_load,
                      "first_batch_s": times[0], "second_batch_s": times[1],
                      "compile_s": times[0] - times[1]}))


def start_up(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("empty_cache", "warm_cache"):
            cmd = [sys.executable, __file__, "--first-batch-child", "--cache-dir", cache, "--model", args.model,
                   "--dataset", args.dataset, "--seqlen", str(args.seqlen), "--batch", str(args.batch)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            record = json.loads(res.stdout.strip().splitlines()[-1])
            record["process_s"] = time.perf_counter() - t0
            out[label] = record
            print(f"  start-up, {label}: first batch {record['first_batch_s']:.1f} s (steady batch "
                  f"{record['second_batch_s']:.1f} s, so compilation ~{record['compile_s']:.1f} s); "
                  f"imports {record['imports_s']:.1f} s, model load {record['load_s']:.1f} s")
    return out


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--gemm-repeats", type=int, default=7)
    ap.add_argument("--skip-start-up", action="store_true", help="skip the two child processes")
    ap.add_argument("--output", default=None)
    ap.add_argument("--first-batch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_batch_child:
        return first_batch_child(args)

    import jax
    import jax.numpy as jnp
    import torch
    from tqdm.auto import tqdm

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/, for common.py
    from common import machine_line, write_json
    from nlprune import api
    from nlprune.data import eval_windows
    from nlprune.modeling.inference import QUERY_BLOCK

    torch.set_num_threads(os.cpu_count())
    record = {"machine": machine_line(), "load_average_before": os.getloadavg(), "jax": jax.__version__,
              "torch": torch.__version__, "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "batch": args.batch}
    print(f"{args.model}, {args.nsamples} x {args.seqlen}, batches of {args.batch}; {record['machine']}, "
          f"load {record['load_average_before'][0]:.1f}")

    record["peak_gemm"] = peak_gemm([(2048, 2048, 2048), (4096, 576, 1536)], args.gemm_repeats)
    for shape, res in record["peak_gemm"].items():
        print(f"  GEMM {shape}: " + "; ".join(
            f"{k} best {v['gflops_best']:.0f} GFLOP/s, median {v['gflops_median']:.0f}, "
            f"{v['gflops_per_cpu_second']:.0f} per CPU-s" for k, v in res.items()))

    loaded = api.load(args.model)
    model = loaded.model
    fpt = flops_per_token(model.config, args.seqlen)
    fpt_blocked = flops_per_token(model.config, args.seqlen, QUERY_BLOCK)
    record["flops_per_token"] = {"exact_causal": fpt, "as_computed_with_query_blocks": fpt_blocked,
                                 "total_exact": sum(fpt.values()), "total_as_computed": sum(fpt_blocked.values())}
    print(f"  FLOPs per token: {sum(fpt.values()) / 1e6:.1f} M (linears {fpt['linears'] / 1e6:.1f}, "
          f"LM head {fpt['lm_head'] / 1e6:.1f}, attention {fpt['attention'] / 1e6:.1f}; "
          f"{sum(fpt_blocked.values()) / 1e6:.1f} M as computed with query blocks of {QUERY_BLOCK})")

    windows, prov = eval_windows(loaded.tokenizer, args.dataset, args.nsamples, args.seqlen, data_dir=args.data_dir)
    record["files"] = prov["files"]
    paths, modules = make_paths(model)
    first = jnp.asarray(windows[: args.batch], jnp.int32)

    # One steady-state batch of each, traced.
    record["batch_profile"] = {}
    for name, run in paths.items():
        t0 = time.perf_counter()
        float(run(first))
        compile_and_first = time.perf_counter() - t0
        pieces_of = {}
        for text in modules(name, first):
            pieces_of.update(instruction_pieces(text))
        c0 = time.process_time()
        with tempfile.TemporaryDirectory() as d:
            seconds, wall = trace_wall_seconds(lambda: float(run(first)), pieces_of, d)
        cpu = time.process_time() - c0
        record["batch_profile"][name] = {"wall_s": wall, "cpu_s": cpu, "first_call_s": compile_and_first,
                                         "seconds": seconds}

    # The whole pass, batch by batch, each forward in turn (the first batch includes compiling:
    # a fresh jit cache per forward is not possible in one process, so the pass of each starts
    # with its compiled programs already cached and its first-call time is added from above).
    record["pass"] = {}
    for name, run in paths.items():
        walls, cpus = [], []
        for i in tqdm(range(0, len(windows), args.batch), desc=f"{name} pass", unit="batch"):
            ids = jnp.asarray(windows[i : i + args.batch], jnp.int32)
            c0, t0 = time.process_time(), time.perf_counter()
            float(run(ids))
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        prof = record["batch_profile"][name]
        record["pass"][name] = {"batch_wall_s": walls, "batch_cpu_s": cpus,
                                "compile_s": max(0.0, prof["first_call_s"] - float(np.median(walls))),
                                "wall_s": sum(walls) + max(0.0, prof["first_call_s"] - float(np.median(walls)))}

    if not args.skip_start_up:
        record["start_up"] = start_up(args)
    record["load_average_after"] = os.getloadavg()
    print_tables(record, args)
    write_json(args.output, record)


def print_tables(record: dict, args) -> None:
    tokens = args.nsamples * args.seqlen
    batch_tokens = args.batch * args.seqlen
    order = [*PIECES, "other XLA ops", "no XLA op running"]
    prof, whole = record["batch_profile"], record["pass"]
    print(f"\nWall seconds per piece: one {args.batch} x {args.seqlen} batch (traced), and the whole "
          f"{args.nsamples} x {args.seqlen} pass (its batches split as the traced one, plus compilation)")
    print("| piece | previous: batch s | share | pass s | current: batch s | share | pass s |")
    print("|---|---|---|---|---|---|---|")
    scale = {n: sum(whole[n]["batch_wall_s"]) / prof[n]["wall_s"] for n in prof}
    for piece in [*order, "compilation (first batch)"]:
        cells = []
        for n in ("previous", "current"):
            if piece.startswith("compilation"):
                v_batch, v_pass = None, whole[n]["compile_s"]
            else:
                v_batch = prof[n]["seconds"].get(piece, 0.0)
                v_pass = v_batch * scale[n]
            cells += ["" if v_batch is None else f"{v_batch:.3f}",
                      "" if v_batch is None else f"{100 * v_batch / prof[n]['wall_s']:.1f}%", f"{v_pass:.1f}"]
        print(f"| {piece} | " + " | ".join(cells) + " |")
    for n in ("previous", "current"):
        w = whole[n]
        print(f"  {n}: batch wall {prof[n]['wall_s']:.2f} s, CPU {prof[n]['cpu_s']:.2f} s; "
              f"whole pass {w['wall_s']:.1f} s ({tokens / w['wall_s']:.0f} tok/s), compilation {w['compile_s']:.1f} s, "
              f"median batch {np.median(w['batch_wall_s']):.2f} s ({batch_tokens / np.median(w['batch_wall_s']):.0f} tok/s)")
    fl = record["flops_per_token"]["total_exact"]
    cores = int(record["machine"].split()[0])
    for lib in ("jax", "torch"):
        best = max(r[lib]["gflops_best"] for r in record["peak_gemm"].values())
        per_cpu = max(r[lib]["gflops_per_cpu_second"] for r in record["peak_gemm"].values())
        print(f"  ceiling with {lib}'s GEMM: best wall rate here {best:.0f} GFLOP/s -> {best * 1e9 / fl:.0f} tok/s; "
              f"{per_cpu:.0f} GFLOP per CPU-second -> {per_cpu * 1e9 / fl:.0f} tok per CPU-second, "
              f"{cores * per_cpu * 1e9 / fl:.0f} tok/s on {cores} idle cores")
    for n in ("previous", "current"):
        cpu = sum(whole[n]["batch_cpu_s"])
        print(f"  {n}: {tokens / cpu:.0f} tok per CPU-second over the pass")
    print(f"  load average before {record['load_average_before']}, after {record['load_average_after']}")


if __name__ == "__main__":
    main()
