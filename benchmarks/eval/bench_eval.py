"""Perplexity evaluation: nlprune vs transformers on the same token windows, float32.

    .venv/bin/python benchmarks/eval/bench_eval.py --data-dir ../shared/data --nsamples 128 --seqlen 512

Tokenizes C4 validation once (nlprune's data path), then computes the perplexity of the same
windows with nlprune (``nlprune eval``'s code path) and with transformers in one process. The
two alternate batch by batch (and which goes first alternates too), so a change in the
machine's load hits both alike; the speed ratio is the median over batch pairs of
transformers' time / nlprune's time, next to the ratio of the summed times. Also recorded:
each batch's process CPU time, the first (compiling) call of each, and the load average
before and after. Writes benchmarks/eval/eval.json unless --output says otherwise.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import hf_window_nll, load_hf_reference, machine_line, median, write_json  # noqa: E402
from nlprune import api  # noqa: E402
from nlprune.data import eval_windows  # noqa: E402
from nlprune.eval.perplexity import batch_nll  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default="benchmarks/eval/eval.json")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count())
    load_before = os.getloadavg()
    loaded = api.load(args.model)
    hf = load_hf_reference(loaded)
    windows, prov = eval_windows(loaded.tokenizer, args.dataset, args.nsamples, args.seqlen, data_dir=args.data_dir)

    first = jnp.asarray(windows[: args.batch], dtype=jnp.int32)
    t0 = time.perf_counter()
    batch_nll(loaded.model, first).block_until_ready()  # compiles: timed, not in the pairs
    ours_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_window_nll(hf, windows[: args.batch])  # torch warm-up
    theirs_first = time.perf_counter() - t0

    ours_nll = theirs_nll = 0.0
    ours_t, theirs_t, ours_cpu, theirs_cpu = [], [], [], []
    bar = tqdm(range(0, len(windows), args.batch), desc="nlprune | transformers", unit="batch")
    for step, i in enumerate(bar):
        ids = windows[i : i + args.batch]

        def run_ours():
            return float(batch_nll(loaded.model, jnp.asarray(ids, dtype=jnp.int32)))

        def run_theirs():
            return hf_window_nll(hf, ids)

        order = [("ours", run_ours), ("theirs", run_theirs)]
        for name, fn in order if step % 2 == 0 else order[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            value = fn()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if name == "ours":
                ours_nll += value
                ours_t.append(dt)
                ours_cpu.append(cpu)
            else:
                theirs_nll += value
                theirs_t.append(dt)
                theirs_cpu.append(cpu)
        bar.set_postfix(ratio=f"{median([b / a for a, b in zip(ours_t, theirs_t)]):.2f}")
    count = windows.shape[0] * (windows.shape[1] - 1)
    ours_ppl, theirs_ppl = math.exp(ours_nll / count), math.exp(theirs_nll / count)
    ours_s, theirs_s = sum(ours_t), sum(theirs_t)

    tokens = windows.size
    record = {
        "machine": machine_line(), "model": args.model, "dataset": args.dataset, "files": prov["files"],
        "nsamples": len(windows), "seqlen": args.seqlen,
        "batch": args.batch, "torch_threads": torch.get_num_threads(),
        "nlprune": {"perplexity": ours_ppl, "nll_sum": ours_nll, "seconds": ours_s, "tok_s": tokens / ours_s,
                    "batch_seconds_median": median(ours_t), "first_call_seconds": ours_first,
                    "batch_seconds": ours_t, "batch_cpu_seconds": ours_cpu},
        "transformers": {"perplexity": theirs_ppl, "nll_sum": theirs_nll, "seconds": theirs_s,
                         "tok_s": tokens / theirs_s, "batch_seconds_median": median(theirs_t),
                         "first_call_seconds": theirs_first, "batch_seconds": theirs_t,
                         "batch_cpu_seconds": theirs_cpu},
        "relative_difference": abs(ours_ppl - theirs_ppl) / theirs_ppl,
        "nll_relative_difference": abs(ours_nll - theirs_nll) / theirs_nll,
        "speed_ratio_median": median([b / a for a, b in zip(ours_t, theirs_t)]),
        "speed_ratio_total": theirs_s / ours_s,
        "cpu_ratio_median": median([b / a for a, b in zip(ours_cpu, theirs_cpu)]),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    print(f"{args.model} {args.dataset} {len(windows)} x {args.seqlen}, batches of {args.batch} "
          f"({record['machine']}, torch threads {record['torch_threads']})")
    print("| | perplexity | seconds (sum of batches) | median s per batch | tokens/s | first call s | median CPU s per batch |")
    print("|---|---|---|---|---|---|---|")
    for name, r, cpu in (("nlprune", record["nlprune"], ours_cpu), ("transformers", record["transformers"], theirs_cpu)):
        print(f"| {name} | {r['perplexity']:.4f} | {r['seconds']:.1f} | {r['batch_seconds_median']:.2f} | "
              f"{r['tok_s']:,.0f} | {r['first_call_seconds']:.1f} | {median(cpu):.2f} |")
    print(f"  relative difference: perplexity {record['relative_difference']:.2e}, "
          f"total NLL {record['nll_relative_difference']:.2e}")
    print(f"  speed ratio (transformers' time / nlprune's): median over {len(ours_t)} batch pairs "
          f"{record['speed_ratio_median']:.2f}x, on the totals {record['speed_ratio_total']:.2f}x; "
          f"CPU-time ratio median {record['cpu_ratio_median']:.2f}x")
    print(f"  load average before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in record['load_average_after'])}")
    write_json(args.output, record)


if __name__ == "__main__":
    main()
