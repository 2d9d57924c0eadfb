"""Velocity networks: the class-conditional UNet for images and a residual MLP for 2-D data.

``build_network(cfg)`` takes a config dataclass or its JSON dict (with ``"kind"``);
``REFERENCE_CONFIGS`` holds the per-dataset architectures the presets copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distillkac.errors import DistillKacError
from distillkac.nets.mlp import MLP, MLPConfig
from distillkac.nets.unet import UNet, UNetConfig

NetworkConfig = UNetConfig | MLPConfig
Network = UNet | MLP

NETWORK_KINDS: dict[str, tuple[type, type]] = {"unet": (UNetConfig, UNet), "mlp": (MLPConfig, MLP)}
"""kind -> (config class, network class)."""

REFERENCE_CONFIGS: dict[str, NetworkConfig] = {
    "cifar10": UNetConfig(image_channels=3, resolution=32, model_channels=128, channel_mult=(1, 2, 2, 2),
                          num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_classes=10),
    "celeba64": UNetConfig(image_channels=3, resolution=64, model_channels=128, channel_mult=(1, 2, 2, 2),
                           num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_classes=0),
    "lsun-bedroom256": UNetConfig(image_channels=3, resolution=256, model_channels=128,
                                  channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                                  dropout=0.0, num_classes=0),
    "digits": UNetConfig(image_channels=1, resolution=8, model_channels=16, channel_mult=(1, 2),
                         num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_classes=10, num_heads=2,
                         groups=8),
    "toy2d": MLPConfig(dim=2, hidden=256, depth=4, num_classes=8),
}
"""Per-dataset architectures (time_scale 1000 = 1000/T for the default T = 1).

cifar10 / celeba64 / lsun-bedroom256 follow the DDPM / ADM UNets (38.3M / 38.3M / 118.8M parameters
here; AdaGN's scale-and-shift projections add ~2.6M to DDPM's 35.7M).  digits is sized for a CPU:
16 channels and one res block per level (0.19M parameters, ~3 GFLOP per forward+backward at batch 128);
64 channels with two blocks (4.3M) costs ~70 GFLOP, over a second per step on two CPU cores.
"""


def network_config_from_dict(data: dict[str, Any]) -> NetworkConfig:
    """Rebuild a config dataclass from its ``to_dict()`` form (e.g. read back from config.json)."""
    if not isinstance(data, dict):
        raise DistillKacError(f"net: expected a dict with a 'kind' field, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in NETWORK_KINDS:
        raise DistillKacError(f"net.kind: unknown network kind {kind!r}; "
                              f"valid kinds are {sorted(NETWORK_KINDS)}")
    return NETWORK_KINDS[kind][0].from_dict(data)


def build_network(cfg: NetworkConfig | dict[str, Any], generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Network:
    """The network for ``cfg``, weights drawn from ``generator`` (fresh OS-seeded one if None).

    ``device="meta"`` builds the module structure without allocating memory (parameter counts).
    """
    config = network_config_from_dict(cfg) if isinstance(cfg, dict) else cfg
    for config_class, network_class in NETWORK_KINDS.values():
        if isinstance(config, config_class):
            return network_class(config, generator=generator, device=device)
    raise DistillKacError(f"net: expected a config of kind {sorted(NETWORK_KINDS)} or its dict, "
                          f"got {type(config).__name__}")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded); works on meta-device models."""
    return sum(p.numel() for p in model.parameters())


def config_parameter_count(cfg: NetworkConfig | dict[str, Any]) -> int:
    """Parameter count of the network ``cfg`` describes, without allocating its weights."""
    return count_parameters(build_network(cfg, device="meta"))

