"""``distillkac train``: train a Kac-flow teacher (or a Gaussian baseline) on a preset's dataset or on a
folder of your own images.

Without --preset, --data is a folder or .zip of images: their resolution, channels and classes (one per
sub-folder) are read from them, the network is sized from the resolution, and the other settings are
those of the preset whose recipe fits the resolution (digits up to 16 px, cifar10 below 64 px, celeba64
below 256 px, lsun-bedroom256 above). Options left unset take these values (listed per preset below);
in a short run a warm-up longer than a fifth of the run is shortened and a micro-batch that does not
divide --batch is lowered, each with a note. Every value is checked before anything is created.
Rerunning the same command resumes from RUN/training-state.pt; a larger --steps continues a finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import distillkac.train  # the module, not the function: train_teacher is looked up when the command runs
from distillkac.checkpoint import Artifact
from distillkac.cli.options import add_command, add_no_progress, add_output, add_overwrite, preset_help, runs_on_cpu
from distillkac.config import CHANNELS_LAST, RunConfig, fit_to_run
from distillkac.data import inspect_images
from distillkac.errors import DistillKacError
from distillkac.files import check_new_output_dir, read_json_object
from distillkac.nets import config_parameter_count
from distillkac.paths import F_SCHEDULES, G_SCHEDULES, PATH_KINDS
from distillkac.presets import PRESETS, get_preset, own_images_config, recipe_for_resolution
from distillkac.previews import CPU_PREVIEW
from distillkac.runlog import class_list
from distillkac.runtime import PRECISIONS

#: option -> "section.field" of the RunConfig it sets
OVERRIDES = {
    "steps": "train.steps", "batch": "train.batch", "micro_batch": "train.micro_batch", "seed": "train.seed",
    "ema_halflife": "train.ema_halflife_images", "label_dropout": "train.label_dropout",
    "precision": "train.precision", "channels_last": "train.channels_last", "compile": "train.compile",
    "device": "train.device", "ckpt_every": "train.ckpt_every", "preview_every": "train.sample_every",
    "preview_num": "train.preview_num", "preview_steps": "train.preview_steps", "log_every": "train.log_every",
    "skip_nonfinite": "train.skip_nonfinite", "lr": "optim.lr", "warmup_images": "optim.warmup_images",
    "grad_clip": "optim.grad_clip", "path": "path.kind", "kac_a": "path.kac_a", "kac_c": "path.kac_c",
    "T": "path.T", "schedule": "path.schedule", "g_schedule": "path.g_schedule",
    "data": "data.path", "hflip": "data.hflip", "download": "data.download",
}
#: the help shows the presets' values as the defaults (of all but the data options, which have none)
_FORMATTER = preset_help(PRESETS, {option: field for option, field in OVERRIDES.items()
                                   if option not in ("data", "download")})


def register(subparsers) -> None:
    parser = add_command(subparsers, "train", run, "train a Kac-flow teacher or a baseline", __doc__, _FORMATTER)
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="dataset preset; without one, --data is a folder or .zip of your own images and the "
                             "resolution, channels, classes and network are read from it")
    parser.add_argument("--config", default=None,
                        help="start from the settings another run recorded (RUN/config.json) instead of a preset; "
                             "the options given next to it override them")
    add_output(parser, "--outdir", "run directory (created; rerun the same command to resume)", required=True)
    add_overwrite(parser, "a non-empty --outdir that is not a train run")
    parser.add_argument("--data", default=None,
                        help="a folder or .zip of your own images; with a preset, its dataset (not needed for digits "
                             "and toy2d)")
    parser.add_argument("--download", action="store_true", default=None,
                        help="download CIFAR-10 into --data if it is not there")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=None, help="optimiser steps")
    group.add_argument("--batch", type=int, default=None, help="GLOBAL batch size (all processes together)")
    group.add_argument("--micro-batch", type=int, default=None,
                       help="images per forward pass; must divide --batch (lowered to fit a smaller --batch unless "
                            "set)")
    group.add_argument("--lr", type=float, default=None, help="peak learning rate")
    group.add_argument("--warmup-images", type=int, default=None,
                       help="linear learning-rate warm-up, in images (image runs: at most a fifth of the run's "
                            "images unless set)")
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
    group.add_argument("--resolution", type=int, default=None,
                       help="image folders: square size the images are centre-cropped and resized to (default: "
                            "the preset's, or your images' own size when they all share one)")
    group.add_argument("--channels", type=int, default=None, choices=[1, 3],
                       help="image folders: 1 (grayscale) or 3 (RGB) (default: the preset's, or 1 when all your "
                            "images are grayscale, else 3)")
    group.add_argument("--model-channels", type=int, default=None,
                       help="UNet base channels (default: the preset's network, or the one sized for your images' "
                            "resolution: 32 up to 16 px, 128 above)")
    group.add_argument("--labels", choices=("auto", "subfolders", "none"), default=None,
                       help="image folders: class labels from the sub-folders (auto: when every image is in one "
                            "of at least two), always from them, or none (an unconditional model); default: auto "
                            "without --preset")
    group.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips (your own images: off)")
    group = parser.add_argument_group("hardware and logging")
    group.add_argument("--precision", choices=list(PRECISIONS), default=None,
                       help="auto = bf16 autocast on CUDA, fp32 on the CPU")
    group.add_argument("--channels-last", choices=list(CHANNELS_LAST), default=None,
                       help="channels-last memory format (auto = on CUDA)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    group.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    group.add_argument("--log-every", type=int, default=None, help="steps between stats.jsonl rows")
    group.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    group = parser.add_argument_group("previews (samples/step-*.png, each drawn after that step's checkpoint; 0 "
                                      "turns them off)")
    group.add_argument("--preview-every", "--sample-every", dest="preview_every", type=int, default=None,
                       help="steps between preview grids, and one at the end")
    group.add_argument("--preview-num", type=int, default=None,
                       help=f"images per preview; at most {CPU_PREVIEW[0]} on a CPU unless set")
    group.add_argument("--preview-steps", type=int, default=None,
                       help=f"solver steps per preview image; at most {CPU_PREVIEW[1]} on a CPU unless set")
    add_no_progress(parser, ", and the run's summary and status lines only in log.txt")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the parameter count; create nothing")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset (or, without one, the config read from the --data images) with the command-line overrides
    applied and fitted to the run's length, validated."""
    return resolve_args(args)[0]


