"""The ``nlprune`` command line: a thin layer over the Python API.

Options use the vocabulary of Wanda's and SparseGPT's scripts (prune method, sparsity ratio,
sparsity type, nsamples, seqlen, seed); underscore spellings (``--sparsity_ratio``) work too.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import traceback
import warnings

from nlprune import cards
from nlprune.atomic import Terminated, install_unraisable_hook, raise_terminated
from nlprune.cli_args import RUN_FIELDS, add_data_args, add_random_weights_arg, add_request_flags, add_run_args, write_json
from nlprune.cli_methods import method_options
from nlprune.cli_plan import add_plan_parser
from nlprune.cli_prune import add_flag
from nlprune.cli_prune import print_prune_extras
from nlprune.processes import ProcessFailed
from nlprune.request import FLAG_OF_FIELD, PruneRequest
from nlprune.runconfig import apply_config, apply_protocol, config_argument, protocol_argument

# Errors that are the user's input, reported as one line without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, FileNotFoundError, ImportError, FileExistsError, NotADirectoryError,
    IsADirectoryError,
)


# --------------------------------------------------------------------------- models


def cmd_models(args: argparse.Namespace) -> int:
    known = cards.available_cards()
    for name, card in known.items():
        a = card["architecture"]
        default = " (default)" if name == cards.DEFAULT_MODEL else ""
        print(f"{name}{default}")
        print(f"  {card['description']}")
        print(
            f"  layers {a['num_hidden_layers']}, hidden {a['hidden_size']}, heads "
            f"{a['num_attention_heads']}/{a['num_key_value_heads']} (q/kv), vocab {a['vocab_size']}, "
            f"{a.get('parameters', '?')} parameters"
        )
        w, t = card["weights"], card["tokenizer"]
        print(f"  weights: {w.get('package') or w.get('hub_id')} [{w['source']}]")
        print(f"  tokenizer: {t.get('package') or t['source']}")
    return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from nlprune.api import evaluate, evaluate_tasks
    from nlprune.runs import check_output_file

    if args.tasks is None and (args.limit is not None or args.task_data_dir is not None):
        raise ValueError("--limit and --task-data-dir apply only with --tasks.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.output is not None:  # before the evaluation, not after it
        check_output_file(args.output, args.overwrite)
    # Perplexity runs unless only tasks were asked for; --dataset with --tasks runs both.
    dataset = args.dataset or (None if args.tasks else "c4")
    task_dir = names = None
    if args.tasks is not None:
        from nlprune.eval.tasks import resolve_task_data_dir
        from nlprune.eval.tasks.runner import check_task_request

        task_dir = resolve_task_data_dir(args.task_data_dir, args.data_dir)
        names = check_task_request(args.tasks, task_dir, args.limit)  # before any long pass
    record: dict = {}
    if dataset is not None:
        record = evaluate(
            model=args.model,
            run_dir=args.run,
            dataset=dataset,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            data_dir=args.data_dir,
            batch_size=args.batch_size or 8,
            use_cache=not args.no_cache,
            random_weights=args.random_weights,
        )
        print(
            f"{record['model']['name']} on {dataset} ({record['windows']} x {args.seqlen}): "
            f"perplexity {record['perplexity']:.4f} ({record['tokens']} tokens, {record['seconds']:.1f} s)"
        )
    if names is not None:
        from nlprune.eval.tasks.runner import format_table

        tasks = evaluate_tasks(
            model=args.model, tasks=names, run_dir=args.run, task_data_dir=task_dir, limit=args.limit,
            batch_size=args.batch_size or 32, random_weights=args.random_weights,
        )
        scope = f"first {args.limit} examples of each task" if tasks["subset"] else "all examples"
        print(f"{tasks['model']['name']}{f' (run {args.run})' if args.run else ''}: zero-shot, {scope}, "
              f"{tasks['seconds']:.1f} s")
        print(format_table(tasks))
        record = {**record, "zero_shot": tasks} if record else tasks
    if args.output:
        write_json(args.output, record)
        print(f"wrote {args.output}")
    return 0


def cmd_compare_tasks(args: argparse.Namespace) -> int:
    from nlprune.eval.tasks.paired import compare, format_comparison
    from nlprune.runs import check_output_file

    if args.output is not None:
        check_output_file(args.output, args.overwrite)
    result = compare(args.a, args.b)
    for side, path in (("a", args.a), ("b", args.b)):
        info = result[side]
        print(f"{side}: {path} ({info['model']}{', run ' + info['run'] if info['run'] else ''})")
    print(format_comparison(result))
    if args.output:
        write_json(args.output, {**result, "a_path": str(args.a), "b_path": str(args.b)})
        print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- prune


def prune_request(args: argparse.Namespace) -> PruneRequest:
    """The run ``nlprune prune``'s parsed flags ask for; the flags themselves are recorded as
    its config. The mesh goes as its spec (the runner parses it, once); no --mesh is "", every
    device on 'data', as the flag's help says."""
    return PruneRequest(
        **{name: getattr(args, flag) for name, flag in FLAG_OF_FIELD.items()},
        options=method_options(args),
        mesh=args.mesh if args.mesh is not None else "",
        use_cache=not args.no_cache,
        # a recipe's and a protocol's values are recorded as the flags they set
        run_config={k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "protocol")},
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from nlprune import parallel, processes

    parallel.initialize_distributed(args.distributed)  # before anything touches a device
    from nlprune import runner

    with processes.one_run("nlprune prune"):  # several processes: a failure in one ends all
        _, record = runner.run(prune_request(args))
    if not processes.is_writer():
        return 0  # process 0 reports the run
    a = record["args"]
    print(
        f"{a['model']}: {a['prune_method']} {a['sparsity_type']} at {a['sparsity_ratio']:g} -> "
        f"sparsity {record['sparsity']['overall']:.4f} in {record['prune_seconds']:.1f} s"
        + (f" on mesh {record['mesh']['spec']}" if record["mesh"]["devices"] > 1 else "")
    )
    for note in record["mesh"]["notes"]:
        print(f"  mesh: {note}")
    if "attention_error" in record:
        print(f"  attention error (mean over layers, C4 validation): {record['attention_error']['mean']:.3e}")
    for name, p in record.get("perplexities", {}).items():
        print(
            f"  {name} perplexity ({p['nsamples']} x {p['seqlen']}): "
            f"dense {p['dense']:.3f} {_cache_note(p['dense_cache'])} -> pruned {p['pruned']:.3f}"
        )
    print_prune_extras(record)
    print(f"  wrote {args.output}/results.json")
    return 0


