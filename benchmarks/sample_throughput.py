"""Sampling throughput of the CIFAR-10 UNet with ``distillkac.sampling.generate`` (per-image seeds).

Measured in one process, random weights (speed does not depend on them):
- images/s at 1, 4, 20, 100 steps for a student (Euler, 1 NFE per step, no guidance) and the guided
  AB-2 teacher (velocity-space CFG: one forward of doubled batch per step, 2 NFE per step), batch
  sizes 256-2048 (GPU); everything ``generate`` does is timed: the per-image-seeded prior draw, the
  solver, the copy of the samples to the host;
- the time to generate 50,000 images at 1 step (GPU; target under 10 s on an H100), with ``generate``'s
  bf16 autocast and in fp32 (the network run with autocast off);
- the per-image-seeded prior draw alone: the batched counter-based streams ``generate`` uses
  (``seeded_generators`` -> one ``SeedStream`` per batch), the former Python loop over one
  ``torch.Generator`` per image, and one generator for the whole batch (not per-image, for scale).
On the CPU (small batches, 1 and 4 steps, no 50k run) the numbers are what was measured; nothing is
extrapolated. Run: ``python benchmarks/sample_throughput.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from distillkac.kac import KacProcess  # noqa: E402
from distillkac.nets import build_network  # noqa: E402
from distillkac.paths import KacPath  # noqa: E402
from distillkac.rng import SeedStream, seeded_generators  # noqa: E402
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
                        help="images of the prior-draw comparison (default: 8192 on a GPU, 128 on the CPU)")
    parser.add_argument("--prior-batch", type=int, default=None,
                        help="chunk of the prior-draw comparison (default: --full-batch on a GPU, 128 on the CPU)")
    return parser.parse_args(argv)


def sampling_repeats(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """Sampling calls are long: 1 warm-up + 3 timed on a GPU, 0 + 1 on the CPU (after a global warm-up)."""
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (1 if gpu else 0)
    repeat = args.repeat if args.repeat is not None else (3 if gpu else 1)
    return warmup, max(repeat, 1)


class Float32Network(nn.Module):
    """The network with autocast switched off inside it, so ``generate``'s CUDA bf16 autocast does not reach it."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.num_classes = network.num_classes
        self.config = network.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.network(x.float(), t.float(), y)


def time_generate(model, path, count: int, steps: int, solver: str, guidance: float, batch: int,
                  device: torch.device, warmup: int, repeat: int) -> common.Timing:
    labels = cycle_labels(count, model.num_classes)

    def run():
        generate(model, path, seeds=range(count), labels=labels, steps=steps, solver=solver, guidance=guidance,
                 batch_size=batch, device=device)

    return common.time_call(run, device, warmup, repeat)


def full_runs(model, path, count: int, batch: int, device: torch.device, rows: list[dict], write) -> None:
    """``count`` images at 1 step in batches of ``batch``: bf16 autocast (generate's CUDA default) and fp32,
    each appended to ``rows``, then ``write()``."""
    precisions = {"bf16": model, "fp32": Float32Network(model)} if device.type == "cuda" else {"fp32": model}
    for precision, network in precisions.items():
        time_generate(network, path, min(batch, count), 1, "euler", 0.0, batch, device, 0, 1)  # warm-up
        timing = time_generate(network, path, count, 1, "euler", 0.0, batch, device, 0, 1)
        rows.append({"precision": precision, "images": count, "batch": batch, "steps": 1,
                     "seconds": timing.median, "images_per_s": count / timing.median,
                     "target_seconds_h100": TARGET_50K_SECONDS_H100})
        write()


def prior_comparison(path: KacPath, shape: tuple[int, ...], count: int, batch: int, device: torch.device,
                     seed: int, warmup: int, repeat: int) -> dict:
    """Prior draws of ``count`` images in chunks of ``batch``: the per-image streams (batched), the per-image
    generator loop, and one generator for the batch; stream and generator creation are timed apart."""
    chunks = [range(start, min(start + batch, count)) for start in range(0, count, batch)]

    def generators(chunk):
        return [torch.Generator(device=device).manual_seed(s) for s in chunk]

    def draw_all(make):
        def draw():
            for chunk in chunks:
                path.prior((len(chunk), *shape), generator=make(chunk), device=device)
        return draw

    one = torch.Generator(device=device).manual_seed(seed)
    timings = {"create_streams": common.time_call(lambda: [SeedStream(c, device) for c in chunks], device,
                                                  warmup, repeat),
               "create_generators": common.time_call(lambda: [generators(c) for c in chunks], device,
                                                     warmup, repeat),
               "batched_streams": common.time_call(draw_all(lambda c: seeded_generators(c, device)), device,
                                                   warmup, repeat),
               "loop_generators": common.time_call(draw_all(generators), device, warmup, repeat),
               "one_generator": common.time_call(draw_all(lambda c: one), device, warmup, repeat)}
    result = {name: {**timing.to_dict(), "per_image_us": 1e6 * timing.median / count}
              for name, timing in timings.items()}
    result["images"] = count
    result["batch"] = batch
    result["loop_over_batched"] = timings["loop_generators"].median / timings["batched_streams"].median
    result["batched_over_one_generator"] = timings["batched_streams"].median / timings["one_generator"].median
    return result


