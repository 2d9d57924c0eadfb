"""``distillkac reproduce``: the paper-scale plan for one dataset, as a resumable sequence of commands.

Reference statistics, teacher training, the four distillation stages and FID-50k after each of them.
--dry-run prints every command with its preset, the images it processes and an estimate of GPU-hours,
and writes nothing. Without it the commands run one after another (single GPU, or torchrun with
--gpus N); a finished step is skipped, so rerunning the command resumes the plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distillkac.cli.options import add_command, add_no_progress, add_output, check_minimum
from distillkac.errors import DistillKacError
from distillkac.reproduce import (
    FID_NUM,
    PHASES,
    TARGETS,
    build_plan,
    check_inputs,
    default_results_dir,
    describe_plan,
    parse_images_per_second,
    resolve_throughput,
    run_plan,
)


def register(subparsers) -> None:
    parser = add_command(subparsers, "reproduce", run, "the paper-scale plan: ref, train, distil, FID-50k", __doc__)
    parser.add_argument("dataset", choices=list(TARGETS), help="which of the paper's datasets")
    parser.add_argument("--data", required=True, default=argparse.SUPPRESS,
                        help="dataset path (CIFAR-10 batches/zip/folder, or an image folder/zip)")
    add_output(parser, "--outdir", "directory of the whole plan (ref/, teacher/, distill/, eval/)", required=True)
    parser.add_argument("--inception-weights", default=None,
                        help="Inception weights file for FID (required unless $DISTILLKAC_INCEPTION_WEIGHTS is set)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs: more than 1 runs train/distill/eval under torchrun")
    parser.add_argument("--num", type=int, default=FID_NUM, help="images per FID")
    parser.add_argument("--images-per-second", action="append", default=[], metavar="PHASE=VALUE",
                        help=f"throughput for the estimate, PHASE one of {', '.join(PHASES)} (repeatable; default: "
                             f"benchmarks/results/*cuda*.json, else assumed H100 values, labelled as such)")
    parser.add_argument("--benchmarks", default=None,
                        help="directory of benchmark results (default: benchmarks/results of this source tree)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; run nothing")
    add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
    check_minimum(args, gpus=1)
    if args.num < 2:
        raise DistillKacError(f"--num: FID needs at least 2 images, got {args.num}")
    weights = check_inputs(args.data, args.inception_weights, for_real=not args.dry_run)
    overrides = parse_images_per_second(args.images_per_second)
    results_dir = Path(args.benchmarks) if args.benchmarks else default_results_dir()
    plan = build_plan(args.dataset, args.data, args.outdir, weights, args.num)
    if args.no_progress:
        for step in plan.steps:
            step.argv.append("--no-progress")
    throughput = resolve_throughput(args.dataset, overrides, results_dir)
    print(describe_plan(plan, throughput, args.gpus), end="", flush=True)
    if not args.dry_run:
        run_plan(plan, args.gpus, echo=lambda line: print(line, flush=True))
    return 0
