"""Generator-driven random draws; nothing here touches the global RNG.

A ``GeneratorLike`` is either one ``torch.Generator`` for a whole batch, or a sequence of generators,
one per batch row (per-image seeds, so that an image does not depend on the batch it is drawn in).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None
"""``None`` means a fresh generator seeded from OS entropy (never the global RNG)."""


def fresh_generator(device="cpu") -> torch.Generator:
    """A generator seeded from OS entropy: used where the caller passed none, so the global RNG stays untouched."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _per_row(draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor],
             shape: tuple[int, ...], generator: GeneratorLike) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return draw(shape, generator)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: got {len(generator)} generators for a batch of {shape[0]} rows")
    return torch.cat([draw((1, *shape[1:]), g) for g in generator])


def _device_of(generator: GeneratorLike, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(generator, torch.Generator):
        return generator.device
    if generator:
        return generator[0].device
    return torch.device("cpu")


def rand(shape, generator: GeneratorLike = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniform draws on [0, 1)."""
    dev = _device_of(generator, device)
    generator = fresh_generator(dev) if generator is None else generator
    return _per_row(lambda s, g: torch.rand(s, generator=g, dtype=dtype, device=dev), tuple(shape), generator)


def randn(shape, generator: GeneratorLike = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal draws."""
    dev = _device_of(generator, device)
    generator = fresh_generator(dev) if generator is None else generator
    return _per_row(lambda s, g: torch.randn(s, generator=g, dtype=dtype, device=dev), tuple(shape), generator)


def _elementwise(op, param: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    param = param.contiguous()
    generator = fresh_generator(param.device) if generator is None else generator
    if isinstance(generator, torch.Generator):
        return op(param, generator=generator)
    if len(generator) != param.shape[0]:
        raise ValueError(f"generator: got {len(generator)} generators for a batch of {param.shape[0]} rows")
    return torch.cat([op(param[i:i + 1], generator=g) for i, g in enumerate(generator)])


def poisson(rate: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """Poisson draws with the given (already broadcast) rates."""
    return _elementwise(torch.poisson, rate, generator)


def standard_gamma(shape_param: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """Gamma(k, 1) draws for the (already broadcast) shape parameters k > 0."""
    return _elementwise(torch._standard_gamma, shape_param, generator)


def seeded_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per image seed (EDM-style per-image seeds)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
