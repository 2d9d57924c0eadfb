"""``distillkac distill``: endpoint distillation of a teacher through a plan of step counts.

Each stage (teacher steps -> student steps) is a resumable run in OUTDIR/stage-<M>step with its own
student artefact (OUTDIR/stage-<M>step/artifact), path-closeness curve (closeness.json / closeness.png)
and stats.jsonl. Rerunning the command skips finished stages and resumes an interrupted one.
Options left unset take the distillation preset's value (chosen from the teacher's dataset).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from distillkac.checkpoint import Artifact
from distillkac.distill import parse_plan
from distillkac.presets import DISTILL_PRESETS, PRECISIONS, START_STATES, DistillConfig, get_distill_preset, preset_key
from distillkac.stages import Distillation, resolve_data, resolve_teacher

#: option -> DistillConfig field (``optim.<name>`` / ``train.<name>``: a field of its optimiser or loop)
OVERRIDES = {"plan": "plan", "guidance": "guidance", "steps_per_stage": "steps_per_stage",
             "batch": "train.batch", "micro_batch": "train.micro_batch", "lr": "optim.lr",
             "ema_halflife": "train.ema_halflife_images", "seed": "train.seed", "start_states": "start_states",
             "device": "train.device", "precision": "train.precision", "closeness_samples": "closeness_samples",
             "warmup_images": "optim.warmup_images", "ckpt_every": "train.ckpt_every",
             "log_every": "train.log_every", "sample_every": "train.sample_every"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in OVERRIDES:
            return f"{action.help} (default: the distillation preset's value)"
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def _preset_values(option: str) -> str:
    def show(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" \
            if isinstance(value, float) else str(value)

    def value(cfg: DistillConfig):
        return functools.reduce(getattr, OVERRIDES[option].split("."), cfg)

    return "; ".join(f"{preset}={show(value(cfg))}" for preset, cfg in DISTILL_PRESETS.items())


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
    parser = subparsers.add_parser("distill", help="distil a teacher into few-step students",
                                   description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher run directory (uses RUN/artifact) or artefact")
    parser.add_argument("--outdir", required=True, help="output directory; one sub-directory per stage")
    parser.add_argument("--plan", type=_plan, default=None,
                        help=f"step counts, teacher first, each dividing the previous [{_preset_values('plan')}]")
    parser.add_argument("--stage", type=int, default=None,
                        help="run only stage N (1 = the first teacher -> student pair); its teacher must exist "
                             "(default: all stages)")
    parser.add_argument("--preset", choices=list(DISTILL_PRESETS), default=None,
                        help="distillation preset (default: from the teacher's dataset)")
    parser.add_argument("--data", default=None,
                        help="start-state data: a dataset path, or digits|toy2d (default: the teacher run's)")
    group = parser.add_argument_group("distillation")
    group.add_argument("--guidance", type=float, default=None,
                       help=f"CFG weight w baked into the students [{_preset_values('guidance')}]; "
                            f"a student teacher keeps its own")
    group.add_argument("--start-states", choices=list(START_STATES), default=None,
                       help=f"x_{{t_k}}: forward-noised data, or teacher roll-outs from the prior "
                            f"[{_preset_values('start_states')}]")
    group.add_argument("--steps-per-stage", type=_counts, default=None,
                       help=f"optimiser steps per stage: one count, or one per stage "
                            f"[{_preset_values('steps_per_stage')}]")
    group.add_argument("--batch", type=int, default=None, help="GLOBAL batch size (all processes together)")
    group.add_argument("--micro-batch", type=int, default=None, help="images per forward pass; divides --batch")
    group.add_argument("--lr", type=float, default=None, help=f"learning rate [{_preset_values('lr')}]")
    group.add_argument("--warmup-images", type=int, default=None, help="linear learning-rate warm-up, in images")
    group.add_argument("--ema-halflife", type=float, default=None, help="EMA half-life in images")
    group.add_argument("--seed", type=int, default=None, help="seed of the batches and noise")
    group.add_argument("--closeness-samples", type=int, default=None,
                       help="prior draws for the path-closeness curve")
    group = parser.add_argument_group("hardware and logging")
    group.add_argument("--device", default=None, help=f"auto, cpu, cuda or cuda:N [{_preset_values('device')}]")
    group.add_argument("--precision", choices=list(PRECISIONS), default=None,
                       help=f"auto = bf16 autocast on CUDA, fp32 on the CPU [{_preset_values('precision')}]")
    group.add_argument("--log-every", type=int, default=None, help="steps between stats.jsonl rows")
    group.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    group.add_argument("--sample-every", type=int, default=None, help="steps between preview grids")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each stage's resolved config and exit; create nothing")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> DistillConfig:
    """The distillation config from the preset and the command-line overrides."""
    source = resolve_teacher(args.teacher)
    name = args.preset or preset_key(resolve_data(source, args.data))
    changes = {field: getattr(args, option) for option, field in OVERRIDES.items()
               if getattr(args, option, None) is not None}
    own = Artifact(source.meta).baked_sampling()
    if args.guidance is None and own is not None:
        changes["guidance"] = own.guidance
    return get_distill_preset(name).with_changes(changes)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    distillation = Distillation(args.teacher, args.outdir, settings, data=args.data)
    if args.dry_run:
        print(json.dumps(distillation.configs(args.stage), indent=2))
        return 0
    outcomes = distillation.run(args.stage, progress=not args.no_progress)
    for outcome in outcomes:
        closeness = outcome.closeness or {}
        state = "skipped (finished)" if outcome.skipped else f"trained in {outcome.wall_seconds:.0f} s"
        print(f"stage {outcome.stage.index}: {outcome.stage.teacher_steps} -> {outcome.stage.student_steps} "
              f"steps, {state}; path closeness max {closeness.get('max', float('nan')):.4f}, "
              f"final {closeness.get('final', float('nan')):.4f}; artefact {outcome.stage_dir / Artifact.DIR}",
              file=sys.stderr)
    return 0
