"""Recipe files for ``nlprune prune --config FILE``, the configuration a run records, and the
checks of prune's task flags.

A recipe is TOML, JSON or YAML (YAML when PyYAML is installed): one key per flag of
``nlprune prune``, named as the flag with dashes or underscores (``sparsity-ratio`` or
``sparsity_ratio``; a boolean flag by its positive name: ``true_sequential = false``). Flags
given on the command line win over the file. A run's ``results.json`` is a recipe too: its
``config`` key holds every flag's value as the run resolved it, so

    nlprune prune --config runs/a/results.json --output runs/b

reruns run ``a``. A value of None (JSON null) is a flag left at its default.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from nlprune.request import FLAG_OF_FIELD

# Values a recipe may give in a richer form than the flag's text.
INLINE_PLAN_KEYS = ("layer_sparsity",)  # a list of ratios or a dict of linear ratios, inline
LIST_KEYS = ("tasks", "eval_datasets")  # lists of names, joined with commas


class ConfigError(ValueError):
    """A recipe file that cannot be used as asked."""


def read_config_file(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """The keys of a recipe file (TOML, JSON, YAML), or of a run's results.json (its ``config``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with open(path, "rb") as f:
                values = tomllib.load(f)
        elif suffix == ".json":
            values = json.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{flag} {path}: reading YAML needs PyYAML; write the recipe as TOML or JSON.") from None
            values = yaml.safe_load(path.read_text())
        else:
            raise ConfigError(f"{flag} {path}: unknown kind of file; give a .toml, .json or .yaml recipe (or a run's results.json).")
    except (tomllib.TOMLDecodeError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{flag} {path} cannot be parsed: {' '.join(str(e).split())}") from None
    except Exception as e:  # yaml's own errors
        raise ConfigError(f"{flag} {path} cannot be parsed: {' '.join(str(e).split())}") from None
    if isinstance(values, dict) and isinstance(values.get("config"), dict) and "args" in values:
        values = values["config"]  # a run's results.json
    if not isinstance(values, dict):
        raise ConfigError(f"{flag} {path} must hold a table of flag = value, not {type(values).__name__}.")
    return values


def flag_keys(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("help", "config", "protocol")) -> dict[str, argparse.Action]:
    """Every key a recipe may use for ``parser``'s flags -> the flag's action."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.dest in skip or not action.option_strings:
            continue
        keys[action.dest] = action
        for option in action.option_strings:
            name = option.lstrip("-")
            if isinstance(action, argparse.BooleanOptionalAction) and name.startswith(("no-", "no_")):
                continue
            keys[name] = keys[name.replace("-", "_")] = action
    return keys


def _value(key: str, value: Any, action: argparse.Action, path: Path, flag: str = "--config") -> Any:
    """A recipe's value as the flag would have parsed it, or a ConfigError naming the key."""
    where = f"{flag} {path}: {key}"
    if action.dest in INLINE_PLAN_KEYS and isinstance(value, (list, dict)):
        return value
    if action.dest in LIST_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is a switch: give true or false, not {value!r}.")
        return value
    kind = action.type or str
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ConfigError(f"{where} takes {getattr(kind, '__name__', 'a value')}, not {value!r}.")
    if kind is float and isinstance(value, int):
        value = float(value)
    elif kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif not (isinstance(kind, type) and isinstance(value, kind)):  # kind may be a parsing function
        if not isinstance(value, str):
            raise ConfigError(f"{where} takes {getattr(kind, '__name__', 'text')}, not {value!r}.")
        try:
            value = kind(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {value!r} is not {getattr(kind, '__name__', 'valid')} ({e}).") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} is {value!r}; choose one of {', '.join(map(str, action.choices))}.")
    return value


def config_argument(argv: list[str]) -> str | None:
    """The --config FILE of a prune command line, read before the parser is built (its values
    become the parser's defaults)."""
    return _pre_parsed(argv, "--config")


def protocol_argument(argv: list[str]) -> str | None:
    """The --protocol NAME|FILE of a prune command line, read before the parser is built."""
    return _pre_parsed(argv, "--protocol")


def _pre_parsed(argv: list[str], flag: str) -> str | None:
    if not argv or argv[0] != "prune":
        return None
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag, default=None)
    known, _ = pre.parse_known_args(argv[1:])
    return getattr(known, flag.lstrip("-"))


# A protocol fixes what a measurement is made on, never what is pruned or how: calibration and
# evaluation flags only (by flag destination).
PROTOCOL_DIR = Path(__file__).parent / "protocols"
PROTOCOL_DESTS = ("nsamples", "seqlen", "seed", "calib_dataset", "eval", "eval_nsamples", "eval_seqlen",
                  "eval_datasets", "heldout_nsamples")


