"""Class-conditional UNet (ADM / DDPM++ family) predicting the velocity ``u(x, t, y)``.

Layout (Dhariwal & Nichol's ADM, with DDPM's CIFAR-10 sizes as the reference): an input conv, a
down path of ``num_res_blocks`` residual blocks per level with a strided-conv down-sampling between
levels, a middle (res, attention, res), an up path of ``num_res_blocks + 1`` residual blocks per
level that each take one skip tensor from the down path, nearest up-sampling + conv between levels,
and GroupNorm -> SiLU -> a zero-initialised conv at the output (so a fresh network predicts 0).

Conditioning: ``emb = MLP(sinusoid(t * time_scale)) + label_table[y]`` where the label table has
``num_classes + 1`` rows, the last one the learned null label (classifier-free guidance and label
dropout, method.md section 2-3).  Every residual block applies it as adaptive GroupNorm,
``norm(h) * (1 + scale) + shift``.  Self-attention (multi-head, ``scaled_dot_product_attention``)
runs at the feature-map resolutions listed in ``attn_resolutions``, in all three paths.

Shared pieces used by the MLP too (time embedding, input checks, initialisation) live here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkac.errors import DistillKacError
from distillkac.fields import dataclass_from_dict, is_int, is_number, require
from distillkac.rng import fresh_generator

MAX_PERIOD = 10_000.0
"""Longest period of the sinusoidal time features (in scaled time units)."""
TIME_SCALE = 1000.0
"""The networks' default ``time_scale``: ``1000/T`` for ``T = 1`` (see :func:`sinusoidal_embedding`)."""


class JsonConfig:
    """JSON round trip of a network config dataclass (which defines ``validate``), and the checks of the
    fields every network config has."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The validated config from its ``to_dict()`` form (lists become tuples; unknown fields refused)."""
        config = dataclass_from_dict(cls, data, cls.__name__)
        config.validate()
        return config

    def _require_positive_ints(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            require(is_int(value) and value > 0, f"{type(self).__name__}.{field}", "must be a positive integer", value)

    def _validate_conditioning(self) -> None:
        name = type(self).__name__
        require(is_number(self.dropout) and 0.0 <= self.dropout < 1.0, f"{name}.dropout", "must be in [0, 1)",
                self.dropout)
        require(is_int(self.num_classes) and self.num_classes >= 0, f"{name}.num_classes",
                "must be an integer >= 0 (0 = unconditional)", self.num_classes)
        require(is_number(self.time_scale) and self.time_scale > 0, f"{name}.time_scale", "must be a positive number",
                self.time_scale)


#: Which layers start at exactly zero: the output conv only, or also the last layer of every residual
#: branch and attention projection (ADM/EDM), so that every block starts as the identity.
ZERO_INITS = ("output", "residual")


@dataclass
class UNetConfig(JsonConfig):
    """Architecture of the image UNet; ``to_dict``/``from_dict`` round-trip through JSON.
    ``zero_init`` is one of :data:`ZERO_INITS`."""

    kind: str = "unet"
    image_channels: int = 3
    resolution: int = 32
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int = 10
    num_heads: int = 4
    time_scale: float = TIME_SCALE
    groups: int = 32
    zero_init: str = "output"

    def feature_resolutions(self) -> tuple[int, ...]:
        """The feature-map side length at each level of the down path (``resolution / 2**level``)."""
        return tuple(self.resolution // 2**level for level in range(len(self.channel_mult)))

    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * mult for mult in self.channel_mult)

    def validate(self) -> None:
        """Raise DistillKacError (one line, naming the field) for a config that cannot build a UNet."""
        name = "UNetConfig"
        require(self.kind == "unet", f"{name}.kind", "must be 'unet'", self.kind)
        self._require_positive_ints("image_channels", "model_channels")
        require(isinstance(self.channel_mult, tuple) and len(self.channel_mult) > 0
                and all(is_int(m) and m > 0 for m in self.channel_mult),
                f"{name}.channel_mult", "must be a non-empty tuple of positive integers", self.channel_mult)
        self._require_positive_ints("num_res_blocks")
        factor = 2 ** (len(self.channel_mult) - 1)
        require(is_int(self.resolution) and self.resolution > 0 and self.resolution % factor == 0,
                f"{name}.resolution", f"must be a positive multiple of 2**(len(channel_mult)-1) = {factor}",
                self.resolution)
        require(isinstance(self.attn_resolutions, tuple) and all(is_int(r) for r in self.attn_resolutions),
                f"{name}.attn_resolutions", "must be a tuple of integers", self.attn_resolutions)
        missing = sorted(set(self.attn_resolutions) - set(self.feature_resolutions()))
        if missing:
            raise DistillKacError(f"{name}.attn_resolutions: {missing} never occur; the feature-map resolutions "
                                  f"are {list(self.feature_resolutions())}")
        self._validate_conditioning()
        self._require_positive_ints("groups")
        bad = [c for c in self.level_channels() if c % self.groups]
        if bad:
            raise DistillKacError(f"{name}.groups: {self.groups} must divide every channel count "
                                  f"{list(self.level_channels())}; it does not divide {bad}")
        require(self.zero_init in ZERO_INITS, f"{name}.zero_init", f"must be one of {', '.join(ZERO_INITS)}",
                self.zero_init)
        self._require_positive_ints("num_heads")
        attn_channels = [c for c, r in zip(self.level_channels(), self.feature_resolutions())
                         if r in self.attn_resolutions] + [self.level_channels()[-1]]
        bad = [c for c in attn_channels if c % self.num_heads]
        if bad:
            raise DistillKacError(f"{name}.num_heads: {self.num_heads} must divide the channels of every attention "
                                  f"layer {attn_channels}; it does not divide {bad}")

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.resolution, self.resolution)


