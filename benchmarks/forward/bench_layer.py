"""Where a forward pass spends its time: one SmolLM2 decoder layer's pieces, nlprune vs
transformers, float32, on the same 8 x 512 hidden states.

    .venv/bin/python benchmarks/forward/bench_layer.py --repeats 7 --output benchmarks/forward/layer.json

Pieces: the MLP (post-attention norm + SwiGLU), the attention block (input norm + attention +
o_proj), the whole layer (the pruning pipeline's forward, nlprune.modeling.forward, and the
evaluation forward, nlprune.modeling.inference), and the LM head with the summed NLL (the
evaluation forward's). Each piece of ours and of transformers alternate, median of
``--repeats`` after a warm-up; the ratio is transformers' time / ours.
"""

import argparse
import os
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import load_hf_reference, machine_line, median, timed, write_json  # noqa: E402
from nlprune import api  # noqa: E402
from nlprune.modeling import inference  # noqa: E402
from nlprune.modeling.forward import embed, rope_tables, run_layer  # noqa: E402


@eqx.filter_jit
def _mlp(layer, h):
    return jax.vmap(lambda x: layer.mlp(layer.post_attention_layernorm(x)))(h)


@eqx.filter_jit
def _attention(layer, h, cos, sin):
    return jax.vmap(lambda x: layer.self_attn(layer.input_layernorm(x), cos, sin))(h)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count())
    loaded = api.load(args.model)
    model, hf = loaded.model, load_hf_reference(loaded)
    layer, hf_layer = model.model.layers[args.layer], hf.model.layers[args.layer]
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seqlen)).astype(np.int32)
    cos, sin = rope_tables(model, args.seqlen)
    h = embed(model, jnp.asarray(ids))
    th = torch.from_numpy(np.asarray(h))
    rope = hf.model.rotary_emb(th, torch.arange(args.seqlen)[None])
    targets = torch.from_numpy(ids[:, 1:]).long().reshape(-1)

    def hf_head():
        logits = hf.lm_head(hf.model.norm(th))[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")

    pieces = {
        "mlp": (lambda: _mlp(layer, h).block_until_ready(),
                lambda: hf_layer.mlp(hf_layer.post_attention_layernorm(th))),
        "attention": (lambda: _attention(layer, h, cos, sin).block_until_ready(),
                      lambda: hf_layer.self_attn(hf_layer.input_layernorm(th), position_embeddings=rope,
                                                 attention_mask=None)[0]),
        "layer": (lambda: run_layer(layer, h, cos, sin).block_until_ready(),
                  lambda: hf_layer(th, position_embeddings=rope, attention_mask=None)),
        "layer_eval": (lambda: inference.run_layer(layer, h, cos, sin).block_until_ready(),
                       lambda: hf_layer(th, position_embeddings=rope, attention_mask=None)),
        "head_and_nll": (lambda: jnp.sum(inference.token_nll(model, h, jnp.asarray(ids))).block_until_ready(),
                         hf_head),
    }
    record = {"machine": machine_line(), "load_average_before": os.getloadavg(), "layer": args.layer,
              "batch": args.batch, "seqlen": args.seqlen, "repeats": args.repeats, "results": {}}
    print(f"{args.model} layer {args.layer}, {args.batch} x {args.seqlen}, {record['machine']}")
    with torch.no_grad():
        for name, (ours, theirs) in pieces.items():
            ours(), theirs()  # compile / warm up
            t_ours, t_theirs = [], []
            for _ in range(args.repeats):
                t_ours += timed(ours, 1)
                t_theirs += timed(theirs, 1)
            a, b = median(t_ours), median(t_theirs)
            record["results"][name] = {"nlprune_s": a, "transformers_s": b, "ratio": b / a}
            print(f"  {name:13s} nlprune {a:.4f} s  transformers {b:.4f} s  ratio {b / a:.2f}x")
    record["load_average_after"] = os.getloadavg()
    write_json(args.output, record)


if __name__ == "__main__":
    main()
