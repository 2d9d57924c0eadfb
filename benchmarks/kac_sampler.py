"""Cost of drawing the Kac noise and the regression target, next to one UNet training forward+backward.

Measured in one process (method.md §1-2):
- ``KacPath.sample`` (exact Poisson-Beta sampler + conditional velocity, no tables) for a CIFAR-sized
  batch in float32, and the naive float64 target (the Kac-flow authors' practice) for comparison;
- the peak memory of one draw above the starting level, and the bytes of tensors the path keeps
  (0: nothing is precomputed);
- one forward+backward of the CIFAR-10 reference UNet at the same batch, and the ratio
  draw / forward+backward (target on a GPU: under 2 %).

On the CPU a forward+backward of the 38M-parameter UNet at batch 128 takes minutes, so the ratio is
taken at ``--model-batch`` (default 2 on the CPU) with the draw re-timed at that batch; the draw is
also timed at the full ``--batch``. Run: ``python benchmarks/kac_sampler.py [--device cuda]``.
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
from distillkac.runtime import autocast  # noqa: E402

NAME = "kac_sampler"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=None, help="batch of the draw (default: 128; 8 with --smoke)")
    parser.add_argument("--model-batch", type=int, default=None,
                        help="batch of the UNet forward+backward and of the ratio (default: --batch on a GPU, "
                             "2 on the CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="UNet precision (bf16 = autocast; default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--kac-a", type=float, default=9.0, help="flip rate a (default: %(default)s)")
    parser.add_argument("--kac-c", type=float, default=3.0, help="speed c (default: %(default)s)")
    return parser.parse_args(argv)


def draw_fn(path: KacPath, x0: torch.Tensor, dtype: torch.dtype, generator: torch.Generator):
    """One draw of ``t ~ U(0, T)``, ``x_t`` and the target, computed in ``dtype``, returned in float32."""
    def draw():
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=dtype) * path.T
        sample = path.sample(x0.to(dtype), t, generator=generator)
        return sample.x_t.float(), sample.target.float()

    return draw


def unet_step_fn(model: torch.nn.Module, batch: int, device: torch.device, precision: str,
                 generator: torch.Generator):
    """One training forward+backward of ``model`` on a fixed random batch (MSE against a fixed target)."""
    shape = (batch, *model.config.data_shape)
    x = torch.randn(shape, generator=generator, device=device)
    target = torch.randn(shape, generator=generator, device=device)
    t = torch.rand(batch, generator=generator, device=device)
    y = torch.randint(model.num_classes + 1, (batch,), generator=generator, device=device)

    def step():
        with autocast(device, precision):
            prediction = model(x, t, y)
        (prediction.float() - target).square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.device_from_args(args)
    warmup, repeat = common.repeats(args, device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (8 if args.smoke else 128)
    precision = args.precision or ("bf16" if gpu else "fp32")
    model_batch = args.model_batch or (args.batch if gpu else 2)
    config = common.network_config(args.smoke)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    path = KacPath(KacProcess(args.kac_a, args.kac_c))

    def data(batch: int) -> torch.Tensor:
        return torch.rand((batch, *config.data_shape), generator=generator, device=device) * 2 - 1

    x0 = data(args.batch)
    # Memory first: on the CPU the peak-RSS mark must not already hold the UNet's activations.
    memory = common.peak_memory_delta(draw_fn(path, x0, torch.float32, generator), device)
    output_bytes = 2 * x0.numel() * 4
    draw32 = common.time_call(draw_fn(path, x0, torch.float32, generator), device, warmup, repeat)
    draw64 = common.time_call(draw_fn(path, x0, torch.float64, generator), device, warmup, repeat)

    model = build_network(config, generator=torch.Generator().manual_seed(args.seed)).to(device).train()
    if gpu and precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    unet = common.time_call(unet_step_fn(model, model_batch, device, precision, generator), device, warmup, repeat)
    if model_batch == args.batch:
        small32, small64 = draw32, draw64
    else:
        x_small = data(model_batch)
        small32 = common.time_call(draw_fn(path, x_small, torch.float32, generator), device, warmup, repeat)
        small64 = common.time_call(draw_fn(path, x_small, torch.float64, generator), device, warmup, repeat)

    rows = [
        {"what": "Kac draw + target, float32", "batch": args.batch, "ms": 1e3 * draw32.median},
        {"what": "Kac draw + target, float64 (naive)", "batch": args.batch, "ms": 1e3 * draw64.median},
        {"what": f"Kac draw + target, float32 / UNet fwd+bwd ({precision})", "batch": model_batch,
         "ms": 1e3 * small32.median, "ratio_percent": 100 * small32.median / unet.median},
        {"what": f"Kac draw + target, float64 / UNet fwd+bwd ({precision})", "batch": model_batch,
         "ms": 1e3 * small64.median, "ratio_percent": 100 * small64.median / unet.median},
        {"what": f"UNet fwd+bwd ({precision})", "batch": model_batch, "ms": 1e3 * unet.median},
    ]
    table = common.format_table(rows, [("what", "measurement"), ("batch", "batch"), ("ms", "median ms"),
                                       ("ratio_percent", "% of UNet fwd+bwd")])
    memory_line = (f"precomputed tables kept by the path: {common.tensor_bytes(path)} bytes; peak memory delta of "
                   f"one float32 draw at batch {args.batch}: {common.mib(memory['peak_delta_bytes'])} MiB "
                   f"({memory['method']}; the returned x_t + target alone are {common.mib(output_bytes)} MiB)")
    print(table)
    print(memory_line)
    results = {
        "draw_float32": draw32.to_dict(), "draw_float64": draw64.to_dict(),
        "draw_float32_at_model_batch": small32.to_dict(), "draw_float64_at_model_batch": small64.to_dict(),
        "unet_forward_backward": unet.to_dict(),
        "ratio_draw_float32_to_unet": small32.median / unet.median,
        "ratio_draw_float64_to_unet": small64.median / unet.median,
        "float64_over_float32": draw64.median / draw32.median,
        "precomputed_table_bytes": common.tensor_bytes(path),
        "draw_peak_memory": memory, "draw_output_bytes": output_bytes,
        "target_ratio_gpu": 0.02, "rows": rows,
    }
    settings = {"batch": args.batch, "model_batch": model_batch, "precision": precision,
                "channels_last": gpu and precision == "bf16", "network": config.to_dict(),
                "kac": {"a": args.kac_a, "c": args.kac_c}, "warmup": warmup, "repeat": repeat, "smoke": args.smoke}
    name = f"{NAME}_{device.type}" + ("_smoke" if args.smoke else "")
    written = common.write_results(name, args.out, device, settings, results, table + "\n\n" + memory_line)
    print(f"wrote {written}")
    return results


if __name__ == "__main__":
    main()
