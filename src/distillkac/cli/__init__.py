"""The ``distillkac`` command line: a thin layer over the library.

Each sub-command lives in its own module with ``register(subparsers)`` (adds its parser and sets
``func``); ``options`` holds what they share. What the user can fix becomes ONE line on stderr,
``distillkac: error: ...``, never a traceback; a config field in it is named by the flag that sets it
(``--micro-batch``, not ``train.micro_batch``: ``options.speak_flags``). Warnings are one line too,
``distillkac: warning: ...``. Exit codes:

* exit 2: usage errors: bad options or input files (``DistillKacError``), and operating-system errors
  about the paths given (missing, not a directory, is a directory, no permission, read-only, exists);
* exit 1: the environment failed the run: any other OS error (disk full, quota, I/O error, too many
  open files...); the last complete checkpoint is kept and rerunning the command resumes;
* exit 130: interrupted (Ctrl-C), with what was kept (e.g. the last checkpoint, or that nothing was
  saved yet);
* exit 143: stopped by SIGTERM or SIGUSR1 after saving (train, distill, eval: :mod:`distillkac.preemption`);
  rerunning the command resumes.

Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

from distillkac import __version__
from distillkac.cli.options import field_flags, speak_flags
from distillkac.errors import DistillKacError
from distillkac.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from distillkac.preemption import Preempted

COMMANDS = ("train", "distill", "sample", "ref", "fid", "eval", "demo", "reproduce")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other usage error here
        self.exit(2, f"distillkac: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distillkac", description="Kac-flow teachers and their few-step students.")
    parser.add_argument("--version", action="version", version=f"distillkac {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"distillkac.cli.{name}").register(sub)
    return parser


#: OS errors caused by the paths the user gave (exit 2); other OS errors exit 1.
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                         errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})


def _first_line(text: str, fallback: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else fallback


def describe_os_error(err: OSError) -> str:
    """``strerror: filename`` (``-> filename2`` for renames), else the error's own text, on one line."""
    if err.strerror and err.filename is not None:
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        return f"{err.strerror}: {err.filename}{target}"
    return _first_line(str(err), type(err).__name__)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, without the source line Python prints by default."""
    print(f"distillkac: warning: {_first_line(str(message), category.__name__)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (already printed as one line) and --help: a return code
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except DistillKacError as err:
        flags = field_flags(getattr(sys.modules[args.func.__module__], "OVERRIDES", {}))
        message = speak_flags(_first_line(str(err), type(err).__name__), flags)
        print(f"distillkac: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno is None:
            raise
        if err.errno in PATH_ERRNOS:
            print(f"distillkac: error: {describe_os_error(err)}", file=sys.stderr)
            return 2
        print(f"distillkac: error: {describe_os_error(err)}; the last complete checkpoint is kept, rerun "
              f"the same command to resume", file=sys.stderr)
        return 1
    except Preempted as err:
        print(f"distillkac: {_first_line(str(err), 'stopped')}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt as err:  # a run's Interrupted says what it kept; elsewhere nothing is claimed
        detail = f" {_first_line(str(err), '')}" if str(err) else ""
        print(f"distillkac: interrupted{detail}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
