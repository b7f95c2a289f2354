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
