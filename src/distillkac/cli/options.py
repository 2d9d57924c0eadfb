"""What every command's options have in common: the help layout, the output and overwrite options,
``--no-progress``, and the one mapping from config fields to the flags that set them.

Naming: ``--outdir`` is a run directory (train, distill, demo, reproduce: checkpoints, stages, parts);
``--out`` holds results (sample's images, ref's statistics file, eval's table). Each command accepts the
other spelling as an alias.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

#: Config fields set by options that no command's override table lists (folder data, the network width).
EXTRA_FIELD_FLAGS = {"data.path": "--data", "data.resolution": "--resolution", "data.channels": "--channels",
                     "data.labels": "--labels", "data.bad_files": "--bad-files", "data.hflip": "--hflip",
                     "net.model_channels": "--model-channels"}

_FIELD = re.compile(r"(?<![\w./-])((?:train|optim|path|data|net)\.[A-Za-z_]+)(?!\w|\.\w|\()")


class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option whose default is a value (not None, not a bare flag's False) and
    whose help does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or any(default is hidden for hidden in (None, False, argparse.SUPPRESS))
                or action.required or "default" in text):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})"


def plain(text: str) -> str:
    """A docstring as help text: without the double backticks of its reStructuredText markup."""
    return text.replace("``", "")


def add_output(parser: argparse.ArgumentParser, name: str, help: str, **kwargs) -> None:
    """The output option ``name`` (``--out`` or ``--outdir``), with the other spelling as an alias."""
    alias = "--outdir" if name == "--out" else "--out"
    parser.add_argument(name, alias, dest=name.lstrip("-"), help=help, **kwargs)


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"write into {what} (default: refuse it, exit 2)")


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def option_flag(dest: str) -> str:
    """The flag of an argparse destination: ``micro_batch`` -> ``--micro-batch``."""
    return "--" + dest.replace("_", "-")


def field_flags(overrides: Mapping[str, str | tuple[str, str]]) -> dict[str, str]:
    """Config field -> flag, from a command's override table (option -> ``(section, field)`` or a dotted
    ``"section.field"``; a bare field is a DistillConfig field and already named by its flag) plus the
    :data:`EXTRA_FIELD_FLAGS`. The one mapping that error messages are translated with."""
    flags = dict(EXTRA_FIELD_FLAGS)
    for option, field in overrides.items():
        dotted = ".".join(field) if isinstance(field, tuple) else field
        if "." in dotted:
            flags[dotted] = option_flag(option)
    return flags


def speak_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with every config field that an option sets replaced by that option's flag
    (``train.micro_batch: must divide train.batch`` -> ``--micro-batch: must divide --batch``)."""
    return _FIELD.sub(lambda match: flags.get(match.group(1), match.group(1)), message)
