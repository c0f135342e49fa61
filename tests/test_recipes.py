"""`nlprune prune --config` (recipe files and a run's own results.json), the configuration
and code version a run records, the shipped recipes/, and `prune --tasks`."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nlprune import api, cards
from nlprune.packed_masks import load_packed_masks
from nlprune.cli import build_parser, main as cli_main, method_options
from nlprune.methods import get_method
from nlprune.runconfig import protocol_argument

REPO = Path(__file__).resolve().parents[1]


def masks(run: Path) -> dict[str, np.ndarray]:
    return load_packed_masks(run / "masks.safetensors")


def assert_same_masks(a: Path, b: Path) -> None:
    ma, mb = masks(a), masks(b)
    assert set(ma) == set(mb) and len(ma) == 6 * 7
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)


def record(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def prune_dests() -> set[str]:
    parser = build_parser()
    prune = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices["prune"]
    return {a.dest for a in prune._actions if a.option_strings and a.dest not in ("help", "config", "protocol")}


def test_recipe_file_and_the_same_flags_give_identical_masks(tiny_model_dir, shared_data_dir, tmp_path):
    flags = ["--model", str(tiny_model_dir), "--prune-method", "sparsegpt", "--sparsity-ratio", "0.6",
             "--nsamples", "2", "--seqlen", "32", "--seed", "3", "--no-true-sequential", "--blocksize", "32",
             "--data-dir", str(shared_data_dir)]
    assert cli_main(["prune", *flags, "--output", str(tmp_path / "flags")]) == 0
    recipe = tmp_path / "run.toml"
    recipe.write_text(
        f'model = "{tiny_model_dir}"\nprune-method = "sparsegpt"\nsparsity_ratio = 0.6\nnsamples = 2\nseqlen = 32\n'
        f'seed = 3\ntrue-sequential = false\nblocksize = 32\ndata-dir = "{shared_data_dir}"\n'
        f'output = "{tmp_path / "recipe"}"\n'
    )
    assert cli_main(["prune", "--config", str(recipe)]) == 0
    assert_same_masks(tmp_path / "flags", tmp_path / "recipe")
    a, b = record(tmp_path / "flags")["config"], record(tmp_path / "recipe")["config"]
    assert {k: v for k, v in a.items() if k != "output"} == {k: v for k, v in b.items() if k != "output"}
    assert a["blocksize"] == 32 and a["true_sequential"] is False and a["seed"] == 3


@pytest.mark.slow
def test_config_of_a_results_json_reruns_the_run(tiny_model_dir, shared_data_dir, tmp_path):
    first = tmp_path / "first"
    assert cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", "wanda", "--sparsity-ratio", "0.7",
                     "--sparsity-profile", "owl", "--owl-lambda", "0.1", "--nsamples", "4", "--seqlen", "64",
                     "--data-dir", str(shared_data_dir), "--output", str(first)]) == 0
    rec = record(first)
    assert set(rec["config"]) == prune_dests()  # every flag's value
    assert rec["config"]["sparsity_profile"] == "owl" and rec["config"]["owl_lambda"] == 0.1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert rec["code"]["commit"] == head and isinstance(rec["code"]["dirty"], bool)

    again = tmp_path / "again"
    assert cli_main(["prune", "--config", str(first / "results.json"), "--output", str(again)]) == 0
    assert_same_masks(first, again)
    assert record(again)["config"] == {**rec["config"], "output": str(again)}

    # a flag on the command line wins over the file
    other = tmp_path / "other"
    assert cli_main(["prune", "--config", str(first / "results.json"), "--output", str(other), "--seed", "1"]) == 0
    assert record(other)["config"]["seed"] == 1 and record(other)["calibration"]["seed"] == 1
    assert any(not np.array_equal(masks(first)[k], masks(other)[k]) for k in masks(first))


@pytest.mark.slow
def test_an_api_run_records_flag_names_and_reruns_from_its_config(tiny_model_dir, shared_data_dir, tmp_path):
    per_layer = [0.5, 0.25, 0.75, 0.5, 0.5, 0.5]
    first = tmp_path / "api"
    api.prune(str(tiny_model_dir), "magnitude", None, nsamples=2, seqlen=32, data_dir=shared_data_dir,
              output=first, progress=False, layer_sparsity=per_layer)
    config = record(first)["config"]
    assert set(config) <= prune_dests() and config["layer_sparsity"] == per_layer and config["eval"] is False
    again = tmp_path / "cli"
    assert cli_main(["prune", "--config", str(first / "results.json"), "--output", str(again)]) == 0
    assert_same_masks(first, again)
    np.testing.assert_allclose(record(again)["sparsity"]["per_layer"], per_layer, atol=1e-12)


def parsed(path: Path, *argv: str):
    return build_parser(str(path)).parse_args(["prune", "--config", str(path), *argv])


def test_toml_json_and_yaml_recipes_and_both_spellings_read_the_same(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('prune-method = "wanda"\nsparsity_ratio = 0.4\ntasks = ["rte", "piqa"]\neval = true\n'
                    'true-sequential = false\noutput = "runs/a"\nnsamples = 16\n')
    (tmp_path / "a.json").write_text(json.dumps({"prune_method": "wanda", "sparsity-ratio": 0.4, "tasks": "rte,piqa",
                                                 "eval": True, "true_sequential": False, "output": "runs/a",
                                                 "nsamples": 16, "seed": None}))
    (tmp_path / "a.yaml").write_text("prune_method: wanda\nsparsity_ratio: 0.4\ntasks: [rte, piqa]\neval: true\n"
                                     "true_sequential: false\noutput: runs/a\nnsamples: 16\n")
    spaces = [vars(parsed(tmp_path / f"a.{kind}")) for kind in ("toml", "json", "yaml")]
    for space in spaces:
        space.pop("config")
    assert spaces[0] == spaces[1] == spaces[2]
    args = parsed(toml)
    assert (args.prune_method, args.sparsity_ratio, args.tasks, args.eval, args.true_sequential, args.nsamples,
            args.seed, args.seqlen) == ("wanda", 0.4, "rte,piqa", True, False, 16, 0, 512)
    # the command line wins, including a switch the file turned on
    args = parsed(toml, "--sparsity-ratio", "0.3", "--true-sequential", "--prune-method", "sparsegpt")
    assert (args.sparsity_ratio, args.true_sequential, args.prune_method) == (0.3, True, "sparsegpt")


@pytest.mark.parametrize(
    "text, name, message",
    [
        ('prune_method = "wanda"\nsparsity = 0.5\n', "a.toml", "unknown key 'sparsity'; the keys are the flags of `nlprune prune`: "),
        ('prune_method = "wanda"\nsparsity_ratio = "half"\n', "a.toml", "sparsity_ratio: 'half' is not float"),
        ('prune_method = "wanda"\neval = "yes"\n', "a.toml", "eval is a switch: give true or false"),
        ('prune_method = "obs"\n', "a.toml", "prune_method is 'obs'; choose one of alps, magnitude, nonlinear, ria, sparsegpt, wanda"),
        ('prune_method = "wanda"\nnsamples = 2.5\n', "a.toml", "nsamples takes int"),
        ('prune_method = "wanda"\nsparsity_ratio = 0.5\nsparsity-ratio = 0.6\n', "a.toml", "gives sparsity_ratio twice"),
        ('prune_method = \n', "a.toml", "cannot be parsed"),
        ('["wanda"]', "a.json", "must hold a table of flag = value"),
        ('prune_method = "wanda"\n', "a.ini", "unknown kind of file"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, capsys, monkeypatch, text, name, message):
    monkeypatch.setattr(cards, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))
    path = tmp_path / name
    path.write_text(text)
    assert cli_main(["prune", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlprune prune: error: --config") and message in err and len(err.strip().splitlines()) == 1, err
    if "unknown key" in message:
        assert "sparsity_ratio" in err and "prune_method" in err and "owl_lambda" in err
    assert not (tmp_path / "run").exists()
    assert cli_main(["prune", "--config", str(tmp_path / "absent.toml"), "--output", str(tmp_path / "run")]) == 2
    assert "absent.toml does not exist" in capsys.readouterr().err


def test_protocols_set_calibration_and_evaluation_over_the_recipe_under_the_command_line(tmp_path):
    """--protocol NAME|FILE: the shipped cpu and field protocols, applied over a --config
    recipe's calibration (the protocol decides what a run is measured on) and under the
    command line's flags."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('prune-method = "wanda"\nsparsity-ratio = 0.6\nnsamples = 2\nseqlen = 64\noutput = "x"\n')
    field = build_parser(str(recipe), "field").parse_args(["prune", "--config", str(recipe), "--protocol", "field"])
    assert (field.nsamples, field.seqlen, field.eval, field.eval_seqlen, field.prune_method, field.sparsity_ratio) == (
        128, 2048, True, 2048, "wanda", 0.6)
    assert field.eval_datasets[0] == "c4:128"
    cpu = build_parser(None, "cpu").parse_args(["prune", "--protocol", "cpu", "--prune-method", "ria", "--seed", "2",
                                                "--output", "x"])
    assert (cpu.nsamples, cpu.seqlen, cpu.seed, cpu.eval_seqlen) == (8, 512, 2, 512)
    assert {s.split(":")[0] for s in cpu.eval_datasets} >= {"c4", "c4-validation", "wikipedia-validation"}
    own = tmp_path / "p.toml"
    own.write_text("nsamples = 4\nseqlen = 128\n")
    mine = build_parser(None, str(own)).parse_args(["prune", "--protocol", str(own), "--output", "x",
                                                    "--prune-method", "wanda"])
    assert (mine.nsamples, mine.seqlen, mine.eval) == (4, 128, False)


