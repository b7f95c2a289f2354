"""CLI flags generated from a config dataclass's fields (type hints, defaults, `help` / `choices` metadata), and
the dataclass built back from the parsed arguments. Used for the engine, server, router and Ray options alike."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _arg_type(hint: Any) -> type:
    """The argparse `type` for a field's hint: `X | None` reads as X; a union with str reads as str (the
    dataclass parses sizes such as '2GiB' itself)."""
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = str if str in args else args[0]
    return hint if hint in (int, float) else str


def add_config_args(parser: argparse.ArgumentParser, cls: type, title: str, description: str) -> None:
    """One flag per field of dataclass `cls` (--field-name), in an argument group of its own."""
    group = parser.add_argument_group(title, description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint, default, meta = hints[f.name], f.default, f.metadata
        if hint is bool or hint == bool | None:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            continue
        group.add_argument(flag, type=_arg_type(hint), default=default, choices=meta.get("choices"),
                           help=meta["help"] + ("" if default in (None, "") else f" (default: {default})"))


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


ENV_PREFIX = "TOKENMILL_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def _coerce(action: argparse.Action, value: Any, source: str) -> Any:
    if isinstance(action, argparse.BooleanOptionalAction):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(f"{source}: {value!r} is not a boolean (true/false)")
    return str(value) if not isinstance(value, int | float | str) else value


def external_defaults(subparsers: dict[str, argparse.ArgumentParser], config_file: str | None,
                      environ: dict[str, str]) -> None:
    """Flag defaults from TOKENMILL_<FLAG> environment variables (TOKENMILL_MAX_NUM_SEQS=64) and from a YAML
    file of flag: value pairs (--config; it wins over the environment); the command line wins over both.
    Applied to every subcommand that has the flag. Raises ValueError naming an unknown key or a bad value."""
    from_file: dict[str, Any] = {}
    if config_file:
        import yaml

        try:
            with open(config_file) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read --config {config_file}: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {config_file} must hold a mapping of flag: value")
        from_file = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        known = set().union(*(_flag_actions(p) for p in subparsers.values()))
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise ValueError(f"--config {config_file}: unknown option(s) {', '.join(unknown)}")
    for parser in subparsers.values():
        defaults = {}
        for dest, action in _flag_actions(parser).items():
            env = environ.get(ENV_PREFIX + dest.upper())
            if dest in from_file:
                defaults[dest] = _coerce(action, from_file[dest], f"--config {config_file}: {dest}")
            elif env is not None:
                defaults[dest] = _coerce(action, env, ENV_PREFIX + dest.upper())
        if defaults:
            parser.set_defaults(**defaults)
