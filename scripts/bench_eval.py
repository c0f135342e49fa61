"""Perplexity evaluation: nlprune vs transformers on the same token windows, float32.

    .venv/bin/python scripts/bench_eval.py --data-dir ../shared/data --nsamples 128 --seqlen 512

Tokenizes C4 validation once (nlprune's data path), then computes the perplexity of the same
windows with nlprune and with transformers, in one process, and reports both perplexities,
their relative difference, and tokens/s of each.
"""

import argparse
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from _bench import hf_window_nll, load_hf_reference, machine_line, write_json
from nlprune import api
from nlprune.data import eval_windows
from nlprune.eval.perplexity import perplexity


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

    perplexity(loaded.model, windows[: args.batch], batch_size=args.batch, progress=False)  # compile
    ours = perplexity(loaded.model, windows, batch_size=args.batch)

    start, total = time.perf_counter(), 0.0
    for i in tqdm(range(0, len(windows), args.batch), desc="transformers"):
        total += hf_window_nll(hf, windows[i : i + args.batch])
    theirs_s = time.perf_counter() - start
    theirs_ppl = math.exp(total / ours.tokens)

    tokens = windows.size
    record = {
        "machine": machine_line(), "model": args.model, "dataset": args.dataset, "files": prov["files"],
        "nsamples": len(windows), "seqlen": args.seqlen,
        "nlprune": {"perplexity": ours.perplexity, "seconds": ours.seconds, "tok_s": tokens / ours.seconds},
        "transformers": {"perplexity": theirs_ppl, "seconds": theirs_s, "tok_s": tokens / theirs_s},
        "relative_difference": abs(ours.perplexity - theirs_ppl) / theirs_ppl,
        "speedup": theirs_s / ours.seconds,
    }
    print(f"{args.model} {args.dataset} {len(windows)} x {args.seqlen} ({record['machine']})")
    print(f"  nlprune      perplexity {ours.perplexity:.4f}  {ours.seconds:.1f} s  {tokens / ours.seconds:,.0f} tok/s")
    print(f"  transformers perplexity {theirs_ppl:.4f}  {theirs_s:.1f} s  {tokens / theirs_s:,.0f} tok/s")
    print(f"  relative difference {record['relative_difference']:.2e}, speed ratio {record['speedup']:.2f}x")
    write_json(args.output, record)


if __name__ == "__main__":
    main()
