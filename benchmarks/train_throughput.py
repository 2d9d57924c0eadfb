"""Training throughput of the CIFAR-10 teacher: images/s, peak memory, FLOPs, MFU, share of the Kac draw.

A step here IS the real training step: ``distillkac.train``'s trainer runs its own ``train_step`` (the
TeacherObjective on the Kac path, micro-batches, autocast / channels-last / torch.compile exactly as the
loop applies them, gradient clipping, AdamW, EMA update) on random uint8 images held in memory. It is
built with a run directory that is never written (nothing is saved or logged).

Configurations, all measured in the same process:
- ``baseline``: "as the Kac-flow authors' code does it": fp32, no channels-last, no compile, the target
  computed in float64 (the network still sees float32 inputs);
- ``fp32``, ``bf16`` (autocast), ``bf16+cl`` (channels-last), ``bf16+cl+compile`` (GPU only);
on the CPU: baseline, fp32 and bf16. Reported: best / baseline speed-up (target >= 3x on an H100),
model FLOPs per image (forward + backward, ``FlopCounterMode``, counted on the baseline's first step),
achieved TFLOP/s and, on a GPU, the fraction of the device's dense bf16 peak (MFU), and the share of the
step spent drawing the Kac noise + target. The results file is rewritten after every variant.
Run: ``python benchmarks/train_throughput.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from distillkac.config import RunConfig  # noqa: E402
from distillkac.data import InMemoryDataset  # noqa: E402
from distillkac.nets import build_network  # noqa: E402
from distillkac.paths import build_path  # noqa: E402
from distillkac.presets import get_preset  # noqa: E402
from distillkac.rng import rand  # noqa: E402
from distillkac.train import TeacherObjective, _Trainer, micro_generator  # noqa: E402

NAME = "train_throughput"


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    channels_last: str
    compile: bool
    float64_target: bool = False


VARIANTS = {
    "baseline": Variant("baseline", "fp32", "off", False, float64_target=True),
    "fp32": Variant("fp32", "fp32", "off", False),
    "bf16": Variant("bf16", "bf16", "off", False),
    "bf16+cl": Variant("bf16+cl", "bf16", "on", False),
    "bf16+cl+compile": Variant("bf16+cl+compile", "bf16", "on", True),
}
GPU_VARIANTS = tuple(VARIANTS)
CPU_VARIANTS = ("baseline", "fp32", "bf16")


class Float64TargetObjective(TeacherObjective):
    """The teacher objective with ``x_t`` and the target computed in float64 (the Kac-flow code's
    practice), cast to float32 for the network and the loss. Same draws as :class:`TeacherObjective`."""

    def per_sample_loss(self, model, x0, y, generator):
        batch = x0.shape[0]
        t = rand((batch,), generator, device=x0.device, dtype=torch.float64) * self.path.T
        point = self.path.sample(x0.double(), t, generator=generator)
        drop = rand((batch,), generator, device=x0.device) < self.label_dropout
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        prediction = model(point.x_t.float(), t.float(), y)
        return (prediction.float() - point.target.float()).square().flatten(1).mean(dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.epilog = "Repeats: 1 warm-up + 1 timed step per variant on the CPU, 5 + 20 on a GPU."
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default: 128 on a GPU, 1 on the CPU, 4 with --smoke)")
    parser.add_argument("--micro-batch", type=int, default=None, help="micro-batch (default: the batch)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)} "
                             f"(default: all on a GPU, {','.join(CPU_VARIANTS)} on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: detected from the device name: "
                             "989 for an H100 or H200 SXM)")
    return parser.parse_args(argv)


def run_config(variant: Variant, smoke: bool, batch: int, micro_batch: int, device: torch.device,
               seed: int) -> RunConfig:
    preset = get_preset("cifar10")
    train = dataclasses.replace(preset.train, batch=batch, micro_batch=micro_batch, device=str(device),
                                precision=variant.precision, channels_last=variant.channels_last,
                                compile=variant.compile, seed=seed)
    net = common.network_config(smoke)
    return dataclasses.replace(preset, net=net, train=train).validate()


def random_dataset(config: RunConfig, size: int, seed: int) -> InMemoryDataset:
    """``size`` random uint8 images of the network's shape with labels 0..9 (hflip on, as for CIFAR-10)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(256, (size, *config.net.data_shape), generator=generator, dtype=torch.uint8)
    labels = torch.randint(10, (size,), generator=generator)
    return InMemoryDataset(images, labels, num_classes=10, class_names=[str(k) for k in range(10)], hflip=True,
                           info={"name": "random uint8 images (benchmark)"})


def draw_time(trainer: _Trainer, variant: Variant, warmup: int, repeat: int) -> common.Timing:
    """Time of a step's random draws (t, Kac noise, target, label dropout) over all its micro-batches."""
    train = trainer.config.train
    dtype = torch.float64 if variant.float64_target else torch.float32
    x0, _ = trainer.dataset.get_batch(torch.arange(train.micro_batch))
    x0 = x0.to(trainer.device, dtype)
    path = trainer.objective.path

    def draws():
        for micro in range(trainer.micro_count):
            generator = micro_generator(train.seed, trainer.step, micro, trainer.device)
            t = rand((train.micro_batch,), generator, device=trainer.device, dtype=dtype) * path.T
            path.sample(x0, t, generator=generator)
            rand((train.micro_batch,), generator, device=trainer.device)

    return common.time_call(draws, trainer.device, warmup, repeat)


