"""A pruned run exported with `nlprune export-hf` is the same model in transformers."""

import json

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nlprune import api
from nlprune.cli import main as cli_main
from nlprune.data import eval_windows


@pytest.fixture(scope="module")
def pruned_run(tiny_model_dir, shared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sparsegpt-2of4"
    rc = cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", "sparsegpt", "--sparsity-type", "2:4",
                   "--nsamples", "4", "--seqlen", "64", "--data-dir", str(shared_data_dir), "--output", str(out)])
    assert rc == 0
    return out


def test_export_matches_run_in_transformers(pruned_run, tiny_model_dir, shared_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    assert cli_main(["export-hf", "--run", str(pruned_run), "--output", str(hf_dir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied

    model, record = api.load_run(pruned_run)
    loaded = api.load(str(tiny_model_dir))
    windows, _ = eval_windows(loaded.tokenizer, "c4", 2, 128, data_dir=shared_data_dir, progress=False)
    with torch.no_grad():
        ref = hf(torch.from_numpy(windows).long()).logits.numpy()
    ours = np.stack([np.asarray(eqx.filter_jit(model)(jnp.asarray(w))) for w in windows])
    assert np.abs(ours - ref).max() <= 1e-4

    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    for name, sparsity in record["sparsity"]["per_linear"].items():
        w = state[name + ".weight"]
        assert (w == 0).mean() == pytest.approx(sparsity, abs=0), name


def test_eval_of_export_equals_eval_of_run(pruned_run, tiny_model_dir, shared_data_dir, tmp_path):
    hf_dir = tmp_path / "hf"
    assert cli_main(["export-hf", "--run", str(pruned_run), "--output", str(hf_dir)]) == 0
    common = dict(nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False)
    from_run = api.evaluate(str(tiny_model_dir), run_dir=pruned_run, **common)
    from_export = api.evaluate(str(hf_dir), **common)
    assert from_export["perplexity"] == pytest.approx(from_run["perplexity"], rel=1e-6)


def test_export_refuses_existing_folder(pruned_run, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert cli_main(["export-hf", "--run", str(pruned_run), "--output", str(hf_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((hf_dir / "config.json").read_text()) == {}


def test_incomplete_or_missing_run_dir(tmp_path, capsys):
    assert cli_main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert cli_main(["export-hf", "--run", str(tmp_path / "half"), "--output", str(tmp_path / "o")]) == 2
    assert "did not finish" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_refuses_run_of_another_model(pruned_run, capsys):
    assert cli_main(["eval", "--model", "smollm2-135m", "--run", str(pruned_run)]) == 2
    assert "was pruned from tiny-llama32" in capsys.readouterr().err
