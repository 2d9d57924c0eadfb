"""``distillkac eval``: the NFE table. One JSON row per model × steps × solver × guidance goes to
OUT/results.jsonl (rows already there are skipped, and a row cut short continues from its side file
OUT/.partial-*.npz, so rerunning resumes), then OUT/table.md and
OUT/metric_vs_nfe.png are drawn from all rows in the file. Each row is evaluated on --blocks disjoint
seed blocks of --num images: image i of block b uses seed S+b*num+i and label i mod num_classes, the same
for every row; the table gives the mean over the blocks with a 95% t-interval and the paired differences
of rows at equal NFE. Students are evaluated only at their own step count with Euler and their baked-in
guidance. Under torchrun the seeds are shared between the processes; the images are the same."""

from __future__ import annotations

import argparse
import sys

from distillkac.cli.options import add_command, add_no_progress, add_output, add_overwrite, comma_list
from distillkac.evaluate import DEFAULT_PRECISION, DEFAULT_SAVE_EVERY, evaluate
from distillkac.files import check_new_output_dir
from distillkac.metrics.context import METRICS
from distillkac.nfe_table import RESULTS_FILE, render_table, write_reports
from distillkac.runtime import PRECISIONS, init_distributed
from distillkac.solvers import SOLVERS


def register(subparsers) -> None:
    parser = add_command(subparsers, "eval", run, "metric vs NFE table for model artefacts", __doc__)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="model artefact or run directory (repeat for several models)")
    parser.add_argument("--steps", type=comma_list(int, "integers"), default="100",
                        help="comma-separated solver step counts, e.g. 100,20,4,2,1 (teachers and baselines)")
    parser.add_argument("--solver", type=comma_list(str, "solver names"), default="ab2",
                        help=f"comma-separated solvers from {', '.join(SOLVERS)}")
    parser.add_argument("--guidance", type=comma_list(float, "numbers"), default="0",
                        help="comma-separated CFG weights w (u = (1+w) u(y) - w u(null))")
    parser.add_argument("--metric", required=True, help=f"one of {', '.join(METRICS)}")
    parser.add_argument("--num", type=int, required=True,
                        help="samples per seed block of a row (FID protocol: 50000)")
    parser.add_argument("--blocks", type=int, default=1,
                        help="disjoint seed blocks per row (2 or more give 95%% intervals and paired "
                             "differences; 3 or more make them useful)")
    parser.add_argument("--ref", default=None, help="FID reference statistics .npz written by distillkac ref")
    parser.add_argument("--inception-weights", default=None,
                        help="Inception weights file, the one the reference was made with (default: "
                             "$DISTILLKAC_INCEPTION_WEIGHTS, else torch-fidelity's download)")
    parser.add_argument("--batch", type=int, default=256, help="samples per forward pass (per process)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of image 0 (image i of block b uses seed+b*num+i)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=DEFAULT_PRECISION,
                        help="network precision while sampling: fp32 (torch's TF32 settings apply on CUDA), bf16 "
                             "(autocast), auto (bf16 on CUDA, fp32 on the CPU); recorded in every row")
    add_output(parser, "--out", "output directory (results.jsonl, table.md, PNG); rerun the same command to "
                                "resume", required=True)
    add_overwrite(parser, "a non-empty --out that holds no results.jsonl")
    parser.add_argument("--save-every", type=int, default=DEFAULT_SAVE_EVERY,
                        help="batches between saves of the row being computed (a rerun continues from there)")
    add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
    check_new_output_dir(args.out, "--out", overwrite=args.overwrite,
                         resumes=lambda directory: (directory / RESULTS_FILE).is_file(), what="an eval output")
    group, device = init_distributed(args.device)
    rows = evaluate(args.checkpoint, args.steps, args.solver, args.guidance, args.metric, args.num,
                    ref=args.ref, inception_weights=args.inception_weights, batch_size=args.batch,
                    seed=args.seed, device=device, out=args.out, progress=not args.no_progress, group=group,
                    save_every=args.save_every, blocks=args.blocks, precision=args.precision)
    if group.is_main:
        all_rows = write_reports(args.out, skipped=[row for row in rows if "skipped" in row])
        print(render_table(all_rows), end="")
        new = sum(1 for row in rows if "skipped" not in row and not row.get("resumed"))
        resumed = sum(1 for row in rows if row.get("resumed"))
        total = sum(1 for row in all_rows if "skipped" not in row)
        print(f"{new} new row(s), {resumed} already in results.jsonl; {total} row(s) in {args.out}/table.md",
              file=sys.stderr)
    group.barrier()
    return 0
