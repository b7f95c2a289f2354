"""Flags generated from config dataclasses: types, defaults in the help, booleans, round trip."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tokenmill.entrypoints.config_args import add_config_args, config_from_args


@dataclasses.dataclass
class _Cfg:
    count: int = dataclasses.field(default=3, metadata={"help": "How many."})
    ratio: float = dataclasses.field(default=0.5, metadata={"help": "A ratio."})
    size: int | str = dataclasses.field(default="4MiB", metadata={"help": "A size."})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "A limit."})
    mode: str = dataclasses.field(default="a", metadata={"help": "A mode.", "choices": ["a", "b"]})
    extra: str = dataclasses.field(default="", metadata={"help": "Extra flags."})
    on: bool = dataclasses.field(default=False, metadata={"help": "Switch."})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_config_args(p, _Cfg, "things", "what the things are")
    return p


def test_flags_parse_back_into_the_dataclass():
    args = _parser().parse_args(["--count", "7", "--ratio", "2", "--size", "2GiB", "--limit", "9", "--mode", "b",
                                 "--on"])
    assert config_from_args(_Cfg, args) == _Cfg(count=7, ratio=2.0, size="2GiB", limit=9, mode="b", on=True)
    assert config_from_args(_Cfg, _parser().parse_args([])) == _Cfg()
    assert _parser().parse_args(["--no-on"]).on is False


def test_help_shows_group_and_defaults_but_not_empty_ones():
    text = _parser().format_help()
    assert "things:" in text and "what the things are" in text
    assert "How many. (default: 3)" in text and "A size. (default: 4MiB)" in text
    assert "A limit. (default" not in text and "Extra flags. (default" not in text


@pytest.mark.parametrize("argv", [["--count", "many"], ["--limit", "1.5"], ["--mode", "c"]])
def test_bad_values_are_argparse_errors(argv):
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(argv)


def test_a_bad_log_level_is_a_cli_error_not_a_crash(capsys):
    from tokenmill.entrypoints.cli import build_parser

    assert build_parser().parse_args(["--log-level", "warning", "generate", "x"]).log_level == "WARNING"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--log-level", "loud", "generate", "x"])
    assert e.value.code == 2 and "is not a logging level" in capsys.readouterr().err
