"""``distillkac ref``: FID reference statistics (Inception pool3 mean and covariance) of a dataset split.

The exact feature moments so far are saved every ``--save-every`` batches to ``OUT.partial.npz``; rerunning the
same command after an interruption continues from there (the result is the same, bit for bit), and the
file is deleted once OUT is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillkac.cli.fid import add_inception_arguments
from distillkac.data import DataConfig, load_dataset
from distillkac.errors import DistillKacError
from distillkac.files import check_output_dir
from distillkac.metrics import fid

FID_DATASETS = ("cifar10", "folder")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ref", help="compute FID reference statistics of a dataset split (an .npz for `distillkac fid`)",
        description="Inception pool3 statistics of every image of a split (or a seeded subset with --limit), "
                    "at the images' own resolution, written to an .npz with their metadata.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", required=True, default=argparse.SUPPRESS, choices=FID_DATASETS,
                        help="which dataset loader to use")
    parser.add_argument("--data", required=True, default=argparse.SUPPRESS,
                        help="dataset path (CIFAR-10 batches/zip/folder, or an image folder/zip)")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="dataset split")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output .npz file")
    parser.add_argument("--resolution", type=int, default=None,
                        help="folder dataset: square size images are centre-cropped and resized to")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="folder dataset: 1 (grayscale) or 3 (RGB; the default when unset)")
    parser.add_argument("--bad-files", default="skip", choices=("skip", "error"),
                        help="what to do with unreadable image files")
    add_inception_arguments(parser)
    parser.add_argument("--limit", type=int, default=None,
                        help="use a random subset of this many images (chosen with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    parser.add_argument("--save-every", type=int, default=20,
                        help="batches between saves of the partial sums to OUT.partial.npz (resume)")
    parser.set_defaults(func=run)


def progress_path(out: str) -> Path:
    """The side file holding the moments so far of an unfinished ``ref`` into ``out``."""
    return Path(f"{out}.partial.npz")


def run(args: argparse.Namespace) -> int:
    if args.dataset != "folder" and (args.resolution is not None or args.channels is not None):
        raise DistillKacError(f"--resolution/--channels: only for --dataset folder; {args.dataset} images "
                              f"are used at their own size")
    for option, value in (("--batch", args.batch), ("--save-every", args.save_every)):
        if value < 1:
            raise DistillKacError(f"{option}: must be a positive integer, got {value}")
    if args.limit is not None and args.limit < 2:
        raise DistillKacError(f"--limit: must be at least 2, got {args.limit}")
    out = Path(args.out)
    if out.is_dir():
        raise DistillKacError(f"--out: {out} is a directory; give the .npz file to write")
    check_output_dir(out.parent, "--out")
    config = DataConfig(name=args.dataset, path=args.data, resolution=args.resolution, channels=args.channels,
                        bad_files=args.bad_files, labels="none" if args.dataset == "folder" else "auto")
    dataset = load_dataset(config, args.split)
    extractor = fid.InceptionFeatures(args.inception_weights, args.device, args.batch)
    partial = progress_path(args.out)
    reference = fid.compute_reference(dataset, args.split, extractor, limit=args.limit, seed=args.seed,
                                      progress=not args.no_progress, progress_file=partial,
                                      save_every=args.save_every)
    meta = fid.save_reference(args.out, reference.stats, reference.meta)
    partial.unlink(missing_ok=True)
    print(json.dumps({"out": args.out, "count": meta["count"], "split": meta["split"],
                      "resolution": meta["resolution"], "channels": meta["channels"],
                      "weights_sha256": meta["weights_sha256"], "stats_sha256": meta["stats_sha256"]}))
    return 0
