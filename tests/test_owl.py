"""Layer-wise sparsity: OWL's plan (outlier ratios, the spread, whole counts) and per-layer /
per-linear plans from a file, pruned by the pipeline at each layer's (linear's) own ratio."""

import json

import numpy as np
import pytest

from nlprune import api, cards
from nlprune.cli import main as cli_main
from nlprune.data import calibration_windows
from nlprune.modeling.llama import LlamaConfig
from nlprune.prune.owl import (
    layer_outlier_ratio,
    outlier_ratios,
    owl_layer_ratios,
    ratio_granularity,
    realisable_ratios,
)
from nlprune.sparsity import PatternError, SparsityPattern, SparsityProfile, linear_name

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return api.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def calibration(tiny, shared_data_dir):
    windows, _ = calibration_windows(tiny.tokenizer, 4, 64, 0, data_dir=shared_data_dir)
    return windows


# ---------------------------------------------------------------------------------- the plan


def test_owl_spread_by_hand():
    # outliers 0, 1, 2 -> kept more by 0, 0.1, 0.2 (lambda 0.1), centred on 0.1 -> 0.6, 0.5, 0.4
    np.testing.assert_allclose(owl_layer_ratios([0.0, 1.0, 2.0], 0.5, 0.1), [0.6, 0.5, 0.4], atol=1e-12)
    # the mean is the target; the extremes are 2 lambda apart; more outliers, pruned less
    rng = np.random.default_rng(0)
    outliers = rng.random(30) * 0.02
    ratios = np.array(owl_layer_ratios(list(outliers), 0.7, 0.08))
    assert abs(ratios.mean() - 0.7) < 1e-12
    assert ratios.max() - ratios.min() == pytest.approx(0.16, abs=1e-12)
    assert np.all(np.diff(ratios[np.argsort(outliers)]) <= 1e-15)
    # equal outlier ratios (or lambda 0) leave every layer at the target
    assert owl_layer_ratios([0.01] * 4, 0.5, 0.08) == [0.5] * 4
    assert owl_layer_ratios([0.01, 0.02], 0.5, 0.0) == [0.5, 0.5]


def test_layer_outlier_ratio_counts_scores_above_m_times_mean():
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((4, 32)).astype(np.float32)]
    norms = [rng.random(16).astype(np.float32) * 10, rng.random(32).astype(np.float32)]
    scores = np.concatenate([(np.abs(w) * np.sqrt(n)[None, :]).ravel() for w, n in zip(weights, norms)])
    for m in (0.5, 1.0, 2.0, 3.0):
        want = np.count_nonzero(scores > m * scores.mean()) / scores.size
        assert layer_outlier_ratio(weights, norms, m) == pytest.approx(want, abs=1e-9)
    assert 0 < layer_outlier_ratio(weights, norms, 2.0) < layer_outlier_ratio(weights, norms, 1.0) < 1


def smollm2_like_config(layers: int = 30) -> LlamaConfig:
    return LlamaConfig.from_hf_dict({
        "vocab_size": 100, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": layers,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 2048,
    })


@pytest.mark.parametrize("target", [0.5, 0.7, 0.3])
def test_realisable_ratios_prune_whole_rows_and_keep_the_target(target):
    config = smollm2_like_config()
    g = ratio_granularity(config)
    assert g == 192  # gcd(576, 576, 1536)
    planned = owl_layer_ratios(list(np.random.default_rng(2).random(30)), target, 0.08)
    ratios = realisable_ratios(planned, target, config)
    for r, p in zip(ratios, planned):
        k = round(r * g)
        assert abs(r - k / g) < 1e-12 and abs(r - p) <= 1 / g
        for width in (576, 1536):  # every row prunes exactly width * k / g weights
            assert int(width * r) == width * k // g and (width * k) % g == 0
    # 30 layers of equal size: the model-wide sparsity is the mean, target * 192 * 30 is whole
    assert sum(round(r * g) for r in ratios) == round(target * g * 30)
    assert abs(np.mean(ratios) - target) < 1e-4
    # the order of the plan survives the rounding
    assert np.all(np.diff(np.array(ratios)[np.argsort(planned)]) >= 0)


