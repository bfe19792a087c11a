"""What both command lines share: one-line usage errors, argument types,
and turning failures into one line on stderr with a non-zero exit."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from .cpus import parse_cpus
from .errors import ConfigError, VirtioError
from .limits import Choice, Limit
from .region import check_name
from .units import parse_size


class CliError(Exception):
    """A user mistake found after parsing: one line, exit 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (try --help)\n")


def _arg_type(parse, errors):
    """An argparse type from a parser that raises one of errors on bad text."""

    def arg(text):
        try:
            return parse(text)
        except errors as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return arg


name_arg = _arg_type(check_name, VirtioError)
cpus_arg = _arg_type(parse_cpus, ValueError)  # CPU list: 1, 0-1, 0,2-3
size_arg = _arg_type(parse_size, ValueError)  # bytes: 4096, 4k, 64K, 1G


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def limit_arg(limit: Limit, parse: Callable[[str], Any] = parse_int) -> Callable[[str], Any]:
    """argparse type: text parsed, then checked against a limit of
    virtio_py.limits (the message is the Python API's)."""

    def arg(text: str) -> Any:
        try:
            return limit.check(parse(text))
        except ValueError as e:  # ConfigError too
            raise argparse.ArgumentTypeError(str(e)) from None

    arg.__name__ = limit.name  # what argparse calls the value in other errors
    return arg


def choice_arg(choice: Choice) -> dict[str, Any]:
    """add_argument keywords for one of a Choice's names (same message as the API)."""

    def arg(text: str) -> str:
        try:
            return choice.check(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return {"type": arg, "metavar": "{" + ",".join(choice.names) + "}"}


def positive_float(text):
    """argparse type: a finite number above 0 (seconds, say)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, not {text}")
    return v


def check_output(path, what):
    """CliError now, not after a long run, if path cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CliError(f"{what} {path}: not a writable file path")


def error_text(e):
    """One line for an exception: an OSError by its strerror and file name."""
    if isinstance(e, OSError) and not isinstance(e, VirtioError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)


def run_main(prog, parser, commands, argv=None, interrupted=None):
    """Parse argv, run commands[cmd](args) and map failures to one line."""
    a = parser.parse_args(argv)
    try:
        return commands[a.cmd](a)
    except (CliError, OSError, VirtioError) as e:
        print(f"{prog}: error: {error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
