"""A prune run is one typed request: every field with a flag is a `nlprune prune` flag made
from the field, and the parsed flags give back the request's own defaults."""

from __future__ import annotations

import dataclasses

import pytest

from nlprune.cli import build_parser, prune_request
from nlprune.request import FLAG_OF_FIELD, NOT_FLAGS, PruneRequest

CLI_ONLY_DEFAULTS = {"prune_method", "sparsity_ratio"}  # required, or None until the pattern is known


def flagged():
    return [f for f in dataclasses.fields(PruneRequest) if f.metadata.get("flag")]


def test_every_field_but_the_programmatic_ones_has_a_flag():
    assert {f.name for f in flagged()} == set(FLAG_OF_FIELD)
    assert not {f.name for f in flagged()} & set(NOT_FLAGS)


def test_each_flag_is_made_from_its_field():
    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    actions = {a.dest: a for a in prune._actions}
    for f in flagged():
        dest = FLAG_OF_FIELD[f.name]
        action = actions[dest]
        spelled = "--" + dest.replace("_", "-")
        assert spelled in action.option_strings, (f.name, action.option_strings)
        assert action.help == f.metadata["flag"]["help"]
        if "_" in dest:
            assert "--" + dest in action.option_strings  # Wanda's underscore spelling works too


def test_parsed_defaults_are_the_requests_defaults(tmp_path):
    args = build_parser().parse_args(["prune", "--prune-method", "wanda", "--output", str(tmp_path / "run")])
    request = prune_request(args)
    for f in flagged():
        if f.name in CLI_ONLY_DEFAULTS or f.name == "output":
            continue
        assert getattr(request, f.name) == f.default, f.name
    assert request.output == str(tmp_path / "run") and request.prune_method == "wanda"


@pytest.mark.parametrize("argv, field, value", [
    (["--eval-datasets", "c4, wikipedia:8"], "eval_datasets", ("c4", "wikipedia:8")),
    (["--no-true-sequential"], "true_sequential", False),
    (["--dtype", "bfloat16", "--stream"], "dtype", "bfloat16"),
    (["--owl_lambda", "0.1"], "owl_lambda", 0.1),
    (["--eval"], "do_eval", True),
])
def test_a_flag_sets_its_field(argv, field, value, tmp_path):
    args = build_parser().parse_args(["prune", "--prune-method", "wanda", "--output", str(tmp_path), *argv])
    assert getattr(prune_request(args), field) == value
