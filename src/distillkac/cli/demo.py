"""``distillkac demo``: the whole pipeline on the bundled 8x8 digits, on a CPU, in one command.

Trains the Kac-flow teacher, distils it 100 -> 20 -> 4 -> 2 -> 1 steps, trains the flow-matching and
VP-diffusion baselines with the same network and budget, evaluates everything at 100, 20, 10, 4, 2 and
1 steps on disjoint seed blocks (mean and 95% interval per row, paired differences between rows), and
writes OUTDIR/report.md and OUTDIR/report.json. Rerunning reuses the finished parts;
--fresh starts over (deleting only the demo's own files in OUTDIR).
"""

from __future__ import annotations

import argparse
import sys

from distillkac.cli.options import add_command, add_output
from distillkac.demo import BUDGETS, run_demo
from distillkac.report import REPORT_MD


def register(subparsers) -> None:
    parser = add_command(subparsers, "demo", run, "the paper's table in miniature on digits, on a CPU", __doc__)
    add_output(parser, "--outdir", "demo directory (created; rerun to reuse finished parts; any other non-empty "
                                   "directory is refused)", required=True)
    parser.add_argument("--quick", action="store_true",
                        help="a short budget (about 1 minute on 2 cores): checks the pipeline, learns little")
    parser.add_argument("--budget", choices=list(BUDGETS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true",
                        help="delete the demo's earlier parts in --outdir first (nothing else is touched)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes running parts side by side (default: min(2, CPU cores))")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--blocks", type=int, default=None,
                        help="seed blocks per evaluated row (default: the budget's, 8 full, 3 quick); more blocks "
                             "narrow the intervals, and a rerun with a new count reuses the trained models")


def run(args: argparse.Namespace) -> int:
    budget = args.budget or ("quick" if args.quick else "full")
    result = run_demo(args.outdir, budget, fresh=args.fresh, jobs=args.jobs, threads=args.threads,
                      blocks=args.blocks)
    for claim in [*result.report["findings"], *result.report["targets"]]:
        print(f"{claim['verdict']}: {claim['claim']}")
    print(f"report: {result.outdir / REPORT_MD} ({result.wall_seconds:.0f} s)", file=sys.stderr)
    return 0
