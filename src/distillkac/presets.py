"""The per-dataset presets: the run config of each training preset and of a folder of the user's own
images, and the config of each distillation (the dataclasses are in config.py)."""

from __future__ import annotations

import copy
import dataclasses

from distillkac.config import DistillConfig, OptimConfig, RunConfig, TrainConfig, ema_halflife_for_decay
from distillkac.data import DataConfig, ImageSetInfo
from distillkac.errors import DistillKacError
from distillkac.nets import REFERENCE_CONFIGS, MLPConfig, NetworkConfig, UNetConfig, config_parameter_count
from distillkac.paths import PathConfig


def _digits() -> RunConfig:
    """Bundled 8x8 digits, sized to train on 2 CPU cores in under 5 minutes: a 0.7M-parameter UNet
    (REFERENCE_CONFIGS["digits"], 4.3M, takes about 5 times longer per step); guided AB-2 samples
    are clearly readable digits after about 500 steps. Kac constants (a, c) = (1, 1), not the paper's
    CIFAR-10 (9, 3): on digits they lower the guided 100-step teacher's fd_digits from 22.4 to 12.9; CFG
    weight 0.25 for the previews and the students (fd_digits 8.2 against 15.1 at w = 1; docs/ablations.md)."""
    net = UNetConfig(image_channels=1, resolution=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(), dropout=0.0, num_classes=10, groups=8)
    return RunConfig(
        data=DataConfig(name="digits"), net=net, path=PathConfig(kac_a=1.0, kac_c=1.0),
        optim=OptimConfig(lr=2e-3, warmup_images=12_800, grad_clip=1.0),
        train=TrainConfig(steps=800, batch=128, micro_batch=128, ema_halflife_images=20_000,
                          ema_rampup=0.1, log_every=50, ckpt_every=200, sample_every=200,
                          preview_num=100, preview_steps=100, preview_guidance=0.25))


def _ddpm_recipe(name: str, data: DataConfig, lr: float, batch: int, micro_batch: int, steps: int,
                 **train) -> RunConfig:
    """The DDPM / ADM recipe around ``REFERENCE_CONFIGS[name]``: Adam at ``lr``, a 5000-step warm-up, clip 1.0,
    EMA 0.9999 per step (as a half-life in images at ``batch``)."""
    return RunConfig(
        data=data, net=dataclasses.replace(REFERENCE_CONFIGS[name]), path=PathConfig(),
        optim=OptimConfig(lr=lr, warmup_images=5000 * batch, grad_clip=1.0),
        train=TrainConfig(steps=steps, batch=batch, micro_batch=micro_batch,
                          ema_halflife_images=round(ema_halflife_for_decay(0.9999, batch)), ema_rampup=0.05, **train))


def _cifar10() -> RunConfig:
    """The Kac-flow paper's CIFAR-10 recipe (method.md §5): ADM UNet, Adam 2e-4, batch 128, 400k steps,
    EMA 0.9999, clip 1.0, dropout 0.1, 5000-step warm-up (as in DDPM)."""
    return _ddpm_recipe("cifar10", DataConfig(name="cifar10", hflip=True), 2e-4, 128, 32, 400_000,
                        preview_num=100, preview_guidance=1.0)


def _celeba64() -> RunConfig:
    """CelebA 64x64 (unconditional), an image folder or zip given with --data."""
    return _ddpm_recipe("celeba64", DataConfig(name="folder", resolution=64, channels=3, hflip=True, labels="none"),
                        2e-4, 128, 32, 400_000, preview_guidance=0.0)


def _lsun_bedroom256() -> RunConfig:
    """LSUN Bedroom 256x256 (unconditional; pre-resize the export): DDPM's LSUN settings, lr 2e-5,
    batch 64, EMA 0.9999."""
    data = DataConfig(name="folder", resolution=256, channels=3, hflip=True, labels="none")
    return _ddpm_recipe("lsun-bedroom256", data, 2e-5, 64, 8, 500_000, ckpt_every=5000, sample_every=10_000,
                        preview_guidance=0.0)


def _toy2d() -> RunConfig:
    """The 4x4 Gaussian grid with a small residual MLP; trains in seconds on a CPU."""
    return RunConfig(
        data=DataConfig(name="toy2d", toy="grid", toy_size=20_000),
        net=MLPConfig(dim=2, hidden=128, depth=3, num_classes=16),
        path=PathConfig(), optim=OptimConfig(lr=2e-3, warmup_images=25_600, grad_clip=1.0),
        train=TrainConfig(steps=1000, batch=256, micro_batch=256, ema_halflife_images=25_000, ema_rampup=0.1,
                          log_every=100, ckpt_every=500, sample_every=500, preview_num=2000, preview_steps=50,
                          preview_guidance=0.0))


PRESETS: dict[str, RunConfig] = {"digits": _digits(), "cifar10": _cifar10(), "celeba64": _celeba64(),
                                  "lsun-bedroom256": _lsun_bedroom256(), "toy2d": _toy2d()}
