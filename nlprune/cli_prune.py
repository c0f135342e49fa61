"""Flags with their underscore spellings, and what ``nlprune prune``'s summary prints about a
layer-wise profile and zero-shot tasks (its flags are made from the request's fields:
:func:`nlprune.cli_args.add_request_flags`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_flag(parser: argparse.ArgumentParser | Any, flag: str, **kwargs) -> None:
    """Add ``--some-flag`` together with its ``--some_flag`` spelling."""
    names = [flag] + ([flag.replace("-", "_").replace("__", "--", 1)] if "-" in flag[2:] else [])
    parser.add_argument(*names, **kwargs)


def print_prune_extras(record: dict[str, Any]) -> None:
    """The summary lines of a layer-wise profile and of the zero-shot tasks."""
    planned = record["sparsity"]["planned"]
    if planned["profile"] != "uniform":
        per = record["sparsity"]["per_layer"]
        print(f"  {planned['profile']} profile: layers pruned {min(per):.4f} to {max(per):.4f} (planned overall "
              f"{planned['overall']:.4f})")
    if "zero_shot" in record:
        from nlprune.eval.tasks.runner import format_table

        zs = record["zero_shot"]
        scope = f"first {zs['limit']} examples of each" if zs["subset"] else "all examples"
        dense = record.get("dense_zero_shot")
        dense_text = f"dense {dense['mean_acc']:.4f} -> " if dense else ""
        stderr = f" ± {zs['mean_acc_stderr']:.4f}" if isinstance(zs["mean_acc_stderr"], float) else ""
        print(f"  zero-shot mean accuracy ({len(zs['tasks'])} tasks, {scope}): {dense_text}pruned "
              f"{zs['mean_acc']:.4f}{stderr}")
        print("    " + format_table(zs).replace("\n", "\n    "))
