"""Flags shared by several commands (the model, the method and its options, the pattern,
the calibration size, the mesh, the data folder), and writing a command's JSON output."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlprune import cards
from nlprune.cli_methods import add_method_args
from nlprune.cli_prune import add_flag


def write_json(path: str | Path, record: dict) -> None:
    from nlprune.runs import write_json as write

    write(Path(path), record)


def add_random_weights_arg(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--random-weights", type=int, default=None, metavar="SEED",
             help="seeded random weights of --model's exact config (card, folder with config.json, or .gguf) "
             "with its tokenizer, instead of its own weights: nothing is downloaded; the record says so")


def add_data_args(p: argparse.ArgumentParser) -> None:
    add_flag(
        p,
        "--data-dir",
        default=None,
        help="local folder with C4 shards / wiki.test.raw instead of the hub "
        "(default: $NLPRUNE_DATA_DIR, else the hub)",
    )


def add_run_args(p: argparse.ArgumentParser, *, required_method: bool) -> None:
    """What prune and plan share: the model, the method and its options, the pattern, the
    calibration size, the forward batch and the mesh."""
    from nlprune.methods import DEFAULT_METHOD, available_methods

    p.add_argument("--model", default=cards.DEFAULT_MODEL, help="card name, HF folder or .gguf file")
    add_flag(p, "--prune-method", required=required_method, default=None if required_method else DEFAULT_METHOD,
             choices=available_methods(), help="pruning method" + ("" if required_method else f" ({DEFAULT_METHOD})"))
    add_flag(p, "--sparsity-ratio", type=float, default=None, help="fraction of weights removed, in [0, 1)")
    add_flag(p, "--sparsity-type", default="unstructured",
             help="unstructured, or N:M: keep N of every M consecutive weights of a row (2:4 and 4:8 are 50%% "
             "sparse, 1:4 is 75%%)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    add_flag(p, "--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_mesh_args(p)
    add_method_args(p)


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh", default=None, metavar="SPEC",
        help="device mesh, e.g. data=2,model=2: 'data' shards the calibration windows, 'model' the "
        "weights' rows and the non-linear method's KV groups; sizes multiply to the device count "
        "(default: every device on 'data'; one device = the one-device path)",
    )
