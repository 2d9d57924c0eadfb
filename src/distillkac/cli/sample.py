"""``distillkac sample``: generate from a model artefact (or a run directory) into DIR/grid.png and
DIR/samples.npz (2-D models: DIR/scatter.png and float points). Image i uses seed S+i and the i-th
label of the cycle through the classes (or through --class)."""

from __future__ import annotations

import argparse
import sys

from distillkac.checkpoint import Artifact, load_artifact
from distillkac.errors import DistillKacError
from distillkac.files import check_output_dir
from distillkac.runtime import resolve_device
from distillkac.sampling import cycle_labels, sample_artifact, save_result
from distillkac.solvers import GRID_KINDS, SOLVERS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and action.option_strings and action.dest != "help":
            return f"{action.help} (default: from the artefact: see the help text)"
        return super()._get_help_string(action)


def _classes(text: str) -> list[int]:
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not classes:
        raise argparse.ArgumentTypeError("expected at least one class")
    return classes


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate samples from a model artefact",
                                   description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="artefact directory, or a run directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=None,
                        help="solver steps (teachers: 100; students: their own step count)")
    parser.add_argument("--solver", choices=list(SOLVERS), default=None,
                        help="teachers: ab2; students: euler (fixed)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="CFG weight w, u = (1+w) u(y) - w u(null) (teachers: 0; students: baked in)")
    parser.add_argument("--grid", choices=list(GRID_KINDS), default=None,
                        help="time grid (teachers: uniform; students: their own)")
    parser.add_argument("--num", type=int, default=64, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample (then S+1, ...)")
    parser.add_argument("--batch", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--class", dest="classes", type=_classes, default=None,
                        help="class or comma-separated classes to cycle through (default: all classes)")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (about sqrt(num))")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise DistillKacError(f"--num: must be a positive integer, got {args.num}")
    if args.seed < 0:
        raise DistillKacError(f"--seed: must be >= 0, got {args.seed}")
    if args.steps is not None and args.steps < 1:
        raise DistillKacError(f"--steps: must be a positive integer, got {args.steps}")
    if args.batch < 1:
        raise DistillKacError(f"--batch: must be a positive integer, got {args.batch}")
    check_output_dir(args.out, "--out")
    device = resolve_device(args.device)
    model, meta = load_artifact(Artifact.locate(args.checkpoint), device=device)
    if args.classes and meta["num_classes"] == 0:
        raise DistillKacError("--class: this model is unconditional; it takes no class labels")
    labels = cycle_labels(args.num, meta["num_classes"], args.classes)
    result = sample_artifact((model, meta), seeds=range(args.seed, args.seed + args.num), labels=labels,
                             steps=args.steps, solver=args.solver, guidance=args.guidance, grid=args.grid,
                             batch_size=args.batch, device=device, progress=True)
    files = save_result(result, args.out, nrow=args.nrow)
    print(f"{args.num} samples, {result.steps} steps ({result.solver}), guidance {result.guidance:g}, "
          f"NFE {result.nfe_per_sample} per sample -> {files['picture']}, {files['npz']}", file=sys.stderr)
    return 0
