"""Run the original ALPS or RIA code on SmolLM2-135M under nlprune's cpu protocol, in one process.

The original code is read from a checkout the user gives (--repo); nothing of it is in this
repository. It runs as written except for what this machine forces, each adaptation applied
here at run time and listed in the record (``adaptations``):

  * CPU instead of CUDA (ALPS: its 'cuda:0' literals read 'cpu', torch.cuda.synchronize is a
    no-op; RIA: Tensor.cuda() returns the tensor itself);
  * the local data: calibration windows are nlprune's (C4 train, 8 x 512, seed 0: the same
    draw as Wanda's/SparseGPT's get_c4, and the windows nlprune prunes on), handed to the
    original code as its data loader;
  * the installed transformers (5.x): a decoder layer needs its RoPE tables
    (position_embeddings), which the reference's layer calls do not pass: they are computed
    from position_ids as the model itself does; ALPS's ``transformers.Conv1D`` moved to
    transformers.pytorch_utils; RIA reads ``model.hf_device_map`` (set by device_map loading,
    which a CPU-only float32 load does not use): an empty map;
  * float32 weights (both load float16/auto on a GPU) and the model built from the same
    weights nlprune prunes;
  * RIA picks its LLaMA code path when the model name contains "llama".

The pruned model's C4 perplexity is measured by nlprune's evaluator on the same 128 x 512
windows as every nlprune row (the same code on both sides of the comparison), and its masks
are saved (packed bits, --masks) so the comparison can count where the two sides differ.

    .venv/bin/python benchmarks/alps_ria/reference.py --method alps --repo /path/to/ALPS \\
        --sparsity-type unstructured --sparsity-ratio 0.5 --data-dir ../shared/data --output rec.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import git_state, write_json  # noqa: E402

ALPS_SOURCE_EDITS = [  # (old, new, why), each must occur in alps.py
    ("'cuda:0'", "'cpu'", "CPU instead of CUDA: the device literals of alps.py"),
]


def load_patched_module(name: str, path: Path, edits: list[tuple[str, str, str]], adaptations: list[str]):
    """Import ``path`` as module ``name`` with textual ``edits`` applied (each must match)."""
    source = path.read_text()
    for old, new, why in edits:
        count = source.count(old)
        if not count:
            raise SystemExit(f"{path}: expected {old!r} in the reference code ({why}); is this the right checkout?")
        source = source.replace(old, new)
        adaptations.append(f"{path.name}: {old} -> {new} ({count}x): {why}")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def rope_patch(model, adaptations: list[str]) -> None:
    """Decoder layers called without position_embeddings compute them, as the model would."""
    import torch
    from transformers.models.llama import modeling_llama

    rotary = model.model.rotary_emb
    original = modeling_llama.LlamaDecoderLayer.forward

    def forward(self, hidden_states, *args, position_embeddings=None, position_ids=None, **kwargs):
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
            position_embeddings = rotary(hidden_states, position_ids)
        return original(self, hidden_states, *args, position_embeddings=position_embeddings,
                        position_ids=position_ids, **kwargs)

    modeling_llama.LlamaDecoderLayer.forward = forward
    adaptations.append("transformers 5: LlamaDecoderLayer computes position_embeddings from position_ids when "
                       "the caller passes none (the reference's layer calls pass attention_mask and position_ids only)")


def hf_model(loaded):
    """transformers' LlamaForCausalLM, float32, with exactly the weights nlprune loaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlprune.convert.hf import to_state_dict

    model = LlamaForCausalLM(LlamaConfig(**loaded.model.config.to_hf_dict())).float().eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_state_dict(loaded.model).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise SystemExit(f"weights do not fit the transformers model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def run_alps(repo: Path, model, loader, pattern, adaptations: list[str]) -> float:
    import torch
    import transformers

    if not hasattr(transformers, "Conv1D"):
        from transformers.pytorch_utils import Conv1D

        transformers.Conv1D = Conv1D
        adaptations.append("transformers 5: transformers.Conv1D is transformers.pytorch_utils.Conv1D")
    torch.cuda.synchronize = lambda *a, **k: None
    adaptations.append("torch.cuda.synchronize: a no-op (CPU)")
    sys.path.insert(0, str(repo))
    load_patched_module("alps", repo / "alps.py", ALPS_SOURCE_EDITS, adaptations)
    llama = load_patched_module("alps_llama", repo / "llama.py", [], adaptations)
    n, m = (pattern.n, pattern.m) if pattern.is_nm else (0, 0)
    # llama.py's __main__ sets these; its llama_sequential calls ALPS_admm(rho=0.1) with its defaults
    llama.args = argparse.Namespace(nsamples=len(loader), method="ALPS", sp=pattern.ratio, nm_n=n, nm_m=m)
    start = time.perf_counter()
    llama.llama_sequential(model, loader, "cpu", nsamples=len(loader))
    return time.perf_counter() - start


def run_ria(repo: Path, model, loader, pattern, seed: int, adaptations: list[str]) -> float:
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    adaptations.append("torch.Tensor.cuda: returns the tensor (CPU)")
    sys.path.insert(0, str(repo))
    prune = importlib.import_module("lib.prune")
    prune.get_loaders = lambda *a, **k: (loader, None)
    adaptations.append("lib.prune.get_loaders: returns nlprune's calibration windows (the local C4 files)")
    model.hf_device_map = {}
    adaptations.append("model.hf_device_map = {} (a CPU float32 load has no device map)")
    n, m = (pattern.n, pattern.m) if pattern.is_nm else (0, 0)
    args = argparse.Namespace(  # main.py's defaults for `--prune_method ria`, the README's command
        model="llama:smollm2-135m", prune_method="ria", seed=seed, calib_dataset="c4", nsamples=len(loader),
        seqlen=model.seqlen, sparsity_ratio=pattern.ratio, sparsity_type=pattern.name if pattern.is_nm else "unstructured",
        a=0.5, reconstruction=False, reallocation=False, lsa=False, importance_score="sum", gptq=False,
        per_outneuron=False, semi_sparse_acc=False, fast=False,
    )
    adaptations.append("args.model contains 'llama' (RIA chooses its LLaMA path by the model's name)")
    np.random.seed(seed)
    torch.random.manual_seed(seed)
    start = time.perf_counter()
    prune.prune_ria(args, model, None, torch.device("cpu"), prune_n=n, prune_m=m)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("alps", "ria"), required=True)
    p.add_argument("--repo", type=Path, required=True, help="a checkout of the method's original repository")
    p.add_argument("--sparsity-type", default="unstructured")
    p.add_argument("--sparsity-ratio", type=float, default=None)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-nsamples", type=int, default=128)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--masks", type=Path, help="write the pruned masks here (npz of packed bits)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    import torch

    from nlprune import api
    from nlprune.convert.hf import from_transformers
    from nlprune.data import calibration_windows
    from nlprune.sparsity import parse_pattern

    pattern = parse_pattern(args.sparsity_type, args.sparsity_ratio)
    adaptations: list[str] = []
    loaded = api.load("smollm2-135m")
    windows, _ = calibration_windows(loaded.tokenizer, args.nsamples, args.seqlen, args.seed, args.data_dir)
    loader = [(torch.from_numpy(w[None].astype(np.int64)), None) for w in windows]
    model = hf_model(loaded)
    model.seqlen = args.seqlen
    rope_patch(model, adaptations)
    with torch.no_grad():
        if args.method == "alps":
            seconds = run_alps(args.repo, model, loader, pattern, adaptations)
        else:
            seconds = run_ria(args.repo, model, loader, pattern, args.seed, adaptations)

    pruned = from_transformers(model)
    masks = {f"model.layers.{i}.{sub}.{name}": np.asarray(lin.weight) != 0
             for i, layer in enumerate(pruned.model.layers)
             for name, lin in layer.linears().items()
             for sub in [("self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp")]}
    zeros = sum(int((~k).sum()) for k in masks.values()) / sum(k.size for k in masks.values())
    if args.masks:
        args.masks.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.masks, **{k: np.packbits(v) for k, v in masks.items()})
    ppl = api.evaluate(model=dataclasses.replace(loaded, model=pruned), dataset="c4", nsamples=args.eval_nsamples,
                       seqlen=args.seqlen, data_dir=args.data_dir, progress=False)
    repo_commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or None
    write_json(args.output, {
        "what": f"the original {args.method.upper()} code on SmolLM2-135M, cpu protocol",
        "method": args.method, "pattern": pattern.name, "ratio": pattern.ratio,
        "reference_repo": str(args.repo), "reference_commit": repo_commit,
        "prune_seconds": seconds, "c4_perplexity": ppl["perplexity"], "measured_sparsity": zeros,
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "eval": {"dataset": "c4", "nsamples": ppl["windows"], "seqlen": args.seqlen},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "adaptations": adaptations, "command": " ".join(sys.argv), "git": git_state(),
    })
    print(f"{args.method} {pattern.name} {pattern.ratio}: {seconds:.1f} s, C4 perplexity {ppl['perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
