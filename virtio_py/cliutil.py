"""What both command lines share: one-line usage errors, argument types,
and turning failures into one line on stderr with a non-zero exit."""
import argparse
import sys

from .errors import VirtioError
from .region import check_name


class CliError(Exception):
    """A user mistake found after parsing: one line, exit 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (try --help)\n")


def name_arg(text):
    try:
        return check_name(text)
    except VirtioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_main(prog, parser, commands, argv=None, interrupted=None):
    """Parse argv, run commands[cmd](args) and map failures to one line."""
    a = parser.parse_args(argv)
    try:
        return commands[a.cmd](a)
    except (CliError, VirtioError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
