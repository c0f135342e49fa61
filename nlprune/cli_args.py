"""Flags shared by several commands (the model, the method and its options, the pattern,
the calibration size, the mesh, the data folder), and writing a command's JSON output."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nlprune.cli_methods import add_method_args
from nlprune.cli_prune import add_flag


def write_json(path: str | Path, record: dict) -> None:
    from nlprune.runs import write_json as write

    write(Path(path), record)


RUN_FIELDS = ("model", "prune_method", "sparsity_ratio", "sparsity_type", "nsamples", "seqlen", "batch_size")


def add_request_flags(p: argparse.ArgumentParser, names=None, *, required=()) -> None:
    """The flags of :class:`~nlprune.request.PruneRequest`'s fields (``names``, default every
    field that has one), each made from its field: ``--field-name`` (and ``--field_name``),
    dest as :data:`~nlprune.request.FLAG_OF_FIELD` says, the field's help, argparse keywords
    and default. ``required``: fields the command must be given."""
    from nlprune.methods import available_methods
    from nlprune.request import FLAG_OF_FIELD, PruneRequest

    fields = {f.name: f for f in dataclasses.fields(PruneRequest) if f.metadata.get("flag")}
    for name in names or fields:
        spec = dict(fields[name].metadata["flag"])
        dest = FLAG_OF_FIELD[name]
        spec.setdefault("default", fields[name].default)
        if spec.get("choices") == "methods":  # the registry, as it is when the parser is built
            spec["choices"] = available_methods()
        if name in required:
            spec.update(required=True, default=None)
        add_flag(p, "--" + dest.replace("_", "-"), dest=dest, **spec)


def add_random_weights_arg(p: argparse.ArgumentParser) -> None:
    add_request_flags(p, ["random_weights"])


def add_data_args(p: argparse.ArgumentParser) -> None:
    add_request_flags(p, ["data_dir"])


def add_run_args(p: argparse.ArgumentParser, *, required_method: bool) -> None:
    """What prune and plan share: the model, the method and its options, the pattern, the
    calibration size, the forward batch and the mesh."""
    from nlprune.methods import DEFAULT_METHOD

    add_request_flags(p, RUN_FIELDS, required=("prune_method",) if required_method else ())
    if not required_method:
        p.set_defaults(prune_method=DEFAULT_METHOD)
    add_mesh_args(p)
    add_method_args(p)


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh", default=None, metavar="SPEC",
        help="device mesh, e.g. data=2,model=2: 'data' shards the calibration windows, 'model' the "
        "weights' rows and the non-linear method's KV groups; sizes multiply to the device count "
        "(default: every device on 'data'; one device = the one-device path)",
    )
