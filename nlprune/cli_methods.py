"""The method-option flags of ``nlprune prune`` and ``nlprune plan``, generated from the
methods' option dataclasses (:class:`nlprune.prune.base.MethodOptions`): a new option is a
new field, and its flag, type, choices and help follow."""

from __future__ import annotations

import argparse
import dataclasses

from nlprune.cli_prune import add_flag


def method_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every option field of every method: name -> (field, the methods that take it)."""
    from nlprune.methods import available_methods
    from nlprune.prune.base import method_class

    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name in available_methods():
        for f in dataclasses.fields(method_class(name).Options):
            fields.setdefault(f.name, (f, []))[1].append(name)
    return fields


def _field(method: str, name: str) -> dataclasses.Field:
    from nlprune.prune.base import method_class

    return {f.name: f for f in dataclasses.fields(method_class(method).Options)}[name]


def add_method_args(p: argparse.ArgumentParser) -> None:
    """One flag per option field of the methods (``--prune-method``'s options), generated from
    their dataclasses; a flag left out keeps the method's default (or its recipe's)."""
    from nlprune.prune.base import option_flag, option_type

    g = p.add_argument_group(
        "method options", "each applies to the methods named in its help; defaults are the method's own "
        "(nonlinear: its --recipe's)",
    )
    for name, (f, methods) in method_fields().items():
        kind = option_type(f)
        # one flag; each method that takes it says what it does there
        helps = dict.fromkeys(_field(m, name).metadata["help"] for m in methods)
        help_ = "; ".join(helps)
        kwargs: dict = {"dest": name, "default": None, "help": help_.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = tuple(f.metadata["choices"])
        add_flag(g, option_flag(f), **kwargs)


def method_options(args: argparse.Namespace) -> dict:
    """The method options the user gave (the method validates the values)."""
    given = {name: getattr(args, name) for name in method_fields() if getattr(args, name, None) is not None}
    fields = method_fields()
    stray = sorted(n for n in given if args.prune_method not in fields[n][1])
    if stray:
        from nlprune.prune.base import option_flag

        flags = ", ".join(f"{option_flag(fields[n][0])} ({'/'.join(fields[n][1])})" for n in stray)
        raise ValueError(f"{flags} do{'es' if len(stray) == 1 else ''} not apply to --prune-method {args.prune_method}.")
    return given