def flops_per_image(trainer: _Trainer, network: torch.nn.Module) -> float:
    """Forward + backward FLOPs per image of one real (eager) training step, counted by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(network)
    trainer.step += 1
    return counter.get_total_flops() / trainer.config.train.batch


def step_fn(trainer: _Trainer, network: torch.nn.Module):
    """One real training step (the loop's ``train_step``), advancing the step counter as the loop does."""
    def step():
        trainer.train_step(network)
        trainer.step += 1

    return step


def measure(variant: Variant, args: argparse.Namespace, batch: int, micro_batch: int, device: torch.device,
            warmup: int, repeat: int, count_flops: bool) -> dict:
    config = run_config(variant, args.smoke, batch, micro_batch, device, args.seed)
    path = build_path(dataclasses.asdict(config.path))
    objective_class = Float64TargetObjective if variant.float64_target else TeacherObjective
    objective = objective_class(path, 10, config.train.label_dropout)
    model = build_network(config.net, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as unused_run_dir:
        trainer = _Trainer(config, Path(unused_run_dir), model, objective,
                           random_dataset(config, max(4 * batch, 256), args.seed), preview=None, progress=False)
        network = trainer.wrap()
        trainer.model.train()
        flops = flops_per_image(trainer, network) if count_flops else None

        common.reset_peak(device)
        timing = common.time_call(step_fn(trainer, network), device, warmup, repeat)
        peak = common.peak_bytes(device)
        draws = draw_time(trainer, variant, min(warmup, 2), repeat)
    del trainer, network, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant.name, "precision": variant.precision, "channels_last": variant.channels_last,
            "compile": variant.compile, "float64_target": variant.float64_target, "step": timing.to_dict(),
            "images_per_s": batch / timing.median, "peak_memory_bytes": peak, "peak_mib": peak / 2**20,
            "draw": draws.to_dict(), "draw_share_percent": 100 * draws.median / timing.median,
            "flops_per_image": flops}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.device_from_args(args)
    warmup, repeat = common.repeats(args, device, cpu=(1, 1))
    gpu = device.type == "cuda"
    batch = args.batch or (4 if args.smoke else 128 if gpu else 1)
    micro_batch = args.micro_batch or batch
    names = args.variants.split(",") if args.variants else list(GPU_VARIANTS if gpu else CPU_VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else common.bf16_peak_tflops(device)
    settings = {"batch": batch, "micro_batch": micro_batch, "variants": names, "warmup": warmup,
                "repeat": repeat, "peak_tflops": peak if gpu else None,
                "peak_tflops_source": peak_source if gpu else None,
                "network": common.network_config(args.smoke).to_dict(),
                "step": "distillkac.train._Trainer.train_step (TeacherObjective, clip, AdamW, EMA)",
                "smoke": args.smoke}
    name = f"{NAME}_{device.type}" + ("_smoke" if args.smoke else "")
    memory = ("CUDA max allocated" if gpu
              else "process peak RSS (includes the data set and the other variants' freed memory)")
    rows = []
    for index, variant in enumerate(names):  # the results file is rewritten after every variant
        rows.append(measure(VARIANTS[variant], args, batch, micro_batch, device, warmup, repeat, index == 0))
        results, text = summarise(rows, peak if gpu else None,
                                  f"batch {batch}, micro-batch {micro_batch}; peak memory: {memory}")
        written = common.write_results(name, args.out, device, settings, results, text)
    print(text)
    print(f"wrote {written}")
    return results


def summarise(rows: list[dict], peak: float | None, notes: str) -> tuple[dict, str]:
    """Speed-up over the baseline (the first row), achieved TFLOP/s, MFU against ``peak``; the printed text."""
    flops = rows[0]["flops_per_image"]
    baseline = rows[0]["images_per_s"]
    for row in rows:
        row["flops_per_image"] = flops
        row["speedup_vs_baseline"] = row["images_per_s"] / baseline
        row["achieved_tflops"] = flops * row["images_per_s"] / 1e12
        row["mfu_percent"] = 100 * row["achieved_tflops"] / peak if peak else None
    best = max(rows, key=lambda row: row["images_per_s"])
    table = common.format_table(rows, [
        ("variant", "variant"), ("images_per_s", "images/s"), ("speedup_vs_baseline", "x baseline"),
        ("peak_mib", "peak MiB"), ("achieved_tflops", "TFLOP/s"), ("mfu_percent", "MFU %"),
        ("draw_share_percent", "Kac draw % of step")])
    summary = (f"model FLOPs per image (forward+backward): {flops / 1e9:.2f} GFLOP; best {best['variant']} is "
               f"{best['images_per_s'] / baseline:.2f}x the baseline (target >= 3x on an H100); {notes}")
    results = {"rows": rows, "best": best["variant"], "best_over_baseline": best["images_per_s"] / baseline,
               "flops_per_image": flops, "target_speedup_h100": 3.0}
    return results, table + "\n\n" + summary


if __name__ == "__main__":
    main()