@pytest.mark.parametrize("text, name, message", [
    ("nsamples = 4\nsparsity-ratio = 0.5\n", "p.toml", "'sparsity-ratio' is not a calibration or evaluation setting"),
    ("nsamples = 4\nsamples = 4\n", "p.toml", "unknown key 'samples'"),
    (None, "paper", "--protocol 'paper': no such protocol; the shipped ones are cpu, field"),
])
def test_bad_protocols_are_one_line_errors(tmp_path, capsys, monkeypatch, text, name, message):
    monkeypatch.setattr(cards, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))
    where = name
    if text is not None:
        where = str(tmp_path / name)
        Path(where).write_text(text)
    assert cli_main(["prune", "--protocol", where, "--prune-method", "wanda", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlprune prune: error: --protocol") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_shipped_recipes_resolve_to_the_main_table_rows():
    recipes = sorted((REPO / "recipes").glob("*.toml"))
    names = {p.stem for p in recipes}
    recommended = {"recommended-50", "recommended-70", "recommended-2of4"}  # README's "What to use", tested below
    assert names == {f"{m}-{p}" for m in ("magnitude", "wanda", "sparsegpt", "nonlinear-paper", "nonlinear-best")
                     for p in ("50", "2of4")} | {"wanda-refit-50"} | recommended
    for path in recipes:
        if path.stem in recommended:
            continue
        args = parsed(path, "--data-dir", "../shared/data")
        method = get_method(args.prune_method, **method_options(args))  # the options validate
        assert args.model == "smollm2-135m" and args.sparsity_ratio == 0.5
        assert args.sparsity_type == ("2:4" if path.stem.endswith("2of4") else "unstructured")
        assert (args.nsamples, args.seqlen, args.seed, args.eval, args.eval_nsamples, args.eval_seqlen) == (8, 512, 0, True, 128, 512)
        assert path.stem.startswith(method.name) and args.output == f"runs/{path.stem}"
        if method.name == "nonlinear":
            assert args.recipe == path.stem.split("-")[1]
        if path.stem == "wanda-refit-50":
            assert method.options.refit and method.options.refit_percdamp == 1.0


def validation_race(pattern: str) -> list[dict]:
    """The rows a recommendation is chosen from: the ablation's full rows of the pattern (seed 0)
    and the damping sweep's points (validation only, benchmarks/ablation/damping/table.json).
    Validation means compare only within one Wikipedia split (by article since 2026-12-07; every
    sweep point is): the newer split decides once it holds the older split's winner measured
    again, else the older split's race stands (a few new challengers do not decide alone)."""
    table = json.loads((REPO / "benchmarks" / "ablation" / "table.json").read_text())
    rows = [{**r, "split": r.get("split", "passage")} for r in table["rows"]
            if r["name"].endswith("-" + pattern) and "@seed" not in r["name"]]
    sweep = json.loads((REPO / "benchmarks" / "ablation" / "damping" / "table.json").read_text())
    for curve in sweep["rows"]:
        if curve["pattern"] == pattern:
            for damping, mean in curve["validation_mean"].items():
                rows.append({"name": curve["names"][damping], "split": "article", "validation_mean": mean,
                             "command": curve["commands"][damping]})
    passage = [r for r in rows if r["split"] == "passage"]
    article = [r for r in rows if r["split"] == "article"]
    if passage and min(passage, key=lambda r: r["validation_mean"])["name"] not in {r["name"] for r in article}:
        return passage
    return article


@pytest.mark.parametrize("pattern", ["50", "70", "2:4"])
def test_recommended_recipe_is_the_best_validation_row_of_the_committed_ablation(pattern):
    """recipes/recommended-P.toml runs the row with the lowest validation mean of the committed
    records (validation_race: chosen on validation, never on test), with that row's flags and
    the cpu protocol; README's "What to use" names it."""
    race = validation_race(pattern)
    best = min(race, key=lambda r: r["validation_mean"])
    stem = f"recommended-{pattern.replace(':', 'of')}"
    ours = vars(parsed(REPO / "recipes" / f"{stem}.toml", "--data-dir", "../shared/data"))
    flags = best["command"].removeprefix("nlprune prune ").split()
    argv = ["prune", *flags, "--data-dir", "../shared/data", "--output", "x"]
    theirs = vars(build_parser(None, protocol_argument(argv)).parse_args(argv))  # a row may name --protocol
    keys = ("prune_method", "sparsity_ratio", "sparsity_type", "nsamples", "seqlen", "seed", "refit",
            "refit_percdamp", "recipe", "straight_through", "linear_method")
    assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys}, best["name"]
    assert ours["eval"] and ours["output"] == f"runs/{stem}"
    what_to_use = (REPO / "README.md").read_text().split("**What to use, measured**")[1].split("```")[1]
    assert f"--config recipes/{stem}.toml" in what_to_use


@pytest.mark.slow
def test_prune_with_tasks_records_the_zero_shot_scores(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--nsamples", "2", "--seqlen", "32", "--data-dir", str(shared_data_dir), "--output", str(out),
                     "--tasks", "rte,piqa", "--limit", "4", "--dense-tasks"]) == 0
    printed = capsys.readouterr().out
    zs, dense = record(out)["zero_shot"], record(out)["dense_zero_shot"]
    assert list(zs["tasks"]) == ["rte", "piqa"] and zs["subset"] and zs["limit"] == 4
    for entry in zs["tasks"].values():
        assert entry["examples"] == 4 and entry["subset"] and "acc_stderr" in entry and entry["seconds"] > 0
    assert "acc_norm" in zs["tasks"]["piqa"]
    assert zs["mean_acc"] == pytest.approx(np.mean([e["acc"] for e in zs["tasks"].values()]))
    assert f"pruned {zs['mean_acc']:.4f}" in printed and f"dense {dense['mean_acc']:.4f}" in printed
    # the scores are the run's pruned weights': the same as scoring the run directory afterwards
    again = api.evaluate_tasks(run_dir=out, tasks="rte,piqa", task_data_dir=shared_data_dir / "tasks", limit=4,
                               progress=False)
    assert {k: e["acc"] for k, e in again["tasks"].items()} == {k: e["acc"] for k, e in zs["tasks"].items()}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "rte,squad"], "squad"),
        (["--limit", "5"], "apply only with --tasks"),
        (["--dense-tasks"], "apply only with --tasks"),
        (["--tasks", "rte", "--limit", "0"], "--limit must be a whole number of examples >= 1"),
        (["--tasks", "rte", "--task-data-dir", "/nonexistent/tasks"], "does not exist"),
    ],
)
def test_bad_task_requests_fail_before_loading(extra, message, tiny_model_dir, shared_data_dir, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.setattr(cards, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))
    out = tmp_path / "run"
    assert cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--data-dir", str(shared_data_dir), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
