"""Perplexity evaluation: nlprune vs transformers on the same token windows, float32.

    .venv/bin/python benchmarks/bench_eval.py --data-dir ../shared/data --nsamples 128 --seqlen 512

Tokenizes C4 validation once (nlprune's data path), then computes the perplexity of the same
windows with nlprune and with transformers in one process. The two alternate batch by batch
(and which goes first alternates too), so a change in the machine's load hits both alike; the
speed ratio is the median over batches of transformers' time / nlprune's time, next to the
ratio of the summed times.
"""

import argparse
import math
import os
import time

import torch
from tqdm.auto import tqdm

import jax.numpy as jnp

from common import hf_window_nll, load_hf_reference, machine_line, median, write_json
from nlprune import api
from nlprune.data import eval_windows
from nlprune.eval.perplexity import batch_nll


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count())
    loaded = api.load(args.model)
    hf = load_hf_reference(loaded)
    windows, prov = eval_windows(loaded.tokenizer, args.dataset, args.nsamples, args.seqlen, data_dir=args.data_dir)

    first = jnp.asarray(windows[: args.batch], dtype=jnp.int32)
    batch_nll(loaded.model, first).block_until_ready()  # compile once, not timed
    hf_window_nll(hf, windows[: args.batch])  # torch warm-up

    ours_nll = theirs_nll = 0.0
    ours_t, theirs_t = [], []
    bar = tqdm(range(0, len(windows), args.batch), desc="nlprune | transformers", unit="batch")
    for step, i in enumerate(bar):
        ids = windows[i : i + args.batch]

        def run_ours():
            return float(batch_nll(loaded.model, jnp.asarray(ids, dtype=jnp.int32)))

        def run_theirs():
            return hf_window_nll(hf, ids)

        order = [("ours", run_ours), ("theirs", run_theirs)]
        for name, fn in order if step % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            value = fn()
            dt = time.perf_counter() - t0
            if name == "ours":
                ours_nll += value
                ours_t.append(dt)
            else:
                theirs_nll += value
                theirs_t.append(dt)
        bar.set_postfix(ratio=f"{median([b / a for a, b in zip(ours_t, theirs_t)]):.2f}")
    count = windows.shape[0] * (windows.shape[1] - 1)
    ours_ppl, theirs_ppl = math.exp(ours_nll / count), math.exp(theirs_nll / count)
    ours_s, theirs_s = sum(ours_t), sum(theirs_t)

    tokens = windows.size
    record = {
        "machine": machine_line(), "model": args.model, "dataset": args.dataset, "files": prov["files"],
        "nsamples": len(windows), "seqlen": args.seqlen,
        "batch": args.batch, "torch_threads": torch.get_num_threads(),
        "nlprune": {"perplexity": ours_ppl, "seconds": ours_s, "tok_s": tokens / ours_s,
                    "batch_seconds_median": median(ours_t)},
        "transformers": {"perplexity": theirs_ppl, "seconds": theirs_s, "tok_s": tokens / theirs_s,
                         "batch_seconds_median": median(theirs_t)},
        "relative_difference": abs(ours_ppl - theirs_ppl) / theirs_ppl,
        "speed_ratio_median": median([b / a for a, b in zip(ours_t, theirs_t)]),
        "speed_ratio_total": theirs_s / ours_s,
        "load_average": os.getloadavg(),
    }
    print(f"{args.model} {args.dataset} {len(windows)} x {args.seqlen} ({record['machine']})")
    print(f"  nlprune      perplexity {ours_ppl:.4f}  {ours_s:.1f} s  {tokens / ours_s:,.0f} tok/s")
    print(f"  transformers perplexity {theirs_ppl:.4f}  {theirs_s:.1f} s  {tokens / theirs_s:,.0f} tok/s")
    print(f"  relative difference {record['relative_difference']:.2e}, "
          f"speed ratio (transformers / nlprune time) median {record['speed_ratio_median']:.2f}x, "
          f"total {record['speed_ratio_total']:.2f}x")
    write_json(args.output, record)


if __name__ == "__main__":
    main()