# ---------------------------------------------------------------------------------------------
# Pieces shared with the MLP


def sinusoidal_embedding(t: torch.Tensor, dim: int, time_scale: float) -> torch.Tensor:
    """``[cos(s·f_k), sin(s·f_k)]`` with ``s = t·time_scale`` and ``f_k = MAX_PERIOD**(-k/half)``.

    With the default ``time_scale = 1000/T`` the scaled time spans 0..1000, the range the
    frequencies were designed for (method.md section 2: the network must see a well-scaled time).
    Computed in float32 whatever the dtype of ``t``; an odd ``dim`` gets a zero last feature.
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(MAX_PERIOD) * exponents)
    angles = (t.to(torch.float32) * time_scale)[:, None] * frequencies[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        features = F.pad(features, (0, 1))
    return features


class ConditionEmbedding(nn.Module):
    """``MLP(sinusoid(t·time_scale)) + label_table[y]``; the table's last row is the learned null label."""

    def __init__(self, frequency_dim: int, embed_dim: int, num_classes: int, time_scale: float) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.time_mlp = nn.Sequential(nn.Linear(frequency_dim, embed_dim), nn.SiLU(),
                                      nn.Linear(embed_dim, embed_dim))
        self.label_table = nn.Embedding(num_classes + 1, embed_dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim, self.time_scale)
        return self.time_mlp(features) + self.label_table(y)


