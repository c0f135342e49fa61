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
import warnings
from pathlib import Path

from nlprune import cards
from nlprune.atomic import Terminated, install_unraisable_hook, raise_terminated

# Errors that are the user's input, reported as one line without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, FileNotFoundError, ImportError, FileExistsError, NotADirectoryError,
    IsADirectoryError,
)


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add ``--some-flag`` together with its ``--some_flag`` spelling."""
    names = [flag] + ([flag.replace("-", "_").replace("__", "--", 1)] if "-" in flag[2:] else [])
    parser.add_argument(*names, **kwargs)


def _write_json(path: str | Path, record: dict) -> None:
    from nlprune.runs import write_json

    write_json(Path(path), record)


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


def add_data_args(p: argparse.ArgumentParser) -> None:
    _add(
        p,
        "--data-dir",
        default=None,
        help="local folder with C4 shards / wiki.test.raw instead of the hub "
        "(default: $NLPRUNE_DATA_DIR, else the hub)",
    )


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("c4", "wikitext2"), default="c4")
    _add(p, "--eval-nsamples", type=int, default=128, help="evaluation windows (default 128)")
    _add(p, "--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    _add(p, "--batch-size", type=int, default=8, help="windows per forward pass")


def cmd_eval(args: argparse.Namespace) -> int:
    from nlprune.api import evaluate
    from nlprune.runs import check_output_file

    if args.output is not None:  # before the evaluation, not after it
        check_output_file(args.output, args.overwrite)
    record = evaluate(
        model=args.model,
        run_dir=args.run,
        dataset=args.dataset,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        use_cache=not args.no_cache,
    )
    print(
        f"{record['model']['name']} on {args.dataset} ({record['windows']} x {args.seqlen}): "
        f"perplexity {record['perplexity']:.4f} ({record['tokens']} tokens, {record['seconds']:.1f} s)"
    )
    if args.output:
        _write_json(args.output, record)
        print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- prune


# --prune-method nonlinear's flags: option name -> flag
NONLINEAR_FLAGS = {
    "recipe": "--recipe", "linear_method": "--linear-method", "lam": "--lambda", "eta": "--eta",
    "step_rule": "--step-rule", "steps": "--steps", "mask_init": "--mask-init", "binarize": "--binarize",
    "project": "--project",
    "window_batch": "--window-batch", "window_chunk": "--window-chunk", "eta_relative": "--eta-relative",
    "straight_through": "--straight-through", "objective": "--objective", "refit": "--refit",
    "refit_steps": "--refit-steps", "refit_eta": "--refit-eta", "refit_cg": "--refit-cg",
}


def _method_options(args: argparse.Namespace) -> dict:
    """Method-specific flags the user actually gave (the method validates the names)."""
    flags = {"blocksize": args.blocksize, "percdamp": args.percdamp, "group": args.group}
    flags.update({k: getattr(args, k) for k in NONLINEAR_FLAGS})
    options = {k: v for k, v in flags.items() if v is not None}
    stray = [NONLINEAR_FLAGS[k] for k in NONLINEAR_FLAGS if k in options]
    if stray and args.prune_method != "nonlinear":
        raise ValueError(f"{', '.join(stray)} apply only to --prune-method nonlinear, not {args.prune_method}.")
    return options


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument(
        "--mesh", default=None, metavar="SPEC",
        help="device mesh, e.g. data=2,model=2: 'data' shards the calibration windows, 'model' the "
        "weights' rows and the non-linear method's KV groups; sizes multiply to the device count "
        "(default: every device on 'data'; one device = the one-device path)",
    )
    g.add_argument(
        "--distributed", action="store_true",
        help="call jax.distributed.initialize first (one process per host, same command on each); "
        "implied when JAX_COORDINATOR_ADDRESS is set",
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from nlprune import parallel

    parallel.initialize_distributed(args.distributed)  # before anything touches a device
    from nlprune.api import prune

    _, record = prune(
        model=args.model,
        prune_method=args.prune_method,
        sparsity_ratio=args.sparsity_ratio,
        sparsity_type=args.sparsity_type,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        data_dir=args.data_dir,
        output=args.output,
        overwrite=args.overwrite,
        do_eval=args.eval,
        eval_nsamples=args.eval_nsamples,
        eval_seqlen=args.eval_seqlen,
        batch_size=args.batch_size,
        options=_method_options(args),
        true_sequential=args.true_sequential,
        mesh=parallel.parse_mesh(args.mesh),
        use_cache=not args.no_cache,
    )
    a = record["args"]
    print(
        f"{a['model']}: {a['prune_method']} {a['sparsity_type']} at {a['sparsity_ratio']:g} -> "
        f"sparsity {record['sparsity']['overall']:.4f} in {record['prune_seconds']:.1f} s"
        + (f" on mesh {record['mesh']['spec']}" if record["mesh"]["devices"] > 1 else "")
    )
    for note in record["mesh"]["notes"]:
        print(f"  mesh: {note}")
    if "attention_error" in record:
        print(f"  attention error (mean over layers, held-out): {record['attention_error']['mean']:.3e}")
    if "perplexity" in record:
        print(
            f"  C4 perplexity ({record['eval']['nsamples']} x {record['eval']['seqlen']}): "
            f"dense {record['dense_perplexity']:.3f} {_cache_note(record)} -> pruned {record['perplexity']:.3f}"
        )
    print(f"  wrote {args.output}/results.json")
    return 0


def _cache_note(record: dict) -> str:
    cache = record.get("dense_perplexity_cache") or {}
    if not cache.get("cached"):
        return "(computed now)"
    return f"(cached, computed {str(cache.get('computed')).replace('T', ' ')[:16]})"


def add_prune_parser(sub) -> None:
    from nlprune.prune import available_methods

    p = sub.add_parser(
        "prune",
        help="prune a model layer by layer and write a run directory",
        description="Prune every decoder layer in order, calibrating each on the outputs of "
        "the already-pruned layers before it. Rerunning the same command on the same --output "
        "resumes an interrupted run.",
    )
    p.add_argument("--model", default=cards.DEFAULT_MODEL, help="card name, HF folder or .gguf file")
    _add(p, "--prune-method", required=True, choices=available_methods(), help="pruning method")
    _add(p, "--sparsity-ratio", type=float, default=None, help="fraction of weights removed, in [0, 1)")
    _add(p, "--sparsity-type", default="unstructured",
         help="unstructured, or N:M: keep N of every M consecutive weights of a row (2:4 and 4:8 are "
         "50%% sparse, 1:4 is 75%%)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    add_data_args(p)
    p.add_argument("--output", required=True, help="run directory to write (RUN_DIR)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output once the new one has finished (only an "
                   "nlprune run is ever replaced)")
    p.add_argument("--eval", action="store_true", help="also measure dense and pruned C4 perplexity")
    _add(p, "--no-cache", action="store_true",
         help="recompute the dense perplexity and the evaluation tokens instead of reading their caches")
    _add(p, "--eval-nsamples", type=int, default=128, help="evaluation windows (default 128)")
    _add(p, "--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    _add(p, "--batch-size", type=int, default=8, help="windows per forward pass")
    _add(
        p,
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate each sublayer (q/k/v, o, gate/up, down) on the already-pruned ones "
        "before it, one forward per layer (default); --no-true-sequential collects all "
        "statistics from the dense layer first, as Wanda's reference code does",
    )
    add_mesh_args(p)
    g = p.add_argument_group("method options")
    g.add_argument("--blocksize", type=int, default=None, help="sparsegpt: columns per block (128)")
    g.add_argument("--percdamp", type=float, default=None, help="sparsegpt: Hessian damping (0.01)")
    g.add_argument("--group", choices=("row", "matrix"), default=None, help="magnitude: comparison group")
    from nlprune.prune.nonlinear import BINARIZE_CHOICES, LINEAR_METHODS, MASK_INITS, OBJECTIVES, RECIPES, STEP_RULES

    n = p.add_argument_group(
        "nonlinear options",
        "--prune-method nonlinear: q/k masks by gradient descent on the attention error "
        "(Liang et al., ICLR 2025), v/o/MLP by --linear-method. Defaults are the paper's recipe; "
        "--straight-through switches the left-out ones to the variant that beats Wanda on SmolLM2 "
        "(--mask-init wanda --step-rule backtracking --eta 0.1 --eta-relative --steps 20)",
    )
    _add(n, "--recipe", choices=tuple(RECIPES), default=None,
         help="preset: paper (default; Algorithm 1 as published), best (--straight-through --linear-method "
         "sparsegpt --refit: the lowest C4 perplexity measured, BENCHMARKS.md) or fast (best with --steps 10 "
         "--refit-steps 0 --refit-cg 10: as good in ~60%% of the time); flags given override it")
    _add(n, "--linear-method", choices=LINEAR_METHODS, default=None, help="fills in v, o, gate, up, down (wanda)")
    n.add_argument("--lambda", dest="lam", type=float, default=None, help="mask regulariser lambda >= 0 (0.05, the paper's)")
    n.add_argument("--eta", type=float, default=None,
                   help="step size > 0 (fixed rule: 0.005, the paper's; certified: 1/L; certified_local: first try 0.005; "
                   "backtracking: first try 1/|lambda_max|)")
    _add(n, "--step-rule", choices=STEP_RULES, default=None,
         help="fixed (paper's eta, default), certified (1/L on the box [0,1], projected), certified_local "
         "(per-step certificate), backtracking (Armijo)")
    n.add_argument("--steps", type=int, default=None, help="gradient steps T (100, the paper's)")
    _add(n, "--mask-init", choices=MASK_INITS, default=None, help="M_0: ones (dense, the paper's) or wanda's mask")
    n.add_argument("--binarize", choices=BINARIZE_CHOICES, default=None,
                   help="keep the top (1 - ratio) of M_T per row (default), per matrix, or of |M_T o W| per row")
    n.add_argument("--project", action="store_true", default=None, help="clip the masks to [0, 1] after every step")
    _add(n, "--window-batch", type=int, default=None, help="calibration windows per step, cycling (default 1; --nsamples for full-batch GD)")
    _add(n, "--window-chunk", type=int, default=None,
         help="windows per gradient chunk, to bound memory at long seqlen (default: all at once)")
    _add(n, "--eta-relative", action="store_true", default=None,
         help="eta in units of 1/RMS of each KV group's initial gradient (fixed or backtracking; needs --mask-init wanda)")
    _add(n, "--straight-through", action="store_true", default=None,
         help="each step's attention sees the binarised masks (top-k of scores started from Wanda's), gradients "
         "pass straight through to the scores; needs --binarize row")
    _add(n, "--objective", choices=OBJECTIVES, default=None,
         help="probs (default): q/k match the attention matrix softmax(QK^T); output: q, k, v and o masks match "
         "the attention output softmax(QK^T) V W_O per KV group (needs --straight-through)")
    _add(n, "--refit", action="store_true", default=None,
         help="re-fit the kept weights once the masks are fixed: v/o/MLP by least squares (SparseGPT's update on "
         "the mask, then --refit-cg CG steps; o and down towards the dense sublayer's output), q/k (and v under "
         "--objective output) by --refit-steps backtracking gradient steps on the objective")
    _add(n, "--refit-steps", type=int, default=None, help="--refit: gradient steps on the kept q/k weights (10; 0: none)")
    _add(n, "--refit-eta", type=float, default=None,
         help="--refit: first try of each gradient step, as a fraction of RMS(W) (0.01)")
    _add(n, "--refit-cg", type=int, default=None,
         help="--refit: conjugate-gradient steps polishing v/o/MLP towards the exact row-wise least squares (20)")
    p.set_defaults(func=cmd_prune)


# --------------------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace) -> int:
    from nlprune import parallel
    from nlprune.plan import config_of, plan_memory
    from nlprune.prune import parse_pattern

    if args.mesh and args.devices:
        raise ValueError("give --mesh or --devices, not both (--devices N is --mesh data=N).")
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}.")
    sizes = parallel.parse_mesh_spec(args.mesh) if args.mesh else {"data": args.devices or 1, "model": 1}
    parse_pattern(args.sparsity_type, 0.5 if args.sparsity_type == "unstructured" else None)  # validate it
    config, name = config_of(args.model)
    settings = dict(
        method=args.prune_method, sparsity_type=args.sparsity_type, nsamples=args.nsamples, seqlen=args.seqlen,
        data=sizes["data"],
        model=sizes["model"], batch_size=args.batch_size,
    )
    if args.prune_method == "nonlinear":
        from nlprune.prune.nonlinear import RECIPES

        fill = args.linear_method or RECIPES[args.recipe or "paper"].get("linear_method", "wanda")
        settings.update(window_batch=args.window_batch, window_chunk=args.window_chunk, linear_method=fill)
    elif args.window_batch != 1 or args.window_chunk is not None or args.linear_method or args.recipe:
        raise ValueError(
            "--window-batch, --window-chunk, --linear-method and --recipe apply only to --prune-method nonlinear."
        )
    if args.output:
        from nlprune.runs import check_output_file

        check_output_file(args.output, overwrite=True)
    plan = plan_memory(config, name, **settings)
    print(plan.table())
    if args.output:
        _write_json(args.output, plan.as_dict())
        print(f"wrote {args.output}")
    return 0


def add_plan_parser(sub) -> None:
    from nlprune.prune import available_methods
    from nlprune.prune.nonlinear import LINEAR_METHODS, RECIPES

    p = sub.add_parser(
        "plan",
        help="peak memory per device of a prune, from the model's config alone",
        description="Plan the peak memory per device of `nlprune prune` (float32): weights, "
        "calibration hidden states, one layer's activations, Hessians and the non-linear step's "
        "n x n attention, for a mesh, and which options lower it. Needs no weights.",
    )
    p.add_argument("--model", default=cards.DEFAULT_MODEL, help="card name, HF folder (config.json) or .gguf file")
    _add(p, "--prune-method", default="wanda", choices=available_methods(), help="pruning method (wanda)")
    _add(p, "--sparsity-type", default="unstructured",
         help="unstructured, or N:M (keep N of every M weights: 2:4, 4:8); does not change memory")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="mesh to plan for, e.g. data=2,model=2 (default: one device)")
    p.add_argument("--devices", type=int, default=None, help="plan for N devices on 'data' (= --mesh data=N)")
    _add(p, "--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    _add(p, "--window-batch", type=int, default=1, help="nonlinear: windows per gradient step (default 1)")
    _add(p, "--window-chunk", type=int, default=None, help="nonlinear: windows per gradient chunk (default: all)")
    _add(p, "--linear-method", default=None, choices=LINEAR_METHODS, help="nonlinear: fill-in method")
    _add(p, "--recipe", default=None, choices=tuple(RECIPES), help="nonlinear: preset (best and fast fill in with sparsegpt)")
    p.add_argument("--output", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage is in --help), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nlprune",
        description="Prune LLM weights in JAX and measure what it cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the supported models (cards in models/)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="perplexity of a model or a pruned run")
    p.add_argument(
        "--model",
        default=None,
        help=f"card name, Hugging Face folder or .gguf file (default: the run's model with "
        f"--run, else {cards.DEFAULT_MODEL})",
    )
    p.add_argument("--run", default=None, help="evaluate the pruned model of this run directory")
    p.add_argument("--dataset", choices=("c4", "wikitext2"), default="c4")
    p.add_argument("--nsamples", type=int, default=128, help="evaluation windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    _add(p, "--batch-size", type=int, default=8, help="windows per forward pass")
    add_data_args(p)
    p.add_argument("--output", default=None, help="write the JSON record here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    _add(p, "--no-cache", action="store_true", help="tokenize the evaluation text again instead of reading the cache")
    p.set_defaults(func=cmd_eval)

    add_prune_parser(sub)
    add_plan_parser(sub)

    from nlprune.experiments.synthetic import add_parser as add_synthetic_parser

    add_synthetic_parser(sub)

    p = sub.add_parser("export-hf", help="write a run's pruned model as a Hugging Face folder")
    p.add_argument("--run", required=True, help="run directory written by `nlprune prune`")
    p.add_argument("--output", required=True, help="folder to write (HF_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.set_defaults(func=cmd_export_hf)
    return parser


def cmd_export_hf(args: argparse.Namespace) -> int:
    from nlprune.api import export_hf

    out = export_hf(args.run, args.output, overwrite=args.overwrite)
    print(f"wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (the first layer of a run otherwise compiles for
    seconds every time); NLPRUNE_COMPILATION_CACHE=0 turns it off."""
    if os.environ.get("NLPRUNE_COMPILATION_CACHE", "1") == "0":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cards.cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        _enable_compilation_cache()
        return args.func(args)
    except USER_ERRORS as e:
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
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