def resolve_args(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """:func:`config_from_args`, and one line for each thing read from the images or adjusted to the run."""
    config, notes = _base_config(args)
    for option, field in OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            section, name = field.split(".")
            setattr(getattr(config, section), name, value)
    given = [flag for flag, value in (("--resolution", args.resolution), ("--channels", args.channels),
                                      ("--model-channels", args.model_channels)) if value is not None]
    if given and config.net.kind != "unet":
        source = f"the {args.preset} preset" if args.preset is not None else f"the run of {args.config}"
        raise DistillKacError(f"{given[0]}: {source} has no image network")
    net_changes = {}
    if args.resolution is not None:
        config.data.resolution = args.resolution
        net_changes["resolution"] = args.resolution
    if args.channels is not None:
        config.data.channels = args.channels
        net_changes["image_channels"] = args.channels
    if args.model_channels is not None:
        net_changes["model_channels"] = args.model_channels
        if args.model_channels > 0:
            net_changes["groups"] = math.gcd(config.net.groups, args.model_channels)
    if net_changes:
        config.net = dataclasses.replace(config.net, **net_changes)
    # Image runs only: a toy2d run keeps its preset's warm-up, so that extending it with a larger --steps
    # stays bit for bit a longer run (the reliability tests check it; a fitted warm-up follows --steps).
    config.optim, config.train, fitted = fit_to_run(
        config.optim, config.train, config.train.steps * config.train.batch,
        fit_micro_batch=args.micro_batch is None,
        fit_warmup=args.warmup_images is None and config.net.kind == "unet")
    notes += fitted + _cpu_previews(config, args)
    return config.validate(), notes


def _base_config(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """The preset, another run's config, or the config of the --data images with a line on what was read
    from them."""
    if args.config is not None:
        if args.preset is not None:
            raise DistillKacError("--config: give --config or --preset, not both")
        return run_config_file(args.config), [f"settings from {args.config}"]
    if args.preset is not None:
        config = get_preset(args.preset)
        if args.labels is not None:
            if config.data.name != "folder":
                raise DistillKacError(f"--labels: the {args.preset} preset does not read an image folder")
            config.data.labels = args.labels
        return config, []
    if args.data is None:
        raise DistillKacError("--data: give a folder or .zip of images (one sub-folder per class for a "
                              "class-conditional model), or a --preset")
    labels = args.labels or "auto"
    info = inspect_images(args.data, labels)
    config = own_images_config(info, labels, args.resolution, args.channels)
    sizes = (f"all {next(iter(info.sizes))[0]}x{next(iter(info.sizes))[1]}" if len(info.sizes) == 1
             else f"{len(info.sizes)} sizes")
    classes = (f"{len(info.class_names)} classes ({class_list(info.class_names)})" if info.class_names
               else "no classes (unconditional)")
    unreadable = f"; {info.unreadable} unreadable file(s) left out" if info.unreadable else ""
    return config, [f"read from {info.count:,} images in {info.path} ({sizes}{unreadable}): resolution "
                    f"{config.data.resolution}, {config.data.channels} channel(s), {classes}; the "
                    f"{recipe_for_resolution(config.data.resolution)} preset's recipe"]


def run_config_file(path: str) -> RunConfig:
    """The run config a train run recorded in its config.json (its "environment" record is left out)."""
    values = read_json_object(path)
    if values is None or not {"data", "net"} <= set(values):
        raise DistillKacError(f"--config: {path} is not the config.json of a train run (RUN/config.json)")
    if values.get("distill") is not None:
        raise DistillKacError(f"--config: {path} is a distillation stage's config; use it with distillkac distill")
    return RunConfig.from_dict(values)


def _cpu_previews(config: RunConfig, args: argparse.Namespace) -> list[str]:
    """Cap the previews of an image model that trains on a CPU at :data:`CPU_PREVIEW` unless they were set."""
    train = config.train
    if not runs_on_cpu(train.device) or config.net.kind != "unet":
        return []
    num = train.preview_num if args.preview_num is not None else min(train.preview_num, CPU_PREVIEW[0])
    steps = train.preview_steps if args.preview_steps is not None else min(train.preview_steps, CPU_PREVIEW[1])
    if (num, steps) == (train.preview_num, train.preview_steps):
        return []
    config.train = dataclasses.replace(train, preview_num=num, preview_steps=steps)
    return [f"previews on the CPU: {num} images of {steps} steps (set --preview-num and --preview-steps to "
            f"choose)"]


def is_train_run(directory: Path) -> bool:
    """Whether ``directory`` holds an earlier train run (which rerunning resumes): its config.json is a
    run config that is not a distillation stage's."""
    config = read_json_object(directory / Artifact.RUN_CONFIG)
    return config is not None and "net" in config and "train" in config and config.get("distill") is None


def run(args: argparse.Namespace) -> int:
    config, notes = resolve_args(args)
    if args.dry_run:  # a run shows the notes with its summary (and keeps them in log.txt)
        for note in notes:
            print(note, file=sys.stderr)
        print(json.dumps(config.to_dict(), indent=2))
        print(f"parameters: {config_parameter_count(config.net):,}")
        return 0
    outdir = check_new_output_dir(args.outdir, "--outdir", overwrite=args.overwrite, resumes=is_train_run,
                                  what="a train run")
    result = distillkac.train.train_teacher(config, outdir, progress=not args.no_progress, notes=tuple(notes))
    print(f"trained {result.step} steps (resumed from {result.resumed_from}); "
          f"artefact: {result.artifact_dir}", file=sys.stderr)
    return 0
