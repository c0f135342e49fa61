"""`nlprune plan`: peak memory per device from the config alone, checked against real runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlprune import cards
from nlprune.cli import main as cli_main
from nlprune.plan import F32, plan_memory

WORKER = Path(__file__).with_name("_plan_worker.py")
GPU_PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_paper" / "gpu_paper_protocol.py"
LLAMA_1B = cards.card_config(cards.get_card("llama-3.2-1b"))


def test_paper_protocol_plan_for_llama_3_2_1b():
    """8 x 2048 calibration, non-linear: the n x n attention of all 8 KV groups (4 query heads
    each, every window) dominates, and more devices lower the peak per device."""
    plan = plan_memory(LLAMA_1B, "llama-3.2-1b", method="nonlinear", nsamples=8, seqlen=2048)
    targets = 8 * 8 * 4 * 2048 * 2048 * F32  # groups x windows x heads per group x n x n
    assert plan.peak_stage == "q/k/v"
    assert plan.breakdown["attention n x n"] >= targets
    assert plan.breakdown["hidden states"] == 2 * 8 * 2048 * 2048 * F32  # layer input + attention input
    assert plan.dense_weight_bytes == pytest.approx(1.236e9 * F32, rel=0.01)  # 1.24B parameters
    # 'model' shares the KV groups, 'data' the windows
    on_model = plan_memory(LLAMA_1B, method="nonlinear", nsamples=8, seqlen=2048, model=4)
    on_data = plan_memory(LLAMA_1B, method="nonlinear", nsamples=8, seqlen=2048, data=4)
    assert on_model.stages["q/k/v"]["attention n x n"] < plan.stages["q/k/v"]["attention n x n"]
    assert on_model.stages["q/k/v"]["weights"] < plan.stages["q/k/v"]["weights"]
    assert on_data.stages["q/k/v"]["hidden states"] < plan.stages["q/k/v"]["hidden states"]
    # the suggestions re-plan, and each lowers the peak
    assert plan.suggestions and all(s.peak_bytes < plan.peak_bytes for s in plan.suggestions)
    assert any("--window-chunk" in s.option for s in plan.suggestions)


def test_sparsegpt_plan_counts_the_down_projection_hessian():
    plan = plan_memory(LLAMA_1B, method="sparsegpt", nsamples=8, seqlen=2048)
    assert plan.stages["down"]["Hessians"] >= 8192 * 8192 * F32  # X^T X of the MLP's 8192 features
    assert plan_memory(LLAMA_1B, method="wanda", nsamples=8, seqlen=2048).stages["down"]["Hessians"] == 0


def test_plan_command(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", "--model", "llama-3.2-1b", "--nsamples", "8", "--seqlen", "2048",
                   "--prune-method", "nonlinear", "--mesh", "data=2,model=2", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for what in ("peak per device", "weights", "hidden states", "Hessians", "attention n x n", "options that lower the peak"):
        assert what in text, what
    rec = json.loads(out.read_text())
    assert rec["devices"] == 4 and rec["settings"]["model"] == 2 and rec["peak_bytes"] > 0


def test_plan_recipe_best_counts_the_fill_ins_hessians(capsys, tmp_path):
    """--recipe best fills in with SparseGPT (and re-fits): the plan carries its Hessians; the
    paper's recipe (Wanda fill-in) has none, and its full-batch solve holds every window's n x n
    attention where best's one-window steps hold one."""
    plans = {}
    for recipe in ("paper", "best"):
        out = tmp_path / f"{recipe}.json"
        assert cli_main(["plan", "--model", "llama-3.2-1b", "--prune-method", "nonlinear", "--recipe", recipe,
                         "--output", str(out)]) == 0
        plans[recipe] = json.loads(out.read_text())
    assert plans["best"]["method_options"]["linear_method"] == "sparsegpt"
    assert plans["paper"]["method_options"]["linear_method"] == "wanda"
    for stage in ("q/k/v", "o", "gate/up", "down"):
        assert plans["best"]["stages"][stage]["Hessians"] > 0 == plans["paper"]["stages"][stage]["Hessians"]
    assert plans["paper"]["stages"]["q/k/v"]["attention n x n"] > plans["best"]["stages"]["q/k/v"]["attention n x n"]
    assert plans["paper"]["method_options"]["window_batch"] is None and plans["best"]["method_options"]["window_batch"] == 1
    out = tmp_path / "wanda-refit.json"  # a baseline with --refit holds Hessians too
    assert cli_main(["plan", "--model", "llama-3.2-1b", "--prune-method", "wanda", "--refit", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["stages"]["down"]["Hessians"] > 0


def test_recompute_targets_is_suggested_and_fits_best_at_2048_on_the_1b_shape(capsys, tmp_path):
    """best at 2048 stores every window's dense targets (solve and q/k refit): over 24 GiB for
    Llama 3.2-1B. Plan suggests --recompute-targets (the same method) and re-planned with it
    the n x n term is one step's windows, not all of them."""
    base = ["plan", "--model", "llama-3.2-1b", "--prune-method", "nonlinear", "--recipe", "best",
            "--seqlen", "2048", "--batch-size", "2"]
    plans = {}
    for name, extra in (("stored", []), ("recomputed", ["--recompute-targets"])):
        out = tmp_path / f"{name}.json"
        assert cli_main([*base, *extra, "--output", str(out)]) == 0
        plans[name] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "--recompute-targets          ->" in printed.split("llama-3.2-1b: nonlinear")[1]  # the first plan's suggestion
    assert plans["recomputed"]["method_options"]["recompute_targets"] is True
    nn = {k: p["stages"]["q/k/v"]["attention n x n"] for k, p in plans.items()}
    assert nn["recomputed"] < nn["stored"] / 3
    assert plans["stored"]["cpu_process_bytes"] > 24 * 2**30 > plans["recomputed"]["cpu_process_bytes"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prune-method", "wanda", "--recipe", "best"], "--recipe (nonlinear) does not apply to --prune-method wanda"),
        (["--mesh", "data=2,modle=2"], "unknown axis 'modle'"),
        (["--mesh", "data=2", "--devices", "2"], "give --mesh or --devices, not both"),
        (["--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["--prune-method", "wanda", "--window-chunk", "2"], "--window-chunk (nonlinear) does not apply"),
        (["--prune-method", "nonlinear", "--window-batch", "0"], "--window-batch must be an integer >= 1"),
        (["--nsamples", "0"], "nsamples must be an integer >= 1"),
    ],
)
def test_plan_bad_input(args, message, capsys):
    assert cli_main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


# A small random Llama whose activations outweigh the runtime's noise: 8 x 1024 tokens.
SMALL = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def measured_added_bytes(tmp_path, config, method, options=None, nsamples=8, seqlen=1024):
    cfg = {"config": config, "method": method, "options": options or {}, "nsamples": nsamples, "seqlen": seqlen}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "cfg.json")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["added_bytes"]


# Wider, shorter: the MLP and the 2048 x 2048 Hessian of down_proj make the peak, not attention.
WIDE = {**SMALL, "hidden_size": 512, "intermediate_size": 2048, "head_dim": 64}


# The q/k gradient refit of --refit stores every window's dense targets even when the descent
# chunks its windows (plan.py counts it since a 2048-token 135M run measured 10.3 GiB, planned 3.9).
CHUNKED_REFIT = {"steps": 2, "refit": True, "refit_steps": 2, "window_batch": 8, "window_chunk": 1}
# --recompute-targets: one window's targets a step, in the descent and in the q/k refit.
RECOMPUTED = {"steps": 2, "refit": True, "refit_steps": 2, "window_batch": 1, "recompute_targets": True}


@pytest.mark.parametrize(
    "method, options, config, seqlen",
    [
        ("wanda", {}, SMALL, 1024),  # peak: the forward attention
        pytest.param("sparsegpt", {}, WIDE, 256, marks=pytest.mark.slow),  # peak: down_proj's Hessian
        pytest.param("nonlinear", {"steps": 5}, SMALL, 1024, marks=pytest.mark.slow),  # peak: the n x n targets
        pytest.param("nonlinear", CHUNKED_REFIT, SMALL, 1024, marks=pytest.mark.slow),  # peak: the q/k refit
        pytest.param("nonlinear", RECOMPUTED, SMALL, 1024, marks=pytest.mark.slow),  # peak: one step's windows
    ],
)
def test_plan_matches_a_measured_peak(method, options, config, seqlen, tmp_path):
    """The plan's peak minus the dense model (already resident when the run starts) against
    the measured growth of the peak resident set during a real prune (tests/_plan_worker.py:
    CPU device buffers are host memory; compilation happens in a warm-up run first).

    The plan may not fall short of the measured peak by more than 30% (a plan that says a run fits
    when it does not is the failure that costs). Above it, 30% is allowed, except for the
    non-linear solve's stored targets: how many n x n buffers XLA's backward pass keeps alive
    depends on the CPU it compiles for (SOLVE_COPIES = 8 measured here on AMD EPYC; a CI machine
    measured 1327 MiB against the 2326 planned, 4 copies), so there the plan may be up to twice
    the measurement."""
    from nlprune.modeling.llama import LlamaConfig

    plan = plan_memory(LlamaConfig.from_hf_dict(config), method=method, nsamples=8, seqlen=seqlen, options=options)
    planned = plan.peak_bytes - plan.dense_weight_bytes
    measured = measured_added_bytes(tmp_path, config, method, options, seqlen=seqlen)
    print(f"{method}: planned {planned / 2**20:.1f} MiB (peak at {plan.peak_stage}), measured {measured / 2**20:.1f} MiB")
    stored_targets = method == "nonlinear" and not options.get("recompute_targets")
    over = 2.0 if stored_targets else 1.3
    assert measured <= 1.3 * planned, (planned, measured, plan.table())
    assert planned <= over * measured, (planned, measured, plan.table())


def test_gpu_paper_protocol_dry_run(tmp_path):
    """benchmarks/gpu_paper/gpu_paper_protocol.py --dry-run: every command of the paper protocol on the
    1B config parses (with --random-weights too), and each method's plan, stage by stage, is
    printed and written; no weights, data or GPU needed."""
    proc = subprocess.run(
        [sys.executable, str(GPU_PROTOCOL), "--dry-run", "--random-weights", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    commands = [line for line in out.splitlines() if line.startswith("$ nlprune prune")]
    assert len(commands) == 10  # 5 methods x (50% unstructured, 2:4)
    assert all("--model llama-3.2-1b" in c and "--random-weights 0" in c and "--seqlen 2048" in c for c in commands)
    assert sum("--recipe best" in c for c in commands) == 2 and sum("--recipe paper" in c for c in commands) == 2
    assert out.count("peak per device:") == 5 and out.count("| **total** |") == 5
    assert "| per device | at the peak | q/k/v | attention forward |" in out
    plans = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")}
    assert set(plans) == {"magnitude-unstructured", "wanda-unstructured", "sparsegpt-unstructured",
                          "nonlinear-paper-unstructured", "nonlinear-best-unstructured"}
    best, paper = plans["nonlinear-best-unstructured"], plans["nonlinear-paper-unstructured"]
    assert best["method_options"]["linear_method"] == "sparsegpt" and best["method_options"]["refit"]
    assert paper["method_options"]["window_batch"] is None  # the paper's full-batch steps
    assert paper["stages"]["q/k/v"]["attention n x n"] > best["stages"]["q/k/v"]["attention n x n"]
    # the printed verdicts are the plans' own peaks, and the 1B's dense weights are in each
    for name, plan in plans.items():
        assert plan["dense_weight_bytes"] == pytest.approx(1.236e9 * F32, rel=0.01)
        assert plan["settings"]["nsamples"] == 8 and plan["settings"]["seqlen"] == 2048
    assert f"{paper['peak_bytes'] / 2**30:6.2f} GiB per device" in out
    assert "nothing was run" in out


def test_gpu_paper_protocol_refuses_an_unknown_method(tmp_path):
    proc = subprocess.run([sys.executable, str(GPU_PROTOCOL), "--dry-run", "--methods", "obs", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "unknown --methods ['obs']" in proc.stderr


# ------------------------------------------------------------------ streamed runs, --memory


def test_a_streamed_plan_holds_one_layer_not_the_model():
    config = cards.card_config(cards.get_card("llama-3.1-8b"))
    whole = plan_memory(config, "8b", method="wanda", nsamples=8, seqlen=512)
    streamed = plan_memory(config, "8b", method="wanda", nsamples=8, seqlen=512, stream=True)
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = F32 * (2 * h * q + 2 * h * kv + 3 * h * i + 2 * h)  # one dense layer, float32
    assert streamed.dense_weight_bytes == layer
    assert whole.dense_weight_bytes > 30 * layer  # 32 layers and the embeddings
    # hidden states and one group's work are the same in both: the weights are the difference
    assert streamed.peak_bytes < whole.peak_bytes / 10


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.1-70b"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_memory_budget_picks_settings_that_fit_one_80gb_gpu(model, method, capsys):
    assert cli_main(["plan", "--model", model, "--prune-method", method, "--nsamples", "128", "--seqlen", "2048",
                     "--memory", "80GiB"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("peak per device: ") and "--stream" in first, first
    assert float(first.split()[3]) <= 80 and first.split()[4] == "GiB"


def test_memory_budget_no_setting_can_meet_is_one_line(capsys):
    rc = cli_main(["plan", "--model", "llama-3.1-70b", "--prune-method", "wanda", "--nsamples", "128", "--seqlen",
                   "2048", "--memory", "4GiB"])
    err = capsys.readouterr().err
    assert rc == 2 and "no setting brings llama-3.1-70b under --memory 4GiB" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("text, value", [("80GiB", 80 * 2**30), ("24G", 24 * 2**30), ("512MiB", 2**29), ("1000", 1000)])
def test_memory_sizes(text, value):
    from nlprune.plan import parse_bytes

    assert parse_bytes(text) == value


def test_a_memory_size_that_is_not_one_is_refused(capsys):
    rc = cli_main(["plan", "--model", "llama-3.1-8b", "--memory", "lots"])
    err = capsys.readouterr().err
    assert rc == 2 and "--memory 'lots': write a size such as 80GiB" in err
