"""The ``distillkac`` command line: a thin layer over the library.

Each sub-command lives in its own module with ``register(subparsers)`` (adds its parser and sets
``func``). Errors that come from the user's input (``DistillKacError`` / ``ValueError`` /
``FileNotFoundError``...) become one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distillkac.errors import DistillKacError

COMMANDS = ("train", "distill", "sample", "ref", "fid", "eval", "demo", "reproduce")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other usage error here
        self.exit(2, f"distillkac: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distillkac", description="Kac-flow teachers and their few-step students.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"distillkac.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"distillkac.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DistillKacError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"distillkac: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillkac: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
