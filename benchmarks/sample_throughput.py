"""Sampling throughput of the CIFAR-10 UNet with ``distillkac.sampling.generate`` (per-image seeds).

Measured in one process, random weights (speed does not depend on them):
- images/s at 1, 4, 20, 100 steps for a student (Euler, 1 NFE per step, no guidance) and the guided
  AB-2 teacher (velocity-space CFG: one forward of doubled batch per step, 2 NFE per step), batch
  sizes 256-2048 (GPU); everything ``generate`` does is timed: the per-image-seeded prior draw, the
  solver, the copy of the samples to the host;
- the time to generate 50,000 images at 1 step (GPU; target under 10 s on an H100);
- the prior draw alone, per-image seeds (``seeded_generators`` + per-row draws, as ``generate`` does)
  against one batched generator, for the same number of images, with generator creation timed apart.
On the CPU (small batches, 1 and 4 steps, no 50k run) the numbers are what was measured; nothing is
extrapolated. Run: ``python benchmarks/sample_throughput.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from distillkac.kac import KacProcess  # noqa: E402
from distillkac.nets import build_network  # noqa: E402
from distillkac.paths import KacPath  # noqa: E402
from distillkac.rng import seeded_generators  # noqa: E402
from distillkac.sampling import cycle_labels, generate  # noqa: E402

NAME = "sample_throughput"
TARGET_50K_SECONDS_H100 = 10.0


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--steps", type=integers, default=None,
                        help="comma-separated step counts (default: 1,4,20,100 on a GPU, 1,4 on the CPU)")
    parser.add_argument("--batches", type=integers, default=None,
                        help="comma-separated batch sizes (default: 256,512,1024,2048 on a GPU, 1 on the CPU)")
    parser.add_argument("--guidance", type=float, default=1.0, help="teacher's CFG weight w (default: %(default)s)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="images of the full 1-step run (default: 50000 on a GPU, 0 = skipped on the CPU)")
    parser.add_argument("--full-batch", type=int, default=2048, help="batch of the full run (default: %(default)s)")
    parser.add_argument("--prior-images", type=int, default=None,
                        help="images of the prior-draw comparison (default: --num-images on a GPU, 128 on the CPU)")
    parser.add_argument("--prior-batch", type=int, default=None,
                        help="chunk of the prior-draw comparison (default: --full-batch on a GPU, 128 on the CPU)")
    return parser.parse_args(argv)


def sampling_repeats(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """Sampling calls are long: 1 warm-up + 3 timed on a GPU, 0 + 1 on the CPU (after a global warm-up)."""
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (1 if gpu else 0)
    repeat = args.repeat if args.repeat is not None else (3 if gpu else 1)
    return warmup, max(repeat, 1)


def time_generate(model, path, count: int, steps: int, solver: str, guidance: float, batch: int,
                  device: torch.device, warmup: int, repeat: int) -> common.Timing:
    labels = cycle_labels(count, model.num_classes)

    def run():
        generate(model, path, seeds=range(count), labels=labels, steps=steps, solver=solver, guidance=guidance,
                 batch_size=batch, device=device)

    return common.time_call(run, device, warmup, repeat)


def prior_comparison(path: KacPath, shape: tuple[int, ...], count: int, batch: int, device: torch.device,
                     seed: int, warmup: int, repeat: int) -> dict:
    """Prior draws of ``count`` images in chunks of ``batch``: per-image seeded generators vs one generator."""
    chunks = [range(start, min(start + batch, count)) for start in range(0, count, batch)]

    def make_generators():
        return [seeded_generators(chunk, device) for chunk in chunks]

    def per_image():
        for chunk in chunks:
            path.prior((len(chunk), *shape), generator=seeded_generators(chunk, device), device=device)

    one = torch.Generator(device=device).manual_seed(seed)

    def batched():
        for chunk in chunks:
            path.prior((len(chunk), *shape), generator=one, device=device)

    timings = {"create_generators": common.time_call(make_generators, device, warmup, repeat),
               "per_image_seeded": common.time_call(per_image, device, warmup, repeat),
               "one_generator": common.time_call(batched, device, warmup, repeat)}
    result = {name: {**timing.to_dict(), "per_image_us": 1e6 * timing.median / count}
              for name, timing in timings.items()}
    result["images"] = count
    result["batch"] = batch
    result["per_image_over_batched"] = timings["per_image_seeded"].median / timings["one_generator"].median
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.device_from_args(args)
    gpu = device.type == "cuda"
    warmup, repeat = sampling_repeats(args, device)
    steps_list = args.steps or ([1, 4, 20, 100] if gpu else [1, 4])
    batches = args.batches or ([256, 512, 1024, 2048] if gpu else [1])
    num_images = args.num_images if args.num_images is not None else (50_000 if gpu else 0)
    prior_images = args.prior_images or (num_images if gpu and num_images else 16 if args.smoke else 128)
    prior_batch = args.prior_batch or (args.full_batch if gpu else prior_images)
    config = common.network_config(args.smoke)
    model = build_network(config, generator=torch.Generator().manual_seed(args.seed)).to(device).eval()
    path = KacPath(KacProcess())
    time_generate(model, path, 1, 1, "euler", 0.0, 1, device, 0, 1)  # global warm-up (allocator, kernels)

    rows = []
    for steps in steps_list:
        for kind, solver, guidance in (("student", "euler", 0.0), ("teacher", "ab2", args.guidance)):
            for batch in batches:
                timing = time_generate(model, path, batch, steps, solver, guidance, batch, device, warmup, repeat)
                nfe = steps * (2 if guidance else 1)
                rows.append({"model": kind, "solver": solver, "guidance": guidance, "steps": steps, "nfe": nfe,
                             "batch": batch, "seconds": timing.median, "images_per_s": batch / timing.median,
                             "timing": timing.to_dict()})
    full = None
    if num_images:
        timing = time_generate(model, path, num_images, 1, "euler", 0.0, args.full_batch, device, 0, 1)
        full = {"images": num_images, "batch": args.full_batch, "steps": 1, "seconds": timing.median,
                "images_per_s": num_images / timing.median, "target_seconds_h100": TARGET_50K_SECONDS_H100}
    prior = prior_comparison(path, tuple(config.data_shape), prior_images, prior_batch, device, args.seed, 1, repeat)

    table = common.format_table(rows, [("model", "model"), ("solver", "solver"), ("guidance", "w"),
                                       ("steps", "steps"), ("nfe", "NFE"), ("batch", "batch"),
                                       ("seconds", "s per batch"), ("images_per_s", "images/s")])
    seeded, single = prior["per_image_seeded"], prior["one_generator"]
    lines = [table, "",
             f"prior draw of {prior['images']} images in batches of {prior['batch']}: per-image seeds "
             f"{seeded['median_s']:.4g} s ({seeded['per_image_us']:.4g} us/image, of which creating the "
             f"generators {prior['create_generators']['median_s']:.4g} s), one generator {single['median_s']:.4g} s "
             f"({single['per_image_us']:.4g} us/image): {prior['per_image_over_batched']:.3g}x"]
    if full:
        lines.append(f"{full['images']} images at 1 step (batch {full['batch']}, per-image seeds, to host): "
                     f"{full['seconds']:.3f} s (target < {TARGET_50K_SECONDS_H100:g} s on an H100)")
    else:
        lines.append("full 50,000-image run: not measured (CPU mode; use --device cuda or --num-images)")
    text = "\n".join(lines)
    print(text)
    settings = {"steps": steps_list, "batches": batches, "guidance": args.guidance, "num_images": num_images,
                "full_batch": args.full_batch, "prior_images": prior_images,
                "prior_batch": prior_batch, "warmup": warmup, "repeat": repeat,
                "network": config.to_dict(), "autocast": "bf16 (generate's CUDA default)" if gpu else "none (fp32)",
                "smoke": args.smoke}
    results = {"rows": rows, "full_run": full, "prior_draw": prior}
    name = f"{NAME}_{device.type}" + ("_smoke" if args.smoke else "")
    written = common.write_results(name, args.out, device, settings, results, text)
    print(f"wrote {written}")
    return results


if __name__ == "__main__":
    main()
