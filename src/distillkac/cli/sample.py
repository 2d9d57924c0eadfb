"""``distillkac sample``: generate images from a model into DIR: one PNG per image in DIR/images/
(000000.png, 000001.png, ...), all of them in DIR/samples.npz (uint8, with labels and seeds) and a preview
grid DIR/grid.png (2-D models: DIR/scatter.png and float points in the .npz). Image i uses seed S+i and the
i-th label of the cycle through the classes (or through --class). DIR/images/ and DIR/samples.npz are
what distillkac fid reads; a non-empty DIR is refused unless --overwrite is given."""

from __future__ import annotations

import argparse
import sys

from distillkac.checkpoint import Artifact, load_artifact
from distillkac.cli.options import add_command, add_no_progress, add_output, add_overwrite, check_minimum, comma_list
from distillkac.errors import DistillKacError
from distillkac.files import check_new_output_dir
from distillkac.runtime import PRECISIONS, resolve_device
from distillkac.sampling import cycle_labels, sample_artifact, save_result
from distillkac.solvers import GRID_KINDS, SOLVERS


def register(subparsers) -> None:
    parser = add_command(subparsers, "sample", run, "generate samples from a model artefact", __doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="model: an artefact directory, or a run or stage directory holding artifact/")
    add_output(parser, "--out", "output directory", required=True)
    add_overwrite(parser, "a non-empty --out directory")
    parser.add_argument("--steps", type=int, default=None,
                        help="solver steps (default: 100 for a teacher; a student's own step count)")
    parser.add_argument("--solver", choices=list(SOLVERS), default=None,
                        help="ODE solver (default: ab2 for a teacher; a student uses euler only)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="CFG weight w, u = (1+w) u(y) - w u(null) (default: 0 for a teacher; a student's "
                             "is baked in)")
    parser.add_argument("--grid", choices=list(GRID_KINDS), default=None,
                        help="time grid (default: uniform for a teacher; a student's own)")
    parser.add_argument("--num", type=int, default=64, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample (then S+1, ...)")
    parser.add_argument("--batch", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--class", dest="classes", type=comma_list(int, "class integers"), default=None,
                        help="class or comma-separated classes to cycle through (default: all classes)")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about sqrt(num))")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                        help="network precision: auto = bf16 autocast on CUDA, fp32 on the CPU; fp32; bf16 "
                             "(autocast, also on the CPU); recorded in samples.npz")
    add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
    check_minimum(args, num=1, seed=0, steps=1, batch=1)
    check_new_output_dir(args.out, "--out", overwrite=args.overwrite)
    device = resolve_device(args.device)
    model, meta = load_artifact(Artifact.locate(args.checkpoint), device=device)
    if args.classes and meta["num_classes"] == 0:
        raise DistillKacError("--class: this model is unconditional; it takes no class labels")
    labels = cycle_labels(args.num, meta["num_classes"], args.classes)
    result = sample_artifact((model, meta), seeds=range(args.seed, args.seed + args.num), labels=labels,
                             steps=args.steps, solver=args.solver, guidance=args.guidance, grid=args.grid,
                             batch_size=args.batch, device=device, precision=args.precision,
                             progress=not args.no_progress)
    files = save_result(result, args.out, nrow=args.nrow)
    print(f"{args.num} samples, {result.steps} steps ({result.solver}), guidance {result.guidance:g}, "
          f"NFE {result.nfe_per_sample} per sample, {result.precision} -> "
          f"{', '.join(str(path) for path in files.values())}", file=sys.stderr)
    return 0