def _cache_note(cache: dict) -> str:
    if not cache.get("cached"):
        return "(computed now)"
    return f"(cached, computed {str(cache.get('computed')).replace('T', ' ')[:16]})"


def add_prune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="prune a model layer by layer and write a run directory",
        description="Prune every decoder layer in order, calibrating each on the outputs of "
        "the already-pruned layers before it. Rerunning the same command on the same --output "
        "resumes an interrupted run.",
    )
    add_run_args(p, required_method=True)
    # every other field of the request is a flag made from the field (nlprune/request.py)
    add_request_flags(p, [f for f in FLAG_OF_FIELD if f not in RUN_FIELDS], required=("output",))
    p.add_argument(
        "--distributed", action="store_true",
        help="call jax.distributed.initialize first (one process per host, same command on each; process 0 "
        "alone writes --output; a process silent for $NLPRUNE_PEER_TIMEOUT s, default 30, ends the run); "
        "implied when JAX_COORDINATOR_ADDRESS is set",
    )
    add_flag(p, "--no-cache", action="store_true",
             help="recompute the dense perplexity and the evaluation tokens instead of reading their caches")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a recipe: TOML, JSON or YAML with one key per flag (sparsity_ratio = 0.5, ...), or a run's "
                   "results.json (its config); flags given on the command line win")
    p.add_argument("--protocol", default=None, metavar="NAME|FILE",
                   help="calibration and evaluation settings by name (cpu: 8 x 512 calibration, 512-token test and "
                   "validation windows; field: 128 x 2048 and 2048-token windows; nlprune/protocols/) or a TOML "
                   "file of those flags; over a --config recipe's, under the command line's")
    p.set_defaults(func=cmd_prune)
    return p


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage is in --help), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """``nlprune eval``: perplexity and zero-shot tasks of a model or a pruned run."""
    p = sub.add_parser(
        "eval", help="perplexity and zero-shot task accuracy of a model or a pruned run",
        description="Perplexity on C4 or WikiText-2, and/or zero-shot accuracy on local task files "
        "through lm-evaluation-harness (--tasks). With --tasks alone only the tasks run; add --dataset "
        "to measure perplexity too.",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"card name, Hugging Face folder or .gguf file (default: the run's model with "
        f"--run, else {cards.DEFAULT_MODEL})",
    )
    p.add_argument("--run", default=None, help="evaluate the pruned model of this run directory")
    add_random_weights_arg(p)
    from nlprune.data.heldout import EVALUATION_SETS

    p.add_argument("--dataset", choices=EVALUATION_SETS, default=None,
                   help="perplexity text (default c4, the test set; c4-validation, wikipedia, lambada: the "
                   "validation split and text unlike the calibration set; with --tasks, perplexity runs only "
                   "when given)")
    p.add_argument("--nsamples", type=int, default=128, help="evaluation windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    add_flag(p, "--batch-size", type=int, default=None,
             help="windows per forward pass for perplexity (default 8); most sequences per forward for tasks (default 32)")
    add_data_args(p)
    from nlprune.eval.tasks import DEFAULT_TASKS, LOCAL_TASKS

    p.add_argument("--tasks", default=None, metavar="LIST",
                   help=f"comma-separated zero-shot tasks scored through lm-evaluation-harness: {', '.join(LOCAL_TASKS)} "
                   f"(the usual suite: {','.join(DEFAULT_TASKS)})")
    add_flag(p, "--task-data-dir", default=None, metavar="DIR",
             help="folder of the task files, laid out as DIR/boolq/val.jsonl.gz, ... (default: DATA_DIR/tasks, "
             "else $NLPRUNE_DATA_DIR/tasks; never the hub)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N examples of each task (the record says it is a subset)")
    p.add_argument("--output", default=None, help="write the JSON record here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_flag(p, "--no-cache", action="store_true", help="tokenize the evaluation text again instead of reading the cache")
    p.set_defaults(func=cmd_eval)
    return p


def build_parser(prune_config: str | None = None, protocol: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``prune_config`` and ``protocol`` (a recipe file, a protocol name or file):
    values that become prune's defaults."""
    parser = _Parser(
        prog="nlprune",
        description="Prune LLM weights in JAX and measure what it cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the supported models (cards in models/)")
    p.set_defaults(func=cmd_models)

    add_eval_parser(sub)

    p = sub.add_parser(
        "compare-tasks", help="paired test of two zero-shot evaluations on the same examples",
        description="Per task: examples only A or only B answers correctly, the accuracy difference A - B "
        "with its paired standard error, and McNemar's exact p-value; the mean difference over tasks. "
        "A and B are `nlprune eval --tasks ... --output` files or run folders pruned with --tasks.",
    )
    p.add_argument("a", metavar="A", help="first record (eval --output file, or run folder / results.json)")
    p.add_argument("b", metavar="B", help="second record, scored on the same examples (same --limit)")
    p.add_argument("--output", default=None, help="write the comparison as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=cmd_compare_tasks)

    prune_parser = add_prune_parser(sub)
    if prune_config is not None:
        apply_config(prune_parser, prune_config)
    if protocol is not None:  # after the recipe: the protocol decides what the run is measured on
        apply_protocol(prune_parser, protocol)
    add_plan_parser(sub)

    from nlprune.experiments.synthetic_report import add_parser as add_synthetic_parser

    add_synthetic_parser(sub)

    p = sub.add_parser("export-hf", help="write a run's pruned model as a Hugging Face folder")
    p.add_argument("--run", required=True, help="run directory written by `nlprune prune`")
    p.add_argument("--output", required=True, help="folder to write (HF_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported weights (default: the source checkpoint's; GGUF: float32)")
    p.set_defaults(func=cmd_export_hf)
    return parser


def cmd_export_hf(args: argparse.Namespace) -> int:
    from nlprune.api import export_hf

    out = export_hf(args.run, args.output, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (the first layer of a run otherwise compiles for
    seconds every time); NLPRUNE_COMPILATION_CACHE=0 turns it off. Every program is cached,
    however quick its compilation: a small model's run compiles ~30 programs of ~0.1 s each,
    3-4 s per process that a cache read saves."""
    if os.environ.get("NLPRUNE_COMPILATION_CACHE", "1") == "0":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cards.cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    from nlprune import processes

    try:
        rc = _main(argv)
    except BaseException:
        if processes.several():  # its traceback, then out without JAX's shutdown wait
            traceback.print_exc()
            processes.leave(1)
        raise
    processes.leave(rc)  # several processes after a failure: out now (see processes.leave)
    return rc


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(config_argument(argv), protocol_argument(argv))
    except USER_ERRORS as e:  # a recipe file that cannot be used
        print(f"nlprune prune: error: {_one_line(e)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    command = f"nlprune {args.command}"
    in_main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, raise_terminated) if in_main else None
    previous_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{command}: note: {_one_line(message)}", file=sys.stderr)

    # notices (a recomputed cache, a taken-over lock, a restored run) in one line each
    warnings.showwarning = show
    install_unraisable_hook()  # kept after main: the callbacks it filters may come at exit
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter(f"{command}: note: %(message)s"))
    logger = logging.getLogger("nlprune")
    logger.addHandler(notes)
    logger.propagate = False
    try:
        enable_compilation_cache()
        return args.func(args)
    except USER_ERRORS as e:
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ProcessFailed as e:  # another process of a jax.distributed run
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine's, not the input's: disk full, permissions, I/O
        where = f" ({e.filename})" if e.filename else ""
        hint = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "; free some space and rerun" + (" (the prune resumes where it stopped)" if args.command == "prune" else "")
        print(f"{command}: error: {_one_line(e.strerror or e)}{where}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return 143
    finally:
        warnings.showwarning = previous_show
        logger.removeHandler(notes)
        logger.propagate = True
        if in_main and previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(main())