def protocols() -> list[str]:
    """The protocols nlprune ships (``--protocol NAME``)."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


def protocol_path(name: str | Path) -> Path:
    """A shipped protocol by name (``cpu``, ``field``), or a protocol file by path."""
    if Path(name).suffix:
        return Path(name)
    path = PROTOCOL_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"--protocol {name!r}: no such protocol; the shipped ones are {', '.join(protocols())} "
                          "(or give a .toml file of calibration and evaluation flags).")
    return path


def apply_protocol(parser: argparse.ArgumentParser, name: str | Path) -> dict[str, Any]:
    """Make a protocol's calibration and evaluation settings ``parser``'s defaults (over a
    --config recipe's; the command line still wins). A key that is not a calibration or
    evaluation flag is refused: a protocol must not change what is measured."""
    path = protocol_path(name)
    values = read_config_file(path, flag="--protocol")
    keys = flag_keys(parser)
    other = sorted(k for k in values if str(k) in keys and keys[str(k)].dest not in PROTOCOL_DESTS)
    if other:
        raise ConfigError(
            f"--protocol {path}: {', '.join(map(repr, other))} {'is' if len(other) == 1 else 'are'} not a calibration "
            f"or evaluation setting; a protocol sets only {', '.join(PROTOCOL_DESTS)} (put the rest in --config)."
        )
    return apply_config(parser, path, values=values, flag="--protocol")


def apply_config(parser: argparse.ArgumentParser, path: str | Path, *, values: dict[str, Any] | None = None,
                 flag: str = "--config") -> dict[str, Any]:
    """Make the recipe's values ``parser``'s defaults (the command line then wins) and return
    them by flag destination; an unknown key is refused, naming it and the known keys."""
    path = Path(path)
    values = read_config_file(path, flag) if values is None else values
    keys = flag_keys(parser, skip=("help", "config", "protocol"))
    unknown = sorted(k for k in values if str(k) not in keys)
    if unknown:
        known = sorted({a.dest for a in keys.values()})
        raise ConfigError(
            f"{flag} {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"the keys are the flags of `nlprune prune`: {', '.join(known)}."
        )
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        action = keys[str(key)]
        if action.dest in defaults and value is not None:
            raise ConfigError(f"{flag} {path} gives {action.dest} twice (as {key!r} and another spelling).")
        if value is not None:
            defaults[action.dest] = _value(str(key), value, action, path, flag)
            action.required = False  # given by the file: the command line need not repeat it
    parser.set_defaults(**defaults)
    return defaults


# The fields of a prune request under the command line's flag names (``config`` in results.json).
CONFIG_OF_ARGUMENT = FLAG_OF_FIELD  # PruneRequest field -> the flag it is recorded under


def config_of_call(arguments: dict[str, Any]) -> dict[str, Any]:
    """A prune request's fields (``nlprune.runner.PruneRequest``) as the configuration the
    command line records: every flag of ``nlprune prune`` with its value."""
    from nlprune import parallel

    config = {flag: arguments[name] for name, flag in CONFIG_OF_ARGUMENT.items()}
    model, mesh = arguments["model"], arguments["mesh"]
    if not isinstance(model, (str, Path)):  # an api.Loaded model
        config["model"] = model.source.card["name"] if model.source.card else str(model.source.weights_path)
    config["mesh"] = mesh if mesh is None or isinstance(mesh, str) else parallel.mesh_spec(mesh)
    config["no_cache"] = not arguments["use_cache"]
    config["distributed"] = False
    for key in ("model", "data_dir", "output", "calib_dataset", "task_data_dir", "layer_sparsity"):
        if isinstance(config[key], Path):
            config[key] = str(config[key])
    for key in LIST_KEYS:
        if config[key] is not None and not isinstance(config[key], str):
            config[key] = ",".join(config[key])
    config.update(arguments["options"] or {})
    return config


def check_prune_tasks(tasks, task_data_dir, data_dir, limit, dense_tasks) -> tuple[list[str] | None, Path | None]:
    """The zero-shot task names and folder of a prune, every task file read (before any
    loading); None, None without ``tasks``."""
    if tasks is None or (isinstance(tasks, str) and not tasks.strip()):
        if limit is not None or task_data_dir is not None or dense_tasks:
            raise ValueError("--limit, --task-data-dir and --dense-tasks apply only with --tasks.")
        return None, None
    from nlprune.eval.tasks import resolve_task_data_dir
    from nlprune.eval.tasks.runner import check_task_request

    folder = resolve_task_data_dir(task_data_dir, data_dir)
    return check_task_request(tasks, folder, limit), folder
