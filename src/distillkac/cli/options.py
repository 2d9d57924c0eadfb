"""What every command's options have in common: the help layout (with the presets' values as defaults),
the output and overwrite options, ``--no-progress``, checks of integer options, and the one mapping from
config fields to the flags that set them.

Naming: ``--outdir`` is a run directory (train, distill, demo, reproduce: checkpoints, stages, parts);
``--out`` holds results (sample's images, ref's statistics file, eval's table). Each command accepts the
other spelling as an alias.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from distillkac.errors import DistillKacError

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


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:,}" if isinstance(value, int) else f"{value:,g}" if isinstance(value, float) else str(value)


def preset_values(presets: Mapping[str, Any], field: str) -> str:
    """The presets' values of a dotted config field, presets with the same value together: ``800 digits;
    400,000 cifar10, celeba64; ...``, or just the value when every preset has it."""
    groups: dict[str, list[str]] = {}
    for name, config in presets.items():
        groups.setdefault(_show(functools.reduce(getattr, field.split("."), config)), []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{value} {', '.join(names)}" for value, names in groups.items())


def preset_help(presets: Mapping[str, Any], fields: Mapping[str, str]) -> type[HelpFormatter]:
    """A :class:`HelpFormatter` that gives an option of ``fields`` (destination -> dotted config field) the
    presets' values of its field as its default, unless its help already says its default."""

    class PresetHelpFormatter(HelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            if action.dest in fields and "default" not in (action.help or ""):
                return f"{action.help} (default: {preset_values(presets, fields[action.dest])})"
            return super()._get_help_string(action)

    return PresetHelpFormatter


def add_command(subparsers, name: str, run: Callable[[argparse.Namespace], int], help: str, description: str,
                formatter_class: type[HelpFormatter] = HelpFormatter) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``, which runs ``run``; ``description`` is its module docstring, shown
    without the double backticks of its reStructuredText markup."""
    parser = subparsers.add_parser(name, help=help, description=description.replace("``", ""),
                                   formatter_class=formatter_class)
    parser.set_defaults(func=run)
    return parser


def add_output(parser: argparse.ArgumentParser, name: str, help: str, **kwargs) -> None:
    """The output option ``name`` (``--out`` or ``--outdir``), with the other spelling as an alias."""
    alias = "--outdir" if name == "--out" else "--out"
    parser.add_argument(name, alias, dest=name.lstrip("-"), help=help, **kwargs)


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"write into {what} (default: refuse it, exit 2)")


def add_no_progress(parser: argparse.ArgumentParser, also: str = "") -> None:
    """``--no-progress``; ``also`` names what else it silences on stderr (a run's messages: log.txt keeps them)."""
    parser.add_argument("--no-progress", action="store_true", help=f"no progress bars{also}")


def comma_list(parse: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """An argparse type: a non-empty comma-separated list of ``what`` (e.g. "integers"), each read by ``parse``."""
    def parse_list(text: str) -> list:
        try:
            values = [parse(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from err
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got none")
        return values

    return parse_list


def check_minimum(args: argparse.Namespace, **minimums: int) -> None:
    """Refuse an integer option below its minimum (in the order given; an option left unset passes)."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest)
        if value is not None and value < minimum:
            rule = {0: "must be >= 0", 1: "must be a positive integer"}.get(minimum, f"must be at least {minimum}")
            raise DistillKacError(f"{option_flag(dest)}: {rule}, got {value}")


def runs_on_cpu(device: str) -> bool:
    """Whether a run given ``--device device`` (auto: CUDA when available) runs on the CPU."""
    device = str(device)
    return not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()))


def option_flag(dest: str) -> str:
    """The flag of an argparse destination: ``micro_batch`` -> ``--micro-batch``."""
    return "--" + dest.replace("_", "-")


def field_flags(overrides: Mapping[str, str]) -> dict[str, str]:
    """Config field -> flag, from a command's override table (option -> dotted ``"section.field"``; a bare
    field is a DistillConfig field and already named by its flag) plus the :data:`EXTRA_FIELD_FLAGS`. The
    one mapping that error messages are translated with."""
    return {**EXTRA_FIELD_FLAGS, **{field: option_flag(option) for option, field in overrides.items() if "." in field}}


def speak_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with every config field that an option sets replaced by that option's flag
    (``train.micro_batch: must divide train.batch`` -> ``--micro-batch: must divide --batch``)."""
    return _FIELD.sub(lambda match: flags.get(match.group(1), match.group(1)), message)
