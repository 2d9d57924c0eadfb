"""``distillkac train``: train a Kac-flow teacher (or a Gaussian baseline) from a preset.

Options left unset take the preset's value; every value is checked (``RunConfig.validate``) before
anything is created. Rerunning the same command resumes from ``RUN/training-state.pt``; a larger
``--steps`` continues a finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import distillkac.train  # the module, not the function: train_teacher is looked up when the command runs
from distillkac.errors import DistillKacError
from distillkac.files import check_output_dir
from distillkac.nets import config_parameter_count
from distillkac.paths import F_SCHEDULES, G_SCHEDULES, PATH_KINDS
from distillkac.presets import CHANNELS_LAST, PRECISIONS, PRESETS, RunConfig, get_preset

#: option -> (section, field) of the RunConfig it sets
OVERRIDES = {
    "steps": ("train", "steps"), "batch": ("train", "batch"), "micro_batch": ("train", "micro_batch"),
    "seed": ("train", "seed"), "ema_halflife": ("train", "ema_halflife_images"),
    "label_dropout": ("train", "label_dropout"), "precision": ("train", "precision"),
    "channels_last": ("train", "channels_last"), "compile": ("train", "compile"),
    "device": ("train", "device"),
    "ckpt_every": ("train", "ckpt_every"), "sample_every": ("train", "sample_every"),
    "log_every": ("train", "log_every"), "skip_nonfinite": ("train", "skip_nonfinite"),
    "lr": ("optim", "lr"), "warmup_images": ("optim", "warmup_images"), "grad_clip": ("optim", "grad_clip"),
    "path": ("path", "kind"), "kac_a": ("path", "kac_a"), "kac_c": ("path", "kac_c"), "T": ("path", "T"),
    "schedule": ("path", "schedule"), "g_schedule": ("path", "g_schedule"),
    "data": ("data", "path"), "hflip": ("data", "hflip"), "download": ("data", "download"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: the preset's value)`` for options whose default comes from ``--preset``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and action.option_strings and action.dest != "help":
            return f"{action.help} (default: the preset's value)"
        return super()._get_help_string(action)


def _preset_values(section: str, name: str) -> str:
    return "; ".join(f"{preset}={getattr(getattr(cfg, section), name)}" for preset, cfg in PRESETS.items())


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a Kac-flow teacher or a baseline",
                                   description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--preset", required=True, choices=list(PRESETS), help="dataset preset")
    parser.add_argument("--outdir", required=True, help="run directory (created; rerun to resume)")
    parser.add_argument("--data", default=None, help="dataset path (not needed for digits and toy2d)")
    parser.add_argument("--download", action="store_true", default=None,
                        help="download CIFAR-10 into --data if it is not there")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=None,
                       help=f"optimiser steps [{_preset_values('train', 'steps')}]")
    group.add_argument("--batch", type=int, default=None, help="GLOBAL batch size (all processes together)")
    group.add_argument("--micro-batch", type=int, default=None,
                       help="images per forward pass; must divide --batch")
    group.add_argument("--lr", type=float, default=None,
                       help=f"peak learning rate [{_preset_values('optim', 'lr')}]")
    group.add_argument("--warmup-images", type=int, default=None,
                       help="linear learning-rate warm-up, in images")
    group.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip (0 = off)")
    group.add_argument("--seed", type=int, default=None, help="seed of the weights, batches and noise")
    group.add_argument("--ema-halflife", type=float, default=None, help="EMA half-life in images")
    group.add_argument("--label-dropout", type=float, default=None, help="probability of the null label")
    group.add_argument("--skip-nonfinite", type=int, default=None,
                       help="non-finite steps to skip before stopping")
    group = parser.add_argument_group("path")
    group.add_argument("--path", choices=list(PATH_KINDS), default=None, help="kac, or a Gaussian baseline")
    group.add_argument("--kac-a", type=float, default=None, help="Kac flip rate a")
    group.add_argument("--kac-c", type=float, default=None, help="Kac speed c")
    group.add_argument("--T", type=float, default=None, help="time horizon")
    group.add_argument("--schedule", choices=sorted(F_SCHEDULES), default=None, help="data schedule f(t)")
    group.add_argument("--g-schedule", choices=sorted(G_SCHEDULES), default=None, help="Kac clock g(t)")
    group = parser.add_argument_group("data and network")
    group.add_argument("--resolution", type=int, default=None, help="image resolution (folder datasets)")
    group.add_argument("--channels", type=int, default=None, choices=[1, 3], help="image channels")
    group.add_argument("--model-channels", type=int, default=None, help="UNet base channels")
    group.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips")
    group = parser.add_argument_group("hardware and logging")
    group.add_argument("--precision", choices=list(PRECISIONS), default=None,
                       help="auto = bf16 autocast on CUDA, fp32 on the CPU")
    group.add_argument("--channels-last", choices=list(CHANNELS_LAST), default=None,
                       help="channels-last memory format (auto = on CUDA)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    group.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    group.add_argument("--log-every", type=int, default=None, help="steps between stats.jsonl rows")
    group.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    group.add_argument("--sample-every", type=int, default=None, help="steps between preview grids")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the parameter count; create nothing")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset with the command-line overrides applied, validated."""
    config = get_preset(args.preset)
    for option, (section, name) in OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            setattr(getattr(config, section), name, value)
    net_changes = {}
    if args.resolution is not None:
        config.data.resolution = args.resolution
        net_changes["resolution"] = args.resolution
    if args.channels is not None:
        config.data.channels = args.channels
        net_changes["image_channels"] = args.channels
    if args.model_channels is not None:
        net_changes["model_channels"] = args.model_channels
    if net_changes:
        if config.net.kind != "unet":
            raise DistillKacError(f"--{next(iter(net_changes)).replace('_', '-')}: the {args.preset} preset "
                                  f"has no image network")
        config.net = dataclasses.replace(config.net, **net_changes)
    return config.validate()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        print(f"parameters: {config_parameter_count(config.net):,}")
        return 0
    outdir = check_output_dir(args.outdir, "--outdir")
    result = distillkac.train.train_teacher(config, outdir, progress=not args.no_progress)
    print(f"trained {result.step} steps (resumed from {result.resumed_from}); "
          f"artefact: {result.artifact_dir}", file=sys.stderr)
    return 0
