"""The flags ``nlprune prune`` has beyond the method and the pattern: the calibration source,
layer-wise sparsity, zero-shot tasks and recipe files (:mod:`nlprune.runconfig`), and what its
summary prints about them."""

from __future__ import annotations

import argparse
from typing import Any


def add_flag(parser: argparse.ArgumentParser | Any, flag: str, **kwargs) -> None:
    """Add ``--some-flag`` together with its ``--some_flag`` spelling."""
    names = [flag] + ([flag.replace("-", "_").replace("__", "--", 1)] if "-" in flag[2:] else [])
    parser.add_argument(*names, **kwargs)


def add_prune_extras(p: argparse.ArgumentParser) -> None:
    """prune's calibration source, layer-wise sparsity, zero-shot tasks and recipe file."""
    from nlprune.eval.tasks import DEFAULT_TASKS
    from nlprune.sparsity import PROFILE_CHOICES

    add_flag(p, "--calib-dataset", default=None, metavar="{c4,wikitext2,PATH}",
             help="calibration text: c4 (default; its train split), wikitext2 (train), or a local .jsonl / .json.gz "
             "(JSON lines with a 'text' field) or .txt file (one document); the file's sha256 is recorded")
    add_flag(p, "--sparsity-profile", default="uniform", choices=PROFILE_CHOICES,
             help="uniform: every linear at --sparsity-ratio (default); owl: each layer its own unstructured ratio "
             "by OWL's outlier ratios (layers with more outliers pruned less), the model-wide sparsity the target")
    add_flag(p, "--owl-m", type=float, default=None,
             help="OWL: outliers are Wanda scores above M times the layer's mean (default 5)")
    add_flag(p, "--owl-lambda", type=float, default=None,
             help="OWL: the layers' ratios spread over an interval of width 2 x lambda around the target, in [0, 1) "
             "(default 0.08)")
    add_flag(p, "--layer-sparsity", default=None, metavar="FILE",
             help="a JSON file: a list of one unstructured ratio per layer, or {HF linear name: ratio} (the others "
             "at --sparsity-ratio); for any method")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="also score the pruned model on these zero-shot tasks, as `nlprune eval --tasks` does (the "
                   f"usual suite: {','.join(DEFAULT_TASKS)})")
    add_flag(p, "--task-data-dir", default=None, metavar="DIR",
             help="folder of the task files (default: DATA_DIR/tasks, else $NLPRUNE_DATA_DIR/tasks)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N examples of each task (the record says it is a subset)")
    add_flag(p, "--dense-tasks", action="store_true", help="score the dense model on --tasks too")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a recipe: TOML, JSON or YAML with one key per flag (sparsity_ratio = 0.5, ...), or a run's "
                   "results.json (its config); flags given on the command line win")


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
