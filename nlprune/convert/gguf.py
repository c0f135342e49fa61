"""GGUF (llama.cpp) files to the Equinox Llama, straight from ``gguf``'s numpy arrays.

No torch is involved. Two llama.cpp conventions are undone here:
  * tensor names (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
  * the q/k row permutation llama.cpp's converter applies so that its RoPE can rotate
    adjacent pairs, where Hugging Face rotates halves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from nlprune.convert.hf import WeightsError, from_state_dict
from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "reading GGUF files needs the 'gguf' package: pip install gguf"
        ) from None
    return gguf


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor, or None for tensors without one."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: within each head, rows were interleaved
    (pairs (i, i + hd/2) made adjacent); put them back in rotate-half order."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def config_from_gguf(reader) -> dict[str, Any]:
    """A Hugging Face style config dict from a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"GGUF architecture {arch!r} is not supported: only 'llama' is.")

    def get(key, default=None):
        return _field(reader, f"llama.{key}", default)

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise WeightsError(
            "this GGUF carries rope_freqs.weight (llama.cpp's llama3 RoPE factors); nlprune "
            "reads llama3 scaling from a Hugging Face config.json only. Use the HF checkpoint."
        )
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise WeightsError(f"GGUF field llama.rope.scaling.type={scaling_type!r} is not supported.")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {
        "model_type": "llama",
        "vocab_size": int(get("vocab_size") or embd.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` (it memory-maps the file: tensors are read when used)."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"GGUF file {path} does not exist.")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises plain ValueError/struct errors on bad files
        raise WeightsError(f"cannot read {path} as GGUF: {e}") from None


def hf_tensors(reader) -> dict[str, Any]:
    """The file's tensors by Hugging Face name (tensors without one are left out)."""
    return {name: t for t in reader.tensors if (name := hf_name(t.name)) is not None}


def hf_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in Hugging Face (row-major) order; GGUF lists it innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def to_hf_array(config: LlamaConfig, name: str, tensor) -> np.ndarray:
    """A fresh float32 array of the HF tensor ``name`` from its GGUF tensor: dequantized, and
    q/k rows put back in rotate-half order."""
    w = dequantized_rows(tensor)
    if name.endswith("q_proj.weight"):
        w = unpermute_rope_rows(w, config.num_attention_heads)
    elif name.endswith("k_proj.weight"):
        w = unpermute_rope_rows(w, config.num_key_value_heads)
    return w


def dequantized_rows(tensor, rows: np.ndarray | None = None) -> np.ndarray:
    """A fresh float32 copy of a GGUF tensor's rows (all when ``rows`` is None), with no row
    permutation; only the selected rows are read, since quantized blocks never span rows."""
    data = tensor.data if rows is None else tensor.data[rows]
    w = np.asarray(import_gguf().quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
    return w.copy() if np.may_share_memory(w, data) else w  # F32 tensors come back as views of the file


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Config and float32 HF-named state dict of a GGUF file (dequantized)."""
    reader = open_gguf(path)
    config = LlamaConfig.from_hf_dict(config_from_gguf(reader))
    state = {name: to_hf_array(config, name, t) for name, t in hf_tensors(reader).items()}
    return config, state


def load_gguf(path: str | Path) -> LlamaForCausalLM:
    config, state = read_gguf(path)
    return from_state_dict(config, state)
