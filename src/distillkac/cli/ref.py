"""``distillkac ref``: FID reference statistics (Inception pool3 mean and covariance) of a set of images.

Every image of the split (or a seeded subset with --limit) goes through the Inception network at its own
resolution; the statistics and their metadata are written to an .npz for distillkac fid and eval. The
exact moments so far are saved every --save-every batches to OUT.partial.npz: rerunning the same command
after an interruption continues from there (the result is the same, bit for bit) and the side file is
deleted once OUT is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillkac.cli.fid import add_inception_arguments
from distillkac.cli.options import add_command, add_output, add_overwrite, check_minimum
from distillkac.data import BAD_FILE_POLICIES, SPLITS
from distillkac.errors import DistillKacError
from distillkac.files import check_new_output_file
from distillkac.metrics import fid
from distillkac.metrics.inputs import REFERENCE_SOURCES, infer_source, load_reference_images
from distillkac.runtime import resolve_device


def register(subparsers) -> None:
    parser = add_command(subparsers, "ref", run,
                         "FID reference statistics of a set of images (an .npz for distillkac fid and eval)", __doc__)
    parser.add_argument("--data", required=True,
                        help="the images: a folder or .zip of images (class sub-folders and train/ test/ "
                             "splits allowed), the CIFAR-10 batches folder, an .npz of uint8 images, or what "
                             "distillkac sample wrote (its --out directory)")
    add_output(parser, "--out", "output .npz file", required=True)
    add_overwrite(parser, "an existing --out file")
    parser.add_argument("--dataset", choices=REFERENCE_SOURCES, default=None,
                        help="how to read --data (default: inferred: npz for an .npz file or sample's output, "
                             "cifar10 for the CIFAR-10 batches, else folder)")
    parser.add_argument("--split", default="train", choices=SPLITS,
                        help="the train/ or test/ sub-folder, when --data has them")
    parser.add_argument("--resolution", type=int, default=None,
                        help="folder: square size the images are centre-cropped and resized to (default: "
                             "their own size, when they all share one)")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="folder: 1 (grayscale) or 3 (RGB) (default: inferred from the images)")
    parser.add_argument("--bad-files", default="skip", choices=BAD_FILE_POLICIES,
                        help="unreadable image files: skip them (counted in one line) or stop")
    add_inception_arguments(parser)
    parser.add_argument("--limit", type=int, default=None,
                        help="use a random subset of this many images, chosen with --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    parser.add_argument("--save-every", type=int, default=20,
                        help="batches between saves of the partial sums to OUT.partial.npz")


def progress_path(out: str) -> Path:
    """The side file holding the moments so far of an unfinished ``ref`` into ``out``."""
    return Path(f"{out}.partial.npz")


def run(args: argparse.Namespace) -> int:
    source, data = (args.dataset, args.data) if args.dataset else infer_source(args.data)
    if source != "folder" and (args.resolution is not None or args.channels is not None):
        raise DistillKacError(f"--resolution/--channels: only for a folder or zip of images; {source} images "
                              f"are used at their own size")
    check_minimum(args, batch=1, save_every=1, limit=2)
    check_new_output_file(args.out, "--out", overwrite=args.overwrite)
    device = resolve_device(args.device)
    dataset = load_reference_images(source, data, args.split, resolution=args.resolution,
                                    channels=args.channels, bad_files=args.bad_files,
                                    progress=not args.no_progress)
    extractor = fid.InceptionFeatures(args.inception_weights, device, args.batch)
    partial = progress_path(args.out)
    reference = fid.compute_reference(dataset, args.split, extractor, limit=args.limit, seed=args.seed,
                                      progress=not args.no_progress, progress_file=partial,
                                      save_every=args.save_every)
    meta = fid.save_reference(args.out, reference.stats, reference.meta)
    partial.unlink(missing_ok=True)
    print(json.dumps({"out": args.out, "dataset": source, "count": meta["count"], "split": meta["split"],
                      "resolution": meta["resolution"], "channels": meta["channels"],
                      "weights_sha256": meta["weights_sha256"], "stats_sha256": meta["stats_sha256"]}))
    return 0