def check_conditioning(t: torch.Tensor, y: torch.Tensor, batch: int, null_label: int) -> None:
    """Shape/dtype checks on ``t`` and ``y``; the label range check is skipped under torch.compile."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch,) or not t.is_floating_point():
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise DistillKacError(f"t: expected a float tensor of shape [{batch}], got {shape}")
    if (not isinstance(y, torch.Tensor) or tuple(y.shape) != (batch,) or y.is_floating_point()
            or y.is_complex() or y.dtype == torch.bool):
        shape = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise DistillKacError(f"y: expected an integer (long) tensor of shape [{batch}], got {shape}")
    if not torch.compiler.is_compiling() and batch > 0:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high > null_label:
            raise DistillKacError(f"y: labels must be in 0..{null_label} ({null_label} = null label), "
                                  f"got values in {low}..{high}")


def initialise_parameters(model: nn.Module, generator: torch.Generator,
                          zero_modules: Iterable[nn.Module]) -> None:
    """Draw every parameter from ``generator`` (never the global RNG).

    Convolutions and linear layers: Xavier-uniform weights and zero biases (the DDPM / DDPM++
    choice); embeddings: N(0, 1); norms: weight 1, bias 0; ``zero_modules``: all zeros.
    Raises if a parameter belongs to a layer type this does not know (it would stay uninitialised).
    """
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, generator=generator)
            elif isinstance(module, nn.GroupNorm | nn.LayerNorm):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            else:
                continue
            done.update(id(p) for p in module.parameters(recurse=False))
        for module in zero_modules:
            for parameter in module.parameters():
                parameter.zero_()
    left = [name for name, p in model.named_parameters() if id(p) not in done]
    if left:
        raise RuntimeError(f"initialise_parameters: no initialiser for {left}")


class ConfiguredNetwork(nn.Module):
    """Base of the velocity networks: validates ``config`` and keeps it with ``num_classes``, ``null_label``
    (= ``num_classes``) and ``data_shape``, then creates the layers (``_build``) on the meta device and
    allocates them on ``device`` and draws them from ``generator`` (``reset_parameters``).

    Building on meta skips PyTorch's default initialisation (which draws from the global RNG); with
    ``device="meta"`` nothing is allocated at all (used to count the parameters of huge configs).
    """

    def __init__(self, config: Any, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.num_classes = config.num_classes
        self.null_label = config.num_classes
        self.data_shape = config.data_shape
        with torch.device("meta"):
            self._build()
        target = torch.device(device if device is not None else "cpu")
        if target.type != "meta":
            self.to_empty(device=target)
            self.reset_parameters(generator if generator is not None else fresh_generator(target))

    def _build(self) -> None:
        """Create the layers (called under ``torch.device("meta")``); each network defines its own."""
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Draw every weight from ``generator``; each network defines its own."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# UNet blocks


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> adaptive GN (scale, shift from emb) -> SiLU -> dropout -> conv, plus skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float,
                 groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over the ``H·W`` positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, head_dim, height * width)
        q, k, v = (part.transpose(-1, -2) for part in qkv.unbind(dim=1))  # [B, heads, HW, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Stage(nn.Module):
    """One residual block, optionally followed by attention and by a 2x nearest up-sampling + conv."""

    def __init__(self, res: ResBlock, attention: AttentionBlock | None,
                 upsample_channels: int | None) -> None:
        super().__init__()
        self.res = res
        self.attention = attention
        self.upsample = (nn.Conv2d(upsample_channels, upsample_channels, 3, padding=1)
                         if upsample_channels is not None else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        if self.attention is not None:
            h = self.attention(h)
        if self.upsample is not None:
            h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class UNet(ConfiguredNetwork):
    """``model(x [B,C,H,W], t [B], y [B]) -> velocity [B,C,H,W]`` (same dtype as ``x``).

    ``y`` holds labels ``0..num_classes-1`` or the null label ``num_classes``; an unconditional
    model (``num_classes = 0``) takes all-zero (null) labels.  ``generator`` draws the initial
    weights (a fresh OS-seeded one if None); ``device="meta"`` builds without allocating.
    """

    config: UNetConfig

    def _build(self) -> None:
        cfg = self.config
        embed_dim = 4 * cfg.model_channels
        self.embedding = ConditionEmbedding(cfg.model_channels, embed_dim, cfg.num_classes, cfg.time_scale)
        self.input_conv = nn.Conv2d(cfg.image_channels, cfg.model_channels, 3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, cfg.dropout, cfg.groups)

        def attention(channels: int, resolution: int) -> AttentionBlock | None:
            if resolution not in cfg.attn_resolutions:
                return None
            return AttentionBlock(channels, cfg.num_heads, cfg.groups)

        levels = list(zip(cfg.level_channels(), cfg.feature_resolutions()))
        self.down = nn.ModuleList()
        skip_channels = [cfg.model_channels]
        channels = cfg.model_channels
        for level, (out_channels, resolution) in enumerate(levels):
            for _ in range(cfg.num_res_blocks):
                block = res(channels, out_channels)
                self.down.append(Stage(block, attention(out_channels, resolution), None))
                channels = out_channels
                skip_channels.append(channels)
            if level < len(levels) - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)

        self.middle = nn.ModuleList([res(channels, channels),
                                     AttentionBlock(channels, cfg.num_heads, cfg.groups),
                                     res(channels, channels)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(levels))):
            out_channels, resolution = levels[level]
            for block in range(cfg.num_res_blocks + 1):
                upsample = out_channels if level > 0 and block == cfg.num_res_blocks else None
                self.up.append(Stage(res(channels + skip_channels.pop(), out_channels),
                                     attention(out_channels, resolution), upsample))
                channels = out_channels

        self.out_norm = nn.GroupNorm(cfg.groups, channels)
        self.out_conv = nn.Conv2d(channels, cfg.image_channels, 3, padding=1)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-draw all weights from ``generator``; the output conv starts at exactly zero (with
        ``zero_init="residual"`` also each residual block's last conv and each attention projection)."""
        zero: list[nn.Module] = [self.out_conv]
        if self.config.zero_init == "residual":
            zero += [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
            zero += [m.proj for m in self.modules() if isinstance(m, AttentionBlock)]
        initialise_parameters(self, generator, zero_modules=zero)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != self.data_shape:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            expected = ", ".join(map(str, self.data_shape))
            raise DistillKacError(f"x: expected shape [B, {expected}], got {shape}")
        check_conditioning(t, y, x.shape[0], self.null_label)
        emb = self.embedding(t, y)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        middle_in, middle_attention, middle_out = self.middle
        h = middle_out(middle_attention(middle_in(h, emb)), emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)