def test_outlier_ratios_match_a_transformers_pass(tiny, tiny_model_dir, calibration):
    """Each layer's outlier ratio from nlprune's dense layer-by-layer pass equals the one from
    the inputs transformers' own forward feeds each linear (hooks), M = 2 and 5."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    inputs: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def record(_module, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            inputs[key] = inputs.get(key, 0) + (x * x).sum(0)
        return record

    handles = [getattr(getattr(layer, "self_attn" if n in LINEARS[:4] else "mlp"), n).register_forward_hook(hook((i, n)))
               for i, layer in enumerate(hf.model.layers) for n in LINEARS]
    with torch.no_grad():
        hf(torch.from_numpy(np.asarray(calibration)).long())
    for h in handles:
        h.remove()
    for m in (2.0, 5.0):
        ours = outlier_ratios(tiny.model, calibration, m, batch_size=2, progress=False)
        for i, layer in enumerate(hf.model.layers):
            mods = {n: getattr(getattr(layer, "self_attn" if n in LINEARS[:4] else "mlp"), n) for n in LINEARS}
            scores = np.concatenate([
                (mods[n].weight.detach().double().abs() * inputs[(i, n)].sqrt()[None, :]).numpy().ravel() for n in LINEARS
            ])
            want = np.count_nonzero(scores > m * scores.mean()) / scores.size
            assert abs(ours[i] - want) <= 3 / scores.size, (m, i, ours[i], want)  # float32 vs float64 at the boundary
        assert len(set(ours)) > 1


# ---------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("target", [0.5, pytest.param(0.7, marks=pytest.mark.slow)])
def test_owl_run_prunes_each_layer_at_its_planned_ratio(target, tiny_model_dir, shared_data_dir, tmp_path, capsys, prune_cli):
    out = tmp_path / "run"
    assert prune_cli(out, "--prune-method", "wanda", "--sparsity-ratio", str(target),
                     "--sparsity-profile", "owl", "--owl-lambda", "0.1") == 0
    assert "owl profile: layers pruned" in capsys.readouterr().out
    rec = json.loads((out / "results.json").read_text())
    planned, measured = rec["sparsity"]["planned"], rec["sparsity"]["per_layer"]
    assert planned["profile"] == "owl" and planned["owl_lambda"] == 0.1 and planned["owl_m"] == 5.0
    owl = planned["owl"]
    assert len(owl["outlier_ratios"]) == 6 and len(set(owl["outlier_ratios"])) > 1
    # every layer is pruned exactly at its (whole-count) planned ratio
    np.testing.assert_allclose(measured, owl["ratios"], atol=1e-12)
    # the recorded ratios are OWL's plan of the recorded outlier ratios (not just a copy of a list)
    from nlprune.plan import config_of

    config = config_of(str(tiny_model_dir))[0]
    replanned = realisable_ratios(owl_layer_ratios(owl["outlier_ratios"], target, 0.1), target, config)
    np.testing.assert_allclose(owl["ratios"], replanned, atol=1e-12)
    for i, r in enumerate(owl["ratios"]):
        for n in LINEARS:
            assert rec["sparsity"]["per_linear"][linear_name(i, n)] == pytest.approx(r, abs=1e-12)
    # the spread is OWL's (2 lambda, to the rounding of 1/64) and the layer with most outliers is pruned least
    assert max(measured) - min(measured) == pytest.approx(0.2, abs=2 / 64)
    assert measured[int(np.argmax(owl["outlier_ratios"]))] == min(measured)
    # model-wide: the target, up to 1 / (2 * 64 * 6) where target * 64 * 6 is not whole
    assert abs(rec["sparsity"]["overall"] - target) <= 1 / (2 * 64 * 6) + 1e-12
    if target == 0.5:
        assert rec["sparsity"]["overall"] == 0.5


@pytest.mark.slow
def test_layer_sparsity_file_per_layer_and_per_linear(tiny_model_dir, shared_data_dir, tmp_path, prune_cli):
    per_layer = [0.25, 0.5, 0.75, 0.5, 0.375, 0.625]
    (tmp_path / "layers.json").write_text(json.dumps(per_layer))
    out = tmp_path / "layers"
    assert prune_cli(out, "--prune-method", "sparsegpt",
                     "--layer-sparsity", str(tmp_path / "layers.json")) == 0
    rec = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose(rec["sparsity"]["per_layer"], per_layer, atol=1e-4)
    assert rec["args"]["sparsity_ratio"] == pytest.approx(np.mean(per_layer))  # the plan's overall ratio
    assert rec["config"]["layer_sparsity"] == per_layer  # the plan itself: reruns need no file
    assert rec["sparsity"]["planned"]["file"]["sha256"]

    # per linear: q_proj and k_proj of layer 0 at their own ratios, the rest at --sparsity-ratio
    plan = {"model.layers.0.self_attn.q_proj": 0.25, "model.layers.0.self_attn.k_proj.weight": 0.75}
    (tmp_path / "linears.json").write_text(json.dumps(plan))
    out = tmp_path / "linears"
    assert prune_cli(out, "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--layer-sparsity", str(tmp_path / "linears.json")) == 0
    per_linear = json.loads((out / "results.json").read_text())["sparsity"]["per_linear"]
    assert per_linear["model.layers.0.self_attn.q_proj"] == 0.25
    assert per_linear["model.layers.0.self_attn.k_proj"] == 0.75
    assert all(v == 0.5 for k, v in per_linear.items() if k.split(".")[-1] not in ("q_proj", "k_proj") or ".0." not in k)

    # v_proj of layer 0 came from the pass at 0.5, on the same statistics as a uniform run: same mask
    uniform = tmp_path / "uniform"
    assert prune_cli(uniform, "--prune-method", "wanda", "--sparsity-ratio", "0.5") == 0
    ours, _ = api.load_run(out)
    theirs, _ = api.load_run(uniform)
    v = lambda m: np.asarray(m.model.layers[0].self_attn.v_proj.mask)  # noqa: E731
    q = lambda m: np.asarray(m.model.layers[0].self_attn.q_proj.mask)  # noqa: E731
    np.testing.assert_array_equal(v(ours), v(theirs))
    assert not np.array_equal(q(ours), q(theirs))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, plan, message",
    [
        (["--sparsity-ratio", "0.5", "--sparsity-profile", "owl", "--owl-lambda", "1.0"], None, "--owl-lambda is 1, outside [0, 1)"),
        (["--sparsity-ratio", "0.5", "--sparsity-profile", "owl", "--owl-lambda", "-0.1"], None, "--owl-lambda is -0.1"),
        (["--sparsity-ratio", "0.5", "--sparsity-profile", "owl", "--owl-m", "0"], None, "--owl-m is 0"),
        (["--sparsity-type", "2:4", "--sparsity-profile", "owl"], None, "N:M sparsity (2:4) stays uniform"),
        (["--sparsity-ratio", "0.5", "--owl-m", "3"], None, "apply only with --sparsity-profile owl"),
        (["--sparsity-type", "2:4"], [0.5] * 6, "N:M sparsity (2:4) stays uniform"),
        ([], [0.5] * 5, "has 5 ratios but the model has 6 layers"),
        ([], [0.5, 0.5, 1.0, 0.5, 0.5, 0.5], "the ratio of layer 2 is 1, outside [0, 1)"),
        ([], [0.5, -0.2, 0.5, 0.5, 0.5, 0.5], "the ratio of layer 1 is -0.2, outside [0, 1)"),
        (["--sparsity-ratio", "0.5"], {"model.layers.6.mlp.up_proj": 0.5}, "unknown linear 'model.layers.6.mlp.up_proj'"),
        (["--sparsity-ratio", "0.5"], {"model.layers.0.mlp.w1": 0.5}, "unknown linear 'model.layers.0.mlp.w1'"),
        ([], {"model.layers.0.mlp.up_proj": 0.5}, "give the others' ratio with --sparsity-ratio"),
        (["--sparsity-ratio", "0.3"], [0.5] * 6, "leave --sparsity-ratio out"),
        (["--sparsity-profile", "owl", "--sparsity-ratio", "0.5"], [0.5] * 6, "not both"),
        ([], "not json", "is not JSON"),
    ],
)
def test_bad_layer_sparsity_input_is_one_line_before_anything_loads(args, plan, message, tiny_model_dir, shared_data_dir, tmp_path, capsys, monkeypatch, prune_cli):
    monkeypatch.setattr(cards, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))
    extra = []
    if plan is not None:
        path = tmp_path / "plan.json"
        path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
        extra = ["--layer-sparsity", str(path)]
    out = tmp_path / "run"
    assert prune_cli(out, "--prune-method", "wanda", *args, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_profile_object_checks():
    target = SparsityPattern(0.5)
    profile = SparsityProfile(target, 2, (0.25, 0.75), (("model.layers.1.mlp.up_proj", 0.1),), "file")
    assert profile.pattern(0, "q_proj") == SparsityPattern(0.25)
    assert profile.pattern(1, "up_proj") == SparsityPattern(0.1)
    assert profile.pattern(1, "gate_proj") == SparsityPattern(0.75)
    assert SparsityProfile.uniform(target, 2).pattern(1, "down_proj") is target
    with pytest.raises(PatternError, match="stays uniform"):
        SparsityProfile(SparsityPattern(0.5, 2, 4), 2, (0.5, 0.5))


@pytest.mark.slow
def test_an_interrupted_owl_run_resumes_to_the_same_masks(tiny_model_dir, shared_data_dir, tmp_path, prune_cli):
    from nlprune.packed_masks import load_packed_masks
    from nlprune.runs import RunDir

    flags = ["--prune-method", "sparsegpt", "--sparsity-ratio", "0.6", "--sparsity-profile", "owl"]
    whole = tmp_path / "whole"
    assert prune_cli(whole, *flags) == 0
    original = RunDir.save_layer

    def save_then_stop(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 2:
            raise KeyboardInterrupt

    parts = tmp_path / "parts"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunDir, "save_layer", save_then_stop)
        assert prune_cli(parts, *flags) == 130
    assert prune_cli(parts, *flags) == 0
    rec = json.loads((parts / "results.json").read_text())
    assert rec["resumed_from_layer"] == 3
    a, b = load_packed_masks(whole / "masks.safetensors"), load_packed_masks(parts / "masks.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # another plan (here another lambda) is not resumed from this one's state
    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunDir, "save_layer", save_then_stop)
        assert prune_cli(tmp_path / "other", *flags) == 130
    assert prune_cli(tmp_path / "other", *flags, "--owl-lambda", "0.05") == 2


@pytest.mark.slow
def test_owl_on_a_four_device_mesh_plans_and_prunes_as_one_device(tiny_model_dir, shared_data_dir, tmp_path, prune_cli):
    import os
    import subprocess
    import sys

    from nlprune.packed_masks import load_packed_masks

    flags = ["--prune-method", "wanda", "--sparsity-ratio", "0.7", "--sparsity-profile", "owl"]
    one = tmp_path / "one"
    assert prune_cli(one, *flags) == 0
    env = dict(os.environ, JAX_PLATFORMS="cpu", NLPRUNE_COMPILATION_CACHE="0")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    four = tmp_path / "four"
    proc = subprocess.run(
        [sys.executable, "-m", "nlprune.cli", "prune", "--model", str(tiny_model_dir), "--nsamples", "4", "--seqlen", "64",
         "--data-dir", str(shared_data_dir), "--output", str(four), "--mesh", "data=2,model=2", *flags],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads((one / "results.json").read_text()), json.loads((four / "results.json").read_text())
    assert b["mesh"]["devices"] == 4
    size = 36864  # weights per layer of the tiny model
    np.testing.assert_allclose(a["sparsity"]["planned"]["owl"]["outlier_ratios"],
                               b["sparsity"]["planned"]["owl"]["outlier_ratios"], atol=1.5 / size)
    assert a["sparsity"]["planned"]["owl"]["ratios"] == b["sparsity"]["planned"]["owl"]["ratios"]
    ma, mb = load_packed_masks(one / "masks.safetensors"), load_packed_masks(four / "masks.safetensors")
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
