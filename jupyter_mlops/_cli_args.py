"""Argument pieces the command-line faces share (the ``-p KEY=VALUE`` option and its values)."""

from __future__ import annotations

import argparse

__all__ = ["add_parameter_option", "parameters"]


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_value(value: str) -> object:
    """A value from the command line: numbers, booleans and JSON literals keep their type."""
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


def add_parameter_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``-p/--parameter KEY=VALUE``, repeatable, collected in ``args.parameters`` as pairs."""
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", type=_pair, default=[],
                        metavar="KEY=VALUE", help=help)


def parameters(pairs: list[tuple[str, str]]) -> dict[str, object]:
    """``args.parameters`` as a dict of typed values (the last of a repeated key wins)."""
    return {key: parse_value(value) for key, value in pairs}
