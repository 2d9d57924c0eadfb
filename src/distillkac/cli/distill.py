"""``distillkac distill``: endpoint distillation of a teacher through a plan of step counts.

Each stage (teacher steps -> student steps) is a resumable run in OUTDIR/stage-<M>step with its own
student artefact (OUTDIR/stage-<M>step/artifact), path-closeness curve (closeness.json / closeness.png)
and stats.jsonl. Rerunning the command skips finished stages and resumes an interrupted one.
Options left unset take the distillation preset's value (chosen from the teacher's dataset), or with
--config those another distillation recorded in its OUTDIR/config.json (written once its stages start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from distillkac.checkpoint import Artifact
from distillkac.cli.options import add_command, add_no_progress, add_output, add_overwrite, preset_help, runs_on_cpu
from distillkac.config import (
    LOSS_FORMS,
    STAGE1_TARGETS,
    START_STATES,
    DistillConfig,
    OptimConfig,
    TrainConfig,
    fit_to_run,
)
from distillkac.distill import parse_plan
from distillkac.errors import DistillKacError
from distillkac.fields import dataclass_from_dict
from distillkac.files import atomic_write_json, check_new_output_dir, read_json_object
from distillkac.presets import DISTILL_PRESETS, distill_preset_for, get_distill_preset
from distillkac.previews import CPU_PREVIEW
from distillkac.runtime import PRECISIONS
from distillkac.stages import SUMMARY_FILE, Distillation, resolve_data, resolve_teacher

#: option -> DistillConfig field (``optim.<name>`` / ``train.<name>``: a field of its optimiser or loop)
OVERRIDES = {"plan": "plan", "guidance": "guidance", "steps_per_stage": "steps_per_stage", "batch": "train.batch",
             "micro_batch": "train.micro_batch", "lr": "optim.lr", "ema_halflife": "train.ema_halflife_images",
             "seed": "train.seed", "start_states": "start_states", "target": "target",
             "student_dropout": "student_dropout", "loss": "loss", "pool_refresh": "pool_refresh",
             "pool_reuse": "pool_reuse", "device": "train.device", "precision": "train.precision",
             "teacher_precision": "teacher_precision", "closeness_samples": "closeness_samples",
             "warmup_images": "optim.warmup_images", "ckpt_every": "train.ckpt_every", "log_every": "train.log_every",
             "preview_every": "train.sample_every", "preview_num": "train.preview_num"}


def _plan(text: str) -> tuple[int, ...]:
    try:
        return parse_plan(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--plan: ")) from err


def _counts(text: str) -> int | tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from err
    return counts[0] if len(counts) == 1 else counts


def register(subparsers) -> None:
    parser = add_command(subparsers, "distill", run, "distil a teacher into few-step students", __doc__,
                         preset_help(DISTILL_PRESETS, OVERRIDES))
    parser.add_argument("--teacher", required=True, help="teacher run directory (uses RUN/artifact) or artefact")
    add_output(parser, "--outdir", "output directory, one sub-directory per stage (rerun the same command to "
                                   "resume)", required=True)
    add_overwrite(parser, "a non-empty --outdir that is not a distillation")
    parser.add_argument("--plan", type=_plan, default=None,
                        help="step counts, teacher first, each dividing the previous")
    parser.add_argument("--stage", type=int, default=None,
                        help="run only stage N (1 = the first teacher -> student pair); its teacher must exist "
                             "(default: all stages)")
    parser.add_argument("--config", default=None,
                        help="start from the settings another distillation recorded (RUN2/config.json) instead of "
                             "a preset; the options given next to it override them")
    parser.add_argument("--preset", choices=list(DISTILL_PRESETS), default=None,
                        help="distillation preset (default: the one for the teacher's dataset, or for its "
                             "resolution when it was trained on your own images)")
    parser.add_argument("--data", default=None,
                        help="start-state data: a dataset path, or digits|toy2d (default: the teacher run's)")
    group = parser.add_argument_group("distillation")
    group.add_argument("--guidance", type=float, default=None,
                       help="CFG weight w baked into the students; a student teacher keeps its own")
    group.add_argument("--start-states", choices=list(START_STATES), default=None,
                       help="x_{t_k}: forward-noised data, teacher roll-out states from the trajectory pool, "
                            "or a 50/50 mix")
    group.add_argument("--target", choices=list(STAGE1_TARGETS), default=None,
                       help="stage-1 teacher endpoint: AB-2 restarted per segment, AB-2 carried along the pooled "
                            "roll-outs (needs roll-out start states), or Euler")
    group.add_argument("--student-dropout", type=float, default=None,
                       help="the students' dropout rate (default: the teacher's)")
    group.add_argument("--loss", choices=list(LOSS_FORMS), default=None,
                       help="endpoint MSE, or the same divided by the student step squared (a velocity error)")
    group.add_argument("--pool-refresh", type=int, default=None,
                       help="optimiser steps between trajectory-pool rebuilds")
    group.add_argument("--pool-reuse", type=float, default=None,
                       help="average uses of each pooled pair; sets the pool's size")
    group.add_argument("--steps-per-stage", type=_counts, default=None,
                       help="optimiser steps per stage: one count, or one per stage")
    group.add_argument("--batch", type=int, default=None, help="GLOBAL batch size (all processes together)")
    group.add_argument("--micro-batch", type=int, default=None, help="images per forward pass; divides --batch")
    group.add_argument("--lr", type=float, default=None, help="learning rate")
    group.add_argument("--warmup-images", type=int, default=None, help="linear learning-rate warm-up, in images")
    group.add_argument("--ema-halflife", type=float, default=None, help="EMA half-life in images")
    group.add_argument("--seed", type=int, default=None, help="seed of the batches and noise")
    group.add_argument("--closeness-samples", type=int, default=None, help="prior draws for the path-closeness curve")
    group = parser.add_argument_group("hardware and logging")
    group.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    group.add_argument("--precision", choices=list(PRECISIONS), default=None,
                       help="auto = bf16 autocast on CUDA, fp32 on the CPU")
    group.add_argument("--teacher-precision", choices=list(PRECISIONS), default=None,
                       help="precision of the teacher's network while it makes the targets and roll-outs (e.g. "
                            "fp32 targets for a bf16 student) (default: as --precision)")
    group.add_argument("--log-every", type=int, default=None, help="steps between stats.jsonl rows")
    group.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    group.add_argument("--preview-every", "--sample-every", dest="preview_every", type=int, default=None,
                       help="steps between preview grids of a stage's student, and one at its end (0 = none)")
    group.add_argument("--preview-num", type=int, default=None,
                       help=f"images per preview (0 = none); at most {CPU_PREVIEW[0]} on a CPU unless set")
    add_no_progress(parser, ", no adjustment notes, and each stage's summary and status lines only in its log.txt")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each stage's resolved config and exit; create nothing")


def resolve_settings(args: argparse.Namespace) -> tuple[DistillConfig, list[str]]:
    """The distillation config from the preset (by default the one for the teacher's data and class count)
    and the command-line overrides, fitted to the stages' length; and one line for each value adjusted."""
    source = resolve_teacher(args.teacher)
    num_classes = int(source.meta["num_classes"])
    if args.config is not None and args.preset is not None:
        raise DistillKacError("--config: give --config or --preset, not both")
    if args.config is not None:
        preset = settings_file(args.config)
    elif args.preset is not None:
        preset = get_distill_preset(args.preset)
    else:
        preset = distill_preset_for(resolve_data(source, args.data), num_classes)
    changes = {field: getattr(args, option) for option, field in OVERRIDES.items()
               if getattr(args, option, None) is not None}
    own = Artifact(source.meta).baked_sampling()
    if args.guidance is None and own is not None:
        changes["guidance"] = own.guidance
    settings = preset.with_changes(changes)
    counts = settings.steps_per_stage if isinstance(settings.steps_per_stage, tuple) else (settings.steps_per_stage,)
    if not all(isinstance(n, int) for n in counts):
        return settings, []
    optim, train, notes = fit_to_run(settings.optim, settings.train, min(counts) * settings.train.batch,
                                     fit_micro_batch=args.micro_batch is None,
                                     fit_warmup=args.warmup_images is None)
    if (runs_on_cpu(train.device) and args.preview_num is None and source.meta["net"].get("kind") == "unet"
            and train.preview_num > CPU_PREVIEW[0]):
        notes.append(f"previews on the CPU: {CPU_PREVIEW[0]} images (set --preview-num to choose)")
        train = dataclasses.replace(train, preview_num=CPU_PREVIEW[0])
    return dataclasses.replace(settings, optim=optim, train=train), notes


CONFIG_FORMAT = "distillkac-distillation"


def settings_record(settings: DistillConfig, args: argparse.Namespace) -> dict:
    """What OUTDIR/config.json records: the distillation's settings, its teacher and data."""
    return {"format": CONFIG_FORMAT, "version": 1, "teacher": str(args.teacher), "data": args.data,
            "settings": dataclasses.asdict(settings)}


def settings_file(path: str) -> DistillConfig:
    """The settings a distillation recorded in its config.json (:func:`settings_record`)."""
    values = read_json_object(path)
    if values is None or values.get("format") != CONFIG_FORMAT or not isinstance(values.get("settings"), dict):
        raise DistillKacError(f"--config: {path} is not the config.json of a distillation (OUTDIR/config.json)")
    fields = dict(values["settings"])
    optim = dataclass_from_dict(OptimConfig, fields.pop("optim", {}), "--config optim")
    train = dataclass_from_dict(TrainConfig, fields.pop("train", {}), "--config train")
    return dataclasses.replace(dataclass_from_dict(DistillConfig, fields, "--config"), optim=optim, train=train)


def is_distillation(directory: Path) -> bool:
    """Whether ``directory`` holds an earlier distillation (which rerunning resumes): its summary, or a
    stage-<M>step directory."""
    return (directory / SUMMARY_FILE).is_file() or any(
        entry.is_dir() and re.fullmatch(r"stage-\d+step", entry.name) for entry in directory.glob("stage-*step"))


def run(args: argparse.Namespace) -> int:
    settings, notes = resolve_settings(args)
    if not args.dry_run:
        check_new_output_dir(args.outdir, "--outdir", overwrite=args.overwrite, resumes=is_distillation,
                             what="a distillation")
    for note in notes if not args.no_progress else ():
        print(note, file=sys.stderr)
    distillation = Distillation(args.teacher, args.outdir, settings, data=args.data)
    if args.dry_run:
        print(json.dumps(distillation.configs(args.stage), indent=2))
        return 0
    try:
        outcomes = distillation.run(args.stage, progress=not args.no_progress)
    finally:  # once a stage has started (not after a refused input): the settings, for --config
        if is_distillation(Path(args.outdir)):
            atomic_write_json(Path(args.outdir) / Artifact.RUN_CONFIG, settings_record(settings, args))
    for outcome in outcomes:
        closeness = outcome.closeness or {}
        state = "skipped (finished)" if outcome.skipped else f"trained in {outcome.wall_seconds:.0f} s"
        print(f"stage {outcome.stage.index}: {outcome.stage.teacher_steps} -> {outcome.stage.student_steps} "
              f"steps, {state}; path closeness max {closeness.get('max', float('nan')):.4f}, "
              f"final {closeness.get('final', float('nan')):.4f}; artefact {outcome.stage_dir / Artifact.DIR}",
              file=sys.stderr)
    return 0
