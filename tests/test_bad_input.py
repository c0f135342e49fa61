"""Bad input gets one clear error naming the problem and the fix, not a traceback wall."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nlprune import cards
from nlprune.convert.hf import WeightsError, load_hf_folder
from nlprune.modeling.llama import ConfigError, LlamaConfig

from test_llama_parity import tiny_hf_config


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nlprune.cli", *args], capture_output=True, text=True, env=env, timeout=900
    )


def test_unknown_model_lists_known_ones():
    with pytest.raises(cards.ModelNotFound, match="smollm2-135m.*|.*llama-3.2-1b"):
        cards.resolve_model("gpt-17")
    proc = run_cli("eval", "--model", "gpt-17")
    assert proc.returncode == 2
    assert "unknown model 'gpt-17'" in proc.stderr and "smollm2-135m" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("sliding_window", 4096),
        ("hidden_act", "gelu"),
        ("some_new_feature", True),
    ],
)
def test_unsupported_config_field_is_named(field, value):
    cfg = tiny_hf_config(**{field: value})
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_dict(cfg)


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    from nlprune.convert import gguf as gguf_conv

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install gguf"):
        gguf_conv.load_gguf(tmp_path / "x.gguf")


def _write_folder(folder, cfg, state):
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"))


def test_weights_folder_disagreeing_with_config(tmp_path):
    from nlprune.convert.hf import expected_shapes

    cfg = tiny_hf_config()
    config = LlamaConfig.from_hf_dict(cfg)
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(config).items()}
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    _write_folder(tmp_path / "m", cfg, state)
    with pytest.raises(WeightsError, match=r"model.layers.1.mlp.up_proj.weight: has \(95, 64\), config implies \(96, 64\)"):
        load_hf_folder(tmp_path / "m")
    proc = run_cli("eval", "--model", str(tmp_path / "m"))
    assert proc.returncode == 2 and "up_proj" in proc.stderr and "Traceback" not in proc.stderr


def test_folder_without_config(tmp_path):
    proc = run_cli("eval", "--model", str(tmp_path))
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_a_run_planned_far_beyond_memory_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`--nsamples 100000` would swap for hours: the plan (nlprune plan) is made before anything
    loads, and a run planned above 1.5x the machine's memory is refused in one line; above 1x,
    a one-line note. The machine's memory is set here so that the test is the same anywhere."""
    from nlprune import cards, runner
    from nlprune.cli import main as cli_main
    from nlprune.plan import config_of, plan_memory

    need = plan_memory(config_of(str(tiny_model_dir))[0], nsamples=4, seqlen=64).cpu_process_bytes
    page = 4096
    real_sysconf = os.sysconf

    def memory(pages):
        monkeypatch.setattr(runner.os, "sysconf", lambda n: page if n == "SC_PAGE_SIZE" else
                            pages if n == "SC_PHYS_PAGES" else real_sysconf(n))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory plan was checked")

    argv = ["prune", "--model", str(tiny_model_dir), "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--nsamples", "4", "--seqlen", "64",
            "--output", str(tmp_path / "run")]
    with monkeypatch.context() as m:
        m.setattr(cards, "load_model", no_loading)
        memory(int(need / 1.6 / page))
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "planned to need" in err[0] and "lower --nsamples" in err[0], err
        assert not (tmp_path / "run").exists()
        memory(int(need / 1.2 / page))  # above 1x, under 1.5x: a note, then the run (which loads)
        with pytest.raises(AssertionError, match="loaded before"):
            cli_main(argv)
        assert "note: this run is planned to need" in capsys.readouterr().err