def prior_line(prior: dict) -> str:
    batched, loop, single = prior["batched_streams"], prior["loop_generators"], prior["one_generator"]
    return (f"per-image prior of {prior['images']} images in batches of {prior['batch']}: batched streams "
            f"{batched['median_s']:.4g} s ({batched['per_image_us']:.4g} us/image), loop over per-image generators "
            f"{loop['median_s']:.4g} s ({loop['per_image_us']:.4g} us/image): loop / batched = "
            f"{prior['loop_over_batched']:.3g}x; one generator for the batch (not per-image) "
            f"{single['median_s']:.4g} s: batched / one generator = {prior['batched_over_one_generator']:.3g}x")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.device_from_args(args)
    gpu = device.type == "cuda"
    warmup, repeat = sampling_repeats(args, device)
    steps_list = args.steps or ([1, 4, 20, 100] if gpu else [1, 4])
    batches = args.batches or ([256, 512, 1024, 2048] if gpu else [1])
    num_images = args.num_images if args.num_images is not None else (50_000 if gpu else 0)
    prior_images = args.prior_images or (8192 if gpu else 16 if args.smoke else 128)
    prior_batch = args.prior_batch or (args.full_batch if gpu else prior_images)
    config = common.network_config(args.smoke)
    model = build_network(config, generator=torch.Generator().manual_seed(args.seed)).to(device).eval()
    path = KacPath(KacProcess())
    time_generate(model, path, 1, 1, "euler", 0.0, 1, device, 0, 1)  # global warm-up (allocator, kernels)

    settings = {"steps": steps_list, "batches": batches, "guidance": args.guidance, "num_images": num_images,
                "full_batch": args.full_batch, "prior_images": prior_images, "prior_batch": prior_batch,
                "warmup": warmup, "repeat": repeat, "network": config.to_dict(),
                "autocast": "bf16 (generate's CUDA default)" if gpu else "none (fp32)", "smoke": args.smoke}
    name = f"{NAME}_{device.type}" + ("_smoke" if args.smoke else "")
    results: dict = {"rows": [], "full_runs": [], "prior_draw": None}

    def write() -> str:  # after every part, so that a run cut off keeps what it measured
        text = report(results)
        common.write_results(name, args.out, device, settings, results, text)
        return text

    for steps in steps_list:
        for kind, solver, guidance in (("student", "euler", 0.0), ("teacher", "ab2", args.guidance)):
            for batch in batches:
                timing = time_generate(model, path, batch, steps, solver, guidance, batch, device, warmup, repeat)
                nfe = steps * (2 if guidance else 1)
                results["rows"].append({"model": kind, "solver": solver, "guidance": guidance, "steps": steps,
                                        "nfe": nfe, "batch": batch, "seconds": timing.median,
                                        "images_per_s": batch / timing.median, "timing": timing.to_dict()})
    write()
    if num_images:
        full_runs(model, path, num_images, args.full_batch, device, results["full_runs"], write)
    results["prior_draw"] = prior_comparison(path, tuple(config.data_shape), prior_images, prior_batch, device,
                                             args.seed, 1, repeat)
    print(write())
    print(f"wrote {args.out / (name + '.json')}")
    return results


def report(results: dict) -> str:
    table = common.format_table(results["rows"], [("model", "model"), ("solver", "solver"), ("guidance", "w"),
                                                  ("steps", "steps"), ("nfe", "NFE"), ("batch", "batch"),
                                                  ("seconds", "s per batch"), ("images_per_s", "images/s")])
    lines = [table, ""]
    if results["prior_draw"]:
        lines.append(prior_line(results["prior_draw"]))
    for run in results["full_runs"]:
        lines.append(f"{run['images']} images at 1 step, {run['precision']} (batch {run['batch']}, batched per-image "
                     f"noise, to host): {run['seconds']:.3f} s (target < {TARGET_50K_SECONDS_H100:g} s on an H100)")
    if not results["full_runs"]:
        lines.append("full 50,000-image run: not measured (CPU mode; use --device cuda or --num-images)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
