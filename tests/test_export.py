"""Export to a Hugging Face folder: transformers loads it and computes the masked model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from nlprune.convert.export import export_hf
from nlprune.convert.hf import WeightsError, from_transformers, load_hf_folder, to_state_dict
from nlprune.modeling.masks import linear_paths, mask_filter_spec, with_masks


def tiny_hf_config(**overrides) -> dict:
    cfg = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return cfg


def random_hf_model(cfg: dict, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    with torch.no_grad():  # HF inits norms/biases to constants: randomise so nothing hides
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.08 + (1.0 if "norm" in name else 0.0))
    return model


def pruned_model(seed: int = 0, **overrides):
    """nlprune model with a random ~50% mask on every linear."""
    model = with_masks(from_transformers(random_hf_model(tiny_hf_config(**overrides), seed)))
    rng = np.random.default_rng(seed)
    masks, rest = eqx.partition(model, mask_filter_spec(model))
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.5, m.dtype), masks)
    return eqx.combine(masks, rest)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_same_logits_and_sparsity(tmp_path, tied):
    model = pruned_model(tie_word_embeddings=tied)
    out = export_hf(model, tmp_path / "export")

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert type(hf) is transformers.LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()

    ids = np.random.default_rng(1).integers(0, 97, size=(2, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.vmap(model)(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4

    # Pruned weights are exact zeros, exactly where the mask is 0 (~50% of each linear).
    params = dict(hf.named_parameters())
    for path, lin in zip(linear_paths(model.config), (
        lin for layer in model.model.layers for lin in layer.linears().values()
    )):
        mask = np.asarray(lin.mask)
        weight = params[f"{path}.weight"].detach().numpy()
        np.testing.assert_array_equal(weight == 0, mask == 0, err_msg=path)
        assert 0.4 < (mask == 0).mean() < 0.6

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and hf.config.tie_word_embeddings is tied
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {np.dtype(np.float32)}
    assert ("lm_head.weight" in keys) is not tied
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    # And nlprune reads back exactly what it wrote.
    back = to_state_dict(load_hf_folder(out))
    want = to_state_dict(model)
    assert set(back) == set(want)
    for k in want:
        assert back[k].tobytes() == want[k].tobytes(), k


def test_export_writes_tokenizer_and_generation_config(tmp_path):
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "max_new_tokens": 32}
    out = export_hf(pruned_model(), tmp_path / "export", tokenizer=tiny_tokenizer(), generation_config=gen)
    assert json.loads((out / "generation_config.json").read_text()) == gen
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 32
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"][-2:] == [5, 7] and tok.eos_token == "</s>"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_export_refuses_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_hf(pruned_model(), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces model folders only: an unrelated folder is never wiped.
    with pytest.raises(FileExistsError, match="not a model folder"):
        export_hf(pruned_model(), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary debris


def test_export_overwrite_replaces_previous_export(tmp_path):
    out = tmp_path / "export"
    export_hf(pruned_model(seed=0), out)
    # A file the export did not write is never deleted: --overwrite refuses, naming it.
    (out / "notes.txt").write_text("mine")
    second = pruned_model(seed=1)
    with pytest.raises(FileExistsError, match="did not write .notes.txt"):
        export_hf(second, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    export_hf(second, out, overwrite=True)
    back = to_state_dict(load_hf_folder(out))
    for k, v in to_state_dict(second).items():
        np.testing.assert_array_equal(back[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_failed_export_leaves_existing_folder_untouched(tmp_path):
    out = tmp_path / "export"
    first = pruned_model(seed=0)
    export_hf(first, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")  # half-written, then dies
            raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        export_hf(pruned_model(seed=1), out, overwrite=True, tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_into_empty_existing_folder(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    export_hf(pruned_model(), out)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", ".nlprune-export.json"}
    # the marker lists what the export wrote; files have the usual permissions (not 0600)
    assert json.loads((out / ".nlprune-export.json").read_text())["files"] == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_truncated_safetensors_raises_weights_error(tmp_path):
    out = export_hf(pruned_model(), tmp_path / "export")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated or corrupt.*re-export"):
        load_hf_folder(out)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def test_bfloat16_export_loads_in_transformers_and_is_half_the_size(tmp_path):
    """At bfloat16, transformers loads the folder in bfloat16 and its logits agree with
    nlprune's forward of the same bfloat16-cast weights; the folder is half the float32 one."""
    import ml_dtypes
    from safetensors import safe_open

    model = pruned_model(seed=3)
    full = export_hf(model, tmp_path / "f32")
    sparsity = {"method": "wanda", "pattern": "unstructured", "ratio": 0.5}
    half = export_hf(model, tmp_path / "bf16", dtype="bfloat16", sparsity=sparsity)
    assert 0.45 < folder_bytes(half) / folder_bytes(full) < 0.55

    cfg = json.loads((half / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["nlprune_sparsity"] == sparsity
    with safe_open(str(half / "model.safetensors"), framework="numpy") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(ml_dtypes.bfloat16)}

    hf = transformers.AutoModelForCausalLM.from_pretrained(half, dtype="auto").eval()
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert hf.config.nlprune_sparsity == sparsity  # kept as an attribute, otherwise unused

    # nlprune's model with every float leaf cast to bfloat16 (masks are 0/1: exact)
    def cast(x):
        return x.astype(jnp.bfloat16) if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) else x

    ours_bf16 = jax.tree.map(cast, model)
    ids = np.random.default_rng(4).integers(0, 97, size=(2, 24))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.float().numpy()
        reference = transformers.AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()(
            torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.vmap(ours_bf16)(jnp.asarray(ids)).astype(jnp.float32))
    scale = np.abs(reference).max()
    bf16_gap = np.abs(ours - theirs).max() / scale
    assert bf16_gap < 2e-2, bf16_gap  # a few bfloat16 roundings (8 bits of mantissa) deep
    assert np.abs(ours - reference).max() / scale < 5e-2  # both near the float32 logits

    # pruned weights stay exact zeros, and nlprune reads back exactly the rounded weights
    back = to_state_dict(load_hf_folder(half))
    for k, v in to_state_dict(model).items():
        np.testing.assert_array_equal(back[k], v.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
        assert np.count_nonzero(back[k] == 0) >= np.count_nonzero(v == 0)


def test_float16_export_refuses_values_beyond_its_range(tmp_path):
    model = pruned_model()
    big = eqx.tree_at(lambda m: m.model.norm.weight, model, model.model.norm.weight.at[0].set(1e6))
    from nlprune.convert.export import ExportError

    with pytest.raises(ExportError, match="model.norm.weight has values beyond float16's range"):
        export_hf(big, tmp_path / "f16", dtype="float16")
    assert not (tmp_path / "f16").exists()
    export_hf(model, tmp_path / "ok", dtype="float16")
    with pytest.raises(ExportError, match="unknown export dtype 'int8'"):
        export_hf(model, tmp_path / "int8", dtype="int8")


@pytest.mark.slow
def test_export_hf_of_a_run_defaults_to_the_source_dtype(tiny_model_dir, shared_data_dir, tmp_path):
    """A run pruned from a bfloat16 checkpoint exports as bfloat16 unless --dtype says otherwise;
    config.json records the run's sparsity."""
    from safetensors import safe_open

    from nlprune import api
    from nlprune.cli import main as cli_main

    loaded = api.load(str(tiny_model_dir))
    source = export_hf(loaded.model, tmp_path / "bf16-source", tokenizer=loaded.tokenizer, dtype="bfloat16")
    run = tmp_path / "run"
    assert cli_main(["prune", "--model", str(source), "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--nsamples", "2", "--seqlen", "32", "--data-dir", str(shared_data_dir), "--output", str(run)]) == 0
    for flag, want in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
        out = tmp_path / f"export-{want}"
        assert cli_main(["export-hf", "--run", str(run), "--output", str(out), *flag]) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["torch_dtype"] == want
        assert cfg["nlprune_sparsity"]["method"] == "wanda" and cfg["nlprune_sparsity"]["ratio"] == 0.5
        assert cfg["nlprune_sparsity"]["measured"] == pytest.approx(0.5)
        with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {want}
    # and from a float32 checkpoint (the tiny model's config says float32): float32
    out = tmp_path / "from-f32"
    run32 = tmp_path / "run32"
    assert cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", "magnitude", "--sparsity-ratio", "0.5",
                     "--nsamples", "2", "--seqlen", "32", "--data-dir", str(shared_data_dir), "--output", str(run32)]) == 0
    assert cli_main(["export-hf", "--run", str(run32), "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
