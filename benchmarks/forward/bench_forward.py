"""Forward-pass speed of SmolLM2-135M: nlprune (JAX, jitted) vs transformers (torch), float32.

    .venv/bin/python benchmarks/forward/bench_forward.py --batch 8 --seqlen 512 --repeats 5

Both run the same weights on the same 8 x 512 token ids, on the same threads, alternating, in
one process; reported: median seconds and tokens/s of each, and their ratio. Two variants:
``hidden`` (the decoder stack only) and ``loss`` (through the LM head to the summed NLL; ours
is the evaluation forward, nlprune.modeling.inference, whose head never holds a window's
logits; transformers materialises all logits).
"""

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import hf_window_nll, load_hf_reference, machine_line, median, timed, write_json  # noqa: E402
from nlprune import api  # noqa: E402
from nlprune.eval.perplexity import batch_nll  # noqa: E402
from nlprune.modeling.forward import hidden_states  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    loaded = api.load(args.model)
    hf = load_hf_reference(loaded)
    ids = np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, (args.batch, args.seqlen), dtype=np.int32)
    jids, tids = jnp.asarray(ids), torch.from_numpy(ids).long()

    def ours_hidden():
        hidden_states(loaded.model, jids).block_until_ready()

    def ours_loss():
        batch_nll(loaded.model, jids).block_until_ready()

    def theirs_hidden():
        with torch.no_grad():
            hf.model(tids)

    def theirs_loss():
        hf_window_nll(hf, ids)

    ours_hidden(), ours_loss(), theirs_hidden(), theirs_loss()  # compile / warm up
    times = {k: [] for k in ("ours_hidden", "theirs_hidden", "ours_loss", "theirs_loss")}
    for _ in range(args.repeats):  # alternate so drifting machine load hits both alike
        times["ours_hidden"] += timed(ours_hidden, 1)
        times["theirs_hidden"] += timed(theirs_hidden, 1)
        times["ours_loss"] += timed(ours_loss, 1)
        times["theirs_loss"] += timed(theirs_loss, 1)
    tokens = args.batch * args.seqlen
    record = {"machine": machine_line(), "load_average": os.getloadavg(), "threads": args.threads, "batch": args.batch, "seqlen": args.seqlen,
              "repeats": args.repeats, "jax": jax.__version__, "torch": torch.__version__, "results": {}}
    print(f"{args.model}, {args.batch} x {args.seqlen} tokens, {record['machine']}, torch threads {args.threads}")
    for variant in ("hidden", "loss"):
        ours, theirs = median(times[f"ours_{variant}"]), median(times[f"theirs_{variant}"])
        record["results"][variant] = {"nlprune_s": ours, "transformers_s": theirs,
                                      "nlprune_tok_s": tokens / ours, "transformers_tok_s": tokens / theirs,
                                      "speedup": theirs / ours}
        print(f"  {variant:6s}: nlprune {ours:.3f} s ({tokens / ours:,.0f} tok/s)  transformers {theirs:.3f} s "
              f"({tokens / theirs:,.0f} tok/s)  ratio {theirs / ours:.2f}x")
    write_json(args.output, record)


if __name__ == "__main__":
    main()
