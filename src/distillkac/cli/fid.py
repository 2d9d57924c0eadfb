"""``distillkac fid``: FID of existing images against reference statistics."""

from __future__ import annotations

import argparse
import json

from distillkac.cli.options import add_command, add_no_progress, check_minimum
from distillkac.metrics import fid
from distillkac.metrics.inputs import image_file_batches
from distillkac.runtime import resolve_device

WEIGHTS_HELP = ("Inception weights file (default: $DISTILLKAC_INCEPTION_WEIGHTS, else torch-fidelity's "
                "download)")


def register(subparsers) -> None:
    parser = add_command(subparsers, "fid", run,
                         "FID of existing images against reference statistics from distillkac ref",
                         'Prints one JSON line {"fid", "num_images", "label", ...}. Images are used at their own '
                         "resolution, which must match the reference's.")
    parser.add_argument("--images", required=True,
                        help="what distillkac sample wrote (its --out directory, that directory's images/ "
                             "folder, or its samples.npz), any folder of PNG/JPEG files, or an .npz of uint8 "
                             "images (key 'samples' or 'images', [N, C, H, W] or [N, H, W, C])")
    parser.add_argument("--ref", required=True, help="reference statistics .npz written by distillkac ref")
    add_inception_arguments(parser, f"{WEIGHTS_HELP}; must be the one the reference was made with")


def add_inception_arguments(parser: argparse.ArgumentParser, weights_help: str = WEIGHTS_HELP) -> None:
    """The options of a command that runs the Inception network: --inception-weights, --batch, --device
    and --no-progress."""
    parser.add_argument("--inception-weights", default=None, help=weights_help)
    parser.add_argument("--batch", type=int, default=250, help="images per Inception forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
    check_minimum(args, batch=1)
    device = resolve_device(args.device)
    reference = fid.load_reference(args.ref)
    weights = fid.resolve_inception_weights(args.inception_weights)
    fid.check_reference_compatible(reference, fid.inception_weights_id(weights))
    count, batches = image_file_batches(args.images, args.batch, channels=reference.meta["channels"])
    extractor = fid.InceptionFeatures(weights, device, args.batch)
    result = fid.fid_against_reference(batches, reference, extractor, progress=not args.no_progress,
                                       total=count)
    print(json.dumps({**result, "images": args.images, "ref": args.ref,
                      "reference_dataset": reference.meta.get("dataset", {}).get("name"),
                      "reference_split": reference.meta.get("split")}))
    return 0