"""Preset name -> RunConfig (use :func:`get_preset` for a private copy)."""


def get_preset(name: str) -> RunConfig:
    """A private copy of preset ``name`` (editing it leaves ``PRESETS`` alone)."""
    if name not in PRESETS:
        raise DistillKacError(f"--preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# -------------------------------------------------------------------------------------- own images

#: (smallest resolution, preset): images of at least that many pixels train with that preset's recipe
_RECIPES = ((256, "lsun-bedroom256"), (64, "celeba64"), (17, "cifar10"), (1, "digits"))


def recipe_for_resolution(resolution: int) -> str:
    """The preset whose recipe (optimiser, loop, distillation) a folder of ``resolution``-px images uses:
    digits up to 16 px, cifar10 below 64 px, celeba64 below 256 px, lsun-bedroom256 from 256 px."""
    return next(name for smallest, name in _RECIPES if resolution >= smallest)


def image_network(resolution: int, channels: int, num_classes: int) -> UNetConfig:
    """The UNet for ``resolution``-px images, the rule ``train --data FOLDER`` uses without --preset.

    Up to 16 px, a CPU-sized UNet: 32 channels, one residual block per level, no attention, no dropout,
    levels (1, 2) up to 8 px and (1, 2, 2) above. Larger images get the reference ADM UNet of their recipe
    (:func:`recipe_for_resolution`): 128 channels, two residual blocks, attention at 16 px, dropout 0.1
    (cifar10) or 0 (lsun-bedroom256), levels (1, 2, 2, 2), or (1, 1, 2, 2, 4, 4) from 256 px. Levels are
    dropped from the end until the resolution is a multiple of 2**(levels - 1) with at least 4 px at the
    lowest level; without a 16-px level, attention goes to the largest feature resolution below 16 px.
    """
    if resolution <= 16:
        net = UNetConfig(model_channels=32, channel_mult=(1, 2) if resolution <= 8 else (1, 2, 2), num_res_blocks=1,
                         attn_resolutions=(), dropout=0.0, groups=8)
    else:
        net = REFERENCE_CONFIGS[recipe_for_resolution(resolution)]
    mult = net.channel_mult
    while len(mult) > 1 and (resolution % 2 ** (len(mult) - 1) or resolution // 2 ** (len(mult) - 1) < 4):
        mult = mult[:-1]
    net = dataclasses.replace(net, image_channels=channels, resolution=resolution, channel_mult=mult,
                              num_classes=num_classes)
    features = net.feature_resolutions()
    attn = tuple(r for r in net.attn_resolutions if r in features)
    if net.attn_resolutions and not attn:
        below = [r for r in features if r < 16]
        attn = (max(below),) if below else ()
    return dataclasses.replace(net, attn_resolutions=attn)


def own_images_config(info: ImageSetInfo, labels: str = "auto", resolution: int | None = None,
                      channels: int | None = None) -> RunConfig:
    """The run config of ``train --data FOLDER`` without --preset, from what the folder holds (``info``,
    from :func:`distillkac.data.inspect_images`): the images' own resolution and channels unless given, one
    class per sub-folder (``labels``), the network of :func:`image_network` and the optimiser and loop of
    the recipe for that resolution; previews guided (w = 1) when there are classes; no flips."""
    resolution = resolution if resolution is not None else info.resolution()
    channels = channels if channels is not None else info.channels
    classes = len(info.class_names)
    recipe = get_preset(recipe_for_resolution(resolution))
    data = DataConfig(name="folder", path=str(info.path), resolution=resolution, channels=channels, labels=labels)
    train = dataclasses.replace(recipe.train, preview_guidance=1.0 if classes else 0.0)
    return RunConfig(data=data, net=image_network(resolution, channels, classes), path=recipe.path,
                     optim=recipe.optim, train=train)


def describe_net(net: NetworkConfig) -> str:
    if isinstance(net, MLPConfig):
        return f"MLP {net.depth}x{net.hidden}"
    mult = "-".join(str(m) for m in net.channel_mult)
    attn = ",".join(str(r) for r in net.attn_resolutions) or "none"
    return f"UNet {net.model_channels}ch ({mult}), {net.num_res_blocks} res, attn {attn}, drop {net.dropout}"


def hyperparameter_table() -> str:
    """A Markdown table of the presets (the README copies it; a test checks they agree)."""
    header = ("| preset | data | network | params | path (a, c, T) | batch (micro) | lr | warm-up images "
              "| steps | EMA half-life (images) | label dropout | grad clip |")
    rows = [header, "|" + "---|" * 12]
    for name, cfg in PRESETS.items():
        is_image = isinstance(cfg.net, UNetConfig)
        shape = f"{cfg.net.image_channels}x{cfg.net.resolution}²" if is_image else "2-D"
        path = f"{cfg.path.kind} ({cfg.path.kac_a:g}, {cfg.path.kac_c:g}, {cfg.path.T:g})"
        rows.append(f"| {name} | {cfg.data.name} {shape} | {describe_net(cfg.net)} | "
                    f"{config_parameter_count(cfg.net) / 1e6:.2f}M | {path} | {cfg.train.batch} "
                    f"({cfg.train.micro_batch}) | {cfg.optim.lr:g} | {cfg.optim.warmup_images:,} | "
                    f"{cfg.train.steps:,} | {cfg.train.ema_halflife_images:,.0f} | "
                    f"{cfg.train.label_dropout:g} | {cfg.optim.grad_clip:g} |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- distillation presets

_PLAN = (100, 20, 4, 2, 1)


def _image_distill(guidance: float, preview_num: int) -> DistillConfig:
    """The CIFAR-10 / CelebA 64 distillation (32x32 and 64x64 ADM UNets)."""
    return DistillConfig(
        plan=_PLAN, guidance=guidance, start_states="rollout", target="ab2-carried", steps_per_stage=50_000,
        closeness_samples=256,
        optim=OptimConfig(lr=1e-4, warmup_images=64_000),
        train=TrainConfig(batch=128, micro_batch=32, ema_halflife_images=500_000.0, ema_rampup=0.05, log_every=100,
                          ckpt_every=5000, sample_every=5000, preview_num=preview_num))


# Roll-out start states with the carried AB-2 target (docs/ablations.md: every digits student improves, and
# none differs from its teacher any more); toy2d keeps the paper's forward-noised data (not measured).
DISTILL_PRESETS: dict[str, DistillConfig] = {
    # Sized for 2 CPU cores: the four stages of 100 -> 1 step together take about 6 minutes.
    "digits": DistillConfig(
        plan=_PLAN, guidance=0.25, start_states="rollout", target="ab2-carried", steps_per_stage=(80, 200, 300, 300),
        closeness_samples=200,
        optim=OptimConfig(lr=5e-4, warmup_images=0),
        train=TrainConfig(batch=64, micro_batch=64, ema_halflife_images=1000.0, ema_rampup=None, log_every=20,
                          ckpt_every=120, sample_every=240, preview_num=100)),
    "toy2d": DistillConfig(
        plan=(50, 10, 2, 1), guidance=0.0, steps_per_stage=300, closeness_samples=1000,
        optim=OptimConfig(lr=1e-3, warmup_images=0),
        train=TrainConfig(batch=256, micro_batch=256, ema_halflife_images=5000.0, ema_rampup=None, log_every=50,
                          ckpt_every=150, sample_every=300, preview_num=2000)),
    # Image presets follow the teacher recipes (method.md §5) at a progressive-distillation length.
    "cifar10": _image_distill(guidance=1.0, preview_num=100),
    "celeba64": _image_distill(guidance=0.0, preview_num=64),
    "lsun-bedroom256": DistillConfig(
        plan=_PLAN, guidance=0.0, start_states="rollout", target="ab2-carried", steps_per_stage=50_000,
        closeness_samples=64,
        optim=OptimConfig(lr=2e-5, warmup_images=32_000),
        train=TrainConfig(batch=64, micro_batch=8, ema_halflife_images=250_000.0, ema_rampup=0.05, log_every=100,
                          ckpt_every=5000, sample_every=10_000)),
}
"""Distillation configs per teacher preset (keyed like ``PRESETS``; use :func:`get_distill_preset`)."""


def preset_key(data: DataConfig) -> str:
    """The DISTILL_PRESETS key of a teacher trained on ``data`` (image folders: the preset of their recipe,
    :func:`recipe_for_resolution`)."""
    if data.name in DISTILL_PRESETS:
        return data.name
    if data.name == "folder" and isinstance(data.resolution, int) and data.resolution > 0:
        return recipe_for_resolution(data.resolution)
    raise DistillKacError(f"--preset: no distillation preset for the teacher's data {data.name!r} "
                          f"(resolution {data.resolution}); choose one of {', '.join(DISTILL_PRESETS)}")


def distill_preset_for(data: DataConfig, num_classes: int) -> DistillConfig:
    """The distillation config of a teacher trained on ``data`` with ``num_classes`` classes: the preset of
    :func:`preset_key`; a teacher on an image folder bakes in guidance w = 1 when it is class-conditional
    and none when it is not."""
    config = get_distill_preset(preset_key(data))
    if data.name == "folder":
        config.guidance = 1.0 if num_classes else 0.0
    return config


def get_distill_preset(name: str) -> DistillConfig:
    """A private copy of distillation preset ``name``."""
    if name not in DISTILL_PRESETS:
        raise DistillKacError(f"--preset: unknown distillation preset {name!r}; "
                              f"choose one of {', '.join(DISTILL_PRESETS)}")
    return copy.deepcopy(DISTILL_PRESETS[name])
