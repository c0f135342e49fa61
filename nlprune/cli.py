"""The ``nlprune`` command line: a thin layer over the Python API.

Options use the vocabulary of Wanda's and SparseGPT's scripts (prune method, sparsity ratio,
sparsity type, nsamples, seqlen, seed); underscore spellings (``--sparsity_ratio``) work too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nlprune import cards

# Errors that are the user's input, reported as one line without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError, FileExistsError)


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add ``--some-flag`` together with its ``--some_flag`` spelling."""
    names = [flag] + ([flag.replace("-", "_").replace("__", "--", 1)] if "-" in flag[2:] else [])
    parser.add_argument(*names, **kwargs)


def _write_json(path: str | Path, record: dict) -> None:
    """Atomic JSON write: a reader never sees half a file, a crash never eats the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


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

    record = evaluate(
        model=args.model,
        run_dir=args.run,
        dataset=args.dataset,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    print(
        f"{record['model']['name']} on {args.dataset} ({record['windows']} x {args.seqlen}): "
        f"perplexity {record['perplexity']:.4f} ({record['tokens']} tokens, {record['seconds']:.1f} s)"
    )
    if args.output:
        _write_json(args.output, record)
        print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlprune",
        description="Prune LLM weights in JAX and measure what it cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the supported models (cards in models/)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="perplexity of a model or a pruned run")
    p.add_argument(
        "--model",
        default=cards.DEFAULT_MODEL,
        help="card name, Hugging Face folder or .gguf file (default %(default)s)",
    )
    p.add_argument("--run", default=None, help="evaluate the pruned model of this run directory")
    p.add_argument("--dataset", choices=("c4", "wikitext2"), default="c4")
    p.add_argument("--nsamples", type=int, default=128, help="evaluation windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    _add(p, "--batch-size", type=int, default=8, help="windows per forward pass")
    add_data_args(p)
    p.add_argument("--output", default=None, help="write the JSON record here")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"nlprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nlprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
