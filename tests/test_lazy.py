"""Streaming weights (nlprune.convert.lazy): a decoder layer read from disk only when asked
for, from Hugging Face folders (one file or sharded, float32 or bfloat16) and GGUF files; and
seeded random weights written to disk layer by layer, equal to init_llama's bit for bit."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from test_llama_parity import random_hf_model, tiny_hf_config

from nlprune import cards
from nlprune.convert import lazy, random_weights
from nlprune.convert.gguf import load_gguf
from nlprune.convert.hf import WeightsError, expected_shapes, load_hf_folder, to_state_dict
from nlprune.modeling.init import init_layer, init_llama, layer_key
from nlprune.modeling.llama import LlamaConfig

TIED = tiny_hf_config(vocab_size=256, tie_word_embeddings=True)
UNTIED_BIAS = tiny_hf_config(vocab_size=256, attention_bias=True, mlp_bias=True)


def same_leaves(a, b) -> bool:
    """Same tree structure and every leaf equal, bit for bit, in float32."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.asarray(x).dtype == np.float32 and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def save_hf(cfg: dict, folder, dtype=torch.float32, **save_kwargs):
    model = random_hf_model(cfg).to(dtype)
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


# --------------------------------------------------------------------------- Hugging Face folders


@pytest.mark.parametrize("cfg", [TIED, UNTIED_BIAS], ids=["tied", "untied-bias"])
@pytest.mark.parametrize("layout", ["float32", "bfloat16", "sharded"])
def test_hf_reader_equals_the_whole_model_loader(cfg, layout, tmp_path):
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32
    extra = {"max_shard_size": "40KB"} if layout == "sharded" else {}
    folder = save_hf(cfg, tmp_path / "hf", dtype, **extra)
    if layout == "sharded":
        assert (folder / lazy.INDEX_FILE).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    whole = load_hf_folder(folder)
    reader = cards.open_reader(cards.resolve_model(str(folder)))
    reader.check()
    assert reader.config == whole.config
    for i in range(whole.config.num_hidden_layers):
        assert same_leaves(reader.layer(i), whole.model.layers[i]), f"layer {i}"
    table = np.asarray(whole.model.embed_tokens.weight)
    ids = np.array([[0, 5, 255], [7, 7, 128]], dtype=np.int32)
    rows = reader.embed_rows(ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == np.float32 and np.array_equal(rows, table[ids])
    shell = reader.shell()
    assert shell.model.layers == []
    assert np.array_equal(shell.model.norm.weight, whole.model.norm.weight)
    assert np.array_equal(shell.head_weight(), whole.head_weight())
    assert (shell.lm_head is None) == cfg["tie_word_embeddings"]
    assert same_leaves(reader.dense_model(), whole)


def test_bad_layer_index_and_token_ids_are_refused(tmp_path):
    reader = lazy.SafetensorsReader(save_hf(TIED, tmp_path / "hf"))
    with pytest.raises(IndexError, match="the model has 2 layers"):
        reader.layer(2)
    with pytest.raises(ValueError, match="token id 256 is outside the vocabulary"):
        reader.embed_rows(np.array([1, 256]))


# --------------------------------------------------------------------------- check()


@pytest.fixture
def sharded(tmp_path):
    folder = save_hf(UNTIED_BIAS, tmp_path / "sharded", max_shard_size="40KB")
    weight_map = json.loads((folder / lazy.INDEX_FILE).read_text())["weight_map"]
    return folder, weight_map


def one_line_error(reader) -> str:
    with pytest.raises(WeightsError) as caught:
        reader.check()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_check_names_a_shard_missing_from_the_index(sharded):
    folder, weight_map = sharded
    shard = folder / weight_map["model.layers.1.mlp.down_proj.weight"]
    shard.unlink()
    message = one_line_error(lazy.SafetensorsReader(folder))
    assert str(shard) in message and "is missing" in message and "re-download" in message


def test_check_names_a_truncated_shard(sharded):
    folder, weight_map = sharded
    shard = folder / weight_map["model.layers.0.mlp.up_proj.weight"]
    os.truncate(shard, shard.stat().st_size - 100)
    message = one_line_error(lazy.SafetensorsReader(folder))
    assert str(shard) in message and "truncated" in message


def test_check_names_a_missing_tensor(sharded, tmp_path):
    folder, weight_map = sharded
    name = "model.layers.1.self_attn.k_proj.bias"
    shard = folder / weight_map[name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = one_line_error(lazy.SafetensorsReader(folder))
    assert str(shard) in message and name in message
    # without an index, the folder is named
    single = save_hf(TIED, tmp_path / "single")
    tensors = load_file(str(single / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    message = one_line_error(lazy.SafetensorsReader(single))
    assert f"no safetensors file in {single} holds tensor model.norm.weight" in message


def test_check_names_a_shape_that_disagrees_with_the_config(tmp_path):
    folder = save_hf(TIED, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    message = one_line_error(lazy.SafetensorsReader(folder))
    assert "model.safetensors" in message and "mlp.gate_proj.weight has shape (96, 64)" in message


# --------------------------------------------------------------------------- random weights


@pytest.mark.parametrize("cfg", [TIED, UNTIED_BIAS], ids=["tied", "untied-bias"])
def test_random_folder_is_init_llama_bit_for_bit(cfg, tmp_path):
    config = LlamaConfig.from_hf_dict(cfg)
    expected = init_llama(config, jax.random.key(7), std=0.05)
    folder = random_weights.write_random_folder(config, 7, tmp_path / "random", std=0.05, progress=False)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == config.num_hidden_layers + 1  # one per layer, one for the rest
    reader = lazy.SafetensorsReader(folder)
    reader.check()
    assert reader.config == config
    assert same_leaves(reader.dense_model(), expected)
    assert same_leaves(reader.layer(1), init_layer(config, layer_key(jax.random.key(7), 1), 0.05))
    # transformers reads the folder as the same weights
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    for name, array in to_state_dict(expected).items():
        assert np.array_equal(state[name], array), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_random_folder_in_16_bits_is_init_llama_rounded(dtype, tmp_path):
    config = LlamaConfig.from_hf_dict(UNTIED_BIAS)
    expected = init_llama(config, jax.random.key(1), std=0.05)
    folder = random_weights.write_random_folder(config, 1, tmp_path / dtype, dtype=dtype, std=0.05, progress=False)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == dtype
    assert (folder / "model-00002-of-00003.safetensors").stat().st_size < 0.6 * sum(
        4 * math.prod(s) for k, s in expected_shapes(config).items() if k.startswith("model.layers.0.")
    )  # 2 bytes a weight
    rounded = jax.tree.map(lambda x: x.astype(dtype).astype(jnp.float32), expected)
    got = lazy.SafetensorsReader(folder).dense_model()
    assert same_leaves(got, rounded)
    assert not same_leaves(got, expected)  # the rounding did happen
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    for name, array in to_state_dict(rounded).items():
        assert np.array_equal(state[name], array), name


def test_random_folder_is_reused_refused_when_foreign_and_atomic(tmp_path, monkeypatch):
    config = LlamaConfig.from_hf_dict(TIED)
    folder = random_weights.write_random_folder(config, 0, tmp_path / "r", progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert random_weights.write_random_folder(config, 0, folder, progress=False) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp  # reused, not rewritten
    with pytest.raises(WeightsError, match="holds other random weights; delete it"):
        random_weights.write_random_folder(config, 1, folder, progress=False)
    (tmp_path / "mine").mkdir()
    with pytest.raises(WeightsError, match="holds something else than random weights"):
        random_weights.write_random_folder(config, 0, tmp_path / "mine", progress=False)

    # a failure half-way leaves neither the folder nor its temporary sibling
    def fail_on_layer_1(config, key, std):
        if np.array_equal(jax.random.key_data(key), jax.random.key_data(layer_key(jax.random.key(0), 1))):
            raise RuntimeError("disk on fire")
        return init_layer(config, key, std)

    monkeypatch.setattr(random_weights, "init_layer", fail_on_layer_1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        random_weights.write_random_folder(config, 0, tmp_path / "half", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r"]


def test_open_reader_writes_a_random_source_into_the_cache_once(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    source = cards.resolve_model(str(tiny_model_dir), random_weights=3)
    reader = cards.open_reader(source, progress=False)
    assert reader.folder == tmp_path / "cache" / "random" / "tiny-llama32-seed3-float32"
    reader.check()
    # the same arrays as the in-memory random model (whose digest is the source's weights hash)
    assert cards.weights_digest(reader.dense_model()) == source.weights_sha256()
    assert cards.open_reader(source, dtype="bfloat16", progress=False).folder.name == "tiny-llama32-seed3-bfloat16"


def test_random_source_records_the_per_layer_scheme(tiny_model_dir):
    scheme = cards.resolve_model(str(tiny_model_dir), random_weights=0).random_weights["init"]
    assert "fold_in(key(seed), i)" in scheme and "num_hidden_layers" in scheme


@pytest.mark.slow
def test_writing_random_weights_keeps_peak_memory_under_half_the_model(tmp_path):
    """A ~1 GB float32 model written with a peak RSS under half of it (one layer at a time;
    the embedding and head a row block at a time). The peak is the child's VmHWM: its
    ru_maxrss would start at pytest's own peak, which Linux carries across fork and exec."""
    script = textwrap.dedent(
        """
        import json, re, sys
        from pathlib import Path
        from nlprune.convert.random_weights import write_random_folder
        from nlprune.modeling.llama import LlamaConfig

        config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)
        write_random_folder(config, 0, Path(sys.argv[1]), progress=False)
        with open("/proc/self/status") as f:
            peak_kb = int(re.search(r"^VmHWM:\\s+(\\d+) kB", f.read(), re.M).group(1))
        print(json.dumps({"peak_bytes": peak_kb * 1024}))
        """
    )
    folder = tmp_path / "random"
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert model_bytes > 0.95e9  # float32, as big as the test says
    assert peak < model_bytes / 2, f"peak RSS {peak / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"


# --------------------------------------------------------------------------- GGUF


def test_gguf_reader_equals_the_whole_model_loader():
    source = cards.resolve_model("smollm2-135m")
    whole = load_gguf(source.weights_path)
    reader = cards.open_reader(source)
    reader.check()
    assert reader.config == whole.config
    last = whole.config.num_hidden_layers - 1
    for i in (0, last):
        assert same_leaves(reader.layer(i), whole.model.layers[i]), f"layer {i}"
    ids = np.array([[0, 17, whole.config.vocab_size - 1], [42, 42, 3]])
    assert np.array_equal(reader.embed_rows(ids), np.asarray(whole.model.embed_tokens.weight)[ids])
    shell = reader.shell()
    assert shell.lm_head is None and np.array_equal(shell.model.norm.weight, whole.model.norm.weight)


# --------------------------------------------------------------------------- model cards


def stated_parameters(text: str) -> float:
    return float(text[:-1]) * {"M": 1e6, "B": 1e9}[text[-1]]


@pytest.mark.parametrize("name", sorted(cards.available_cards()))
def test_every_card_states_its_parameter_count(name):
    card = cards.get_card(name)
    count = sum(math.prod(s) for s in expected_shapes(cards.card_config(card)).values())
    assert count == pytest.approx(stated_parameters(card["architecture"]["parameters"]), rel=5e-3)


@pytest.mark.parametrize("name, layers, hidden", [("llama-3.1-8b", 32, 4096), ("llama-3.1-70b", 80, 8192)])
def test_llama31_cards_resolve_with_random_weights_and_the_llama3_tokenizer(name, layers, hidden):
    source = cards.resolve_model(name, random_weights=0)
    config = source.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (layers, hidden, 128)
    assert config.rope_scaling.factor == 8.0 and not config.tie_word_embeddings
    tokenizer = cards.load_tokenizer(source)
    assert tokenizer("Hello world")["input_ids"][0] == 128000 == config.bos_token_id
