"""Generator-driven random draws; nothing here touches the global RNG.

A ``GeneratorLike`` is one ``torch.Generator`` for a whole batch, a sequence of generators (one per
batch row), or a :class:`SeedStream`: one counter-based stream per batch row, so that a row (an image)
depends on its own seed only, never on the batch it is drawn in, and a whole batch is drawn in a few
vectorised kernels instead of a Python loop over rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence

import torch

_MASK32 = 0xFFFFFFFF
# Philox-4x32 constants (Salmon, Moraes, Dror & Shaw, SC'11): round multipliers and Weyl key increments.
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo(a: torch.Tensor, multiplier: int, high: torch.Tensor, low: torch.Tensor,
             scratch: torch.Tensor) -> None:
    """``high, low <-`` the high and low 32-bit words of ``a * multiplier`` (``a < 2**32 <= 2 * multiplier``).

    The 64-bit product would overflow int64, so it is split as ``a·(m - 2³¹) + (a & 1)·2³¹ + (a >> 1)·2³²``:
    the first two terms stay below ``2⁶³ - 2³²`` and the last one only adds ``a >> 1`` to the high word.
    Every intermediate fits in int64, so the result is exact on every device (no reliance on wrap-around).
    Written into preallocated tensors: a fresh multi-megabyte tensor per operation costs more on a CPU
    than the operation itself.
    """
    torch.mul(a, multiplier - (1 << 31), out=low)
    torch.bitwise_and(a, 1, out=scratch).bitwise_left_shift_(31)
    low += scratch
    torch.bitwise_right_shift(low, 32, out=high)
    torch.bitwise_right_shift(a, 1, out=scratch)
    high += scratch
    low &= _MASK32


def philox4x32(counter: Sequence[torch.Tensor | int], key: Sequence[torch.Tensor | int],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 (Random123): four 32-bit counter words and two key words -> four random 32-bit words.

    Words are int64 tensors holding values in ``[0, 2**32)``; counters and keys broadcast against each
    other. With 10 rounds this is Random123's ``philox4x32_10`` (checked against its known answers).
    """
    device = next((word.device for word in (*counter, *key) if isinstance(word, torch.Tensor)), None)
    counter, key = ([torch.as_tensor(word, dtype=torch.int64, device=device) for word in words]
                    for words in (counter, key))
    c0, c1, c2, c3 = (word.contiguous().clone() for word in torch.broadcast_tensors(*counter, *key)[:4])
    k0, k1 = key
    high0, low0, high1, low1, scratch = (torch.empty_like(c0) for _ in range(5))
    for _ in range(rounds):
        _mulhilo(c0, _PHILOX_M0, high0, low0, scratch)
        _mulhilo(c2, _PHILOX_M1, high1, low1, scratch)
        high1 ^= c1
        high1 ^= k0
        high0 ^= c3
        high0 ^= k1
        # New state (high1, low1, high0, low0); the old state's tensors become the next round's outputs.
        c0, c1, c2, c3, high0, low0, high1, low1 = high1, low1, high0, low0, c0, c1, c2, c3
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def unit_interval(field: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(field + 1/2) / 2**bits`` for ``field < 2**bits``: uniform on the open interval (0, 1), exact in
    ``dtype`` when ``bits`` is below its mantissa (23 for float32, 52 for float64)."""
    return (field.to(dtype) + 0.5) * 2.0**-bits


def uniform_bits(dtype: torch.dtype) -> int:
    """Bits of one uniform in ``dtype``: 52 for float64, else 23 (float32, then cast)."""
    return 52 if dtype == torch.float64 else 23


class SeedStream:
    """Per-row counter-based random streams (EDM-style per-image seeds, drawn in one batch).

    Block ``b`` at counter ``e`` of draw ``d`` in row ``i`` is Philox-4x32-10 of the counter words
    ``(e, b, d, 0)`` under the key ``seeds[i] mod 2**64``: four random 32-bit words that are a pure
    function of the row's seed and of positions within the row, so a row's values never depend on the
    batch. The Kac sampler gives every coordinate its own counter ``e`` (and as many blocks as it needs);
    :meth:`uniforms` and :meth:`normals` pack two to four values into a block. ``d`` counts the draws
    taken from the stream (like a generator's state): successive draws differ. Rows must have fewer than
    ``2**32`` counters.
    """

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu") -> None:
        seeds = [int(seed) for seed in seeds]
        if not seeds:
            raise ValueError("seeds: need at least one seed")
        self.device = torch.device(device)
        self.seeds = seeds
        self.key = torch.tensor([[seed & _MASK32, (seed >> 32) & _MASK32] for seed in seeds],
                                dtype=torch.int64, device=self.device)
        self.draws = 0

    def __len__(self) -> int:
        return len(self.seeds)

    def next_draw(self) -> int:
        """The index of a new draw (each draw uses counters no other draw of this stream uses)."""
        draw, self.draws = self.draws, self.draws + 1
        return draw

    def check_rows(self, rows: int) -> None:
        if rows != len(self):
            raise ValueError(f"generator: got a SeedStream of {len(self)} seeds for a batch of {rows} rows")

    def words(self, draw: int, elements: torch.Tensor, block: int, rows: torch.Tensor | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """The four words of ``block`` at element indices ``elements`` of the rows (seed indices) ``rows``,
        broadcast together (``rows=None``: every row, as ``[B, 1]``; so ``elements`` ``[M]`` gives ``[B, M]``)."""
        key = self.key.to(device or self.device)
        k0, k1 = (key[:, 0:1], key[:, 1:2]) if rows is None else (key[rows, 0], key[rows, 1])
        return philox4x32((elements, block, draw, 0), (k0, k1))

    def fields(self, draw: int, widths: Sequence[int], first_block: int, elements: torch.Tensor,
               rows: torch.Tensor | None = None, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Bit fields of the given widths cut, in order, from the concatenated words of consecutive blocks
        (as many blocks as the widths need, 128 bits each); a field may span two words."""
        total = sum(widths)
        words: list[torch.Tensor] = []
        for block in range(first_block, first_block + math.ceil(total / 128)):
            words.extend(self.words(draw, elements, block, rows, device))
        fields, offset = [], 0
        for width in widths:
            value = None
            while width:
                used = offset % 32
                take = min(32 - used, width)
                chunk = (words[offset // 32] >> (32 - used - take)) & ((1 << take) - 1)
                value = chunk if value is None else (value << take) | chunk
                offset, width = offset + take, width - take
            fields.append(value)
        return fields

    def uniforms(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Uniforms on (0, 1) of ``shape`` (``[B, ...]``): 23-bit (float32) or 52-bit (float64) values,
        four or two per Philox block, from one new draw."""
        self.check_rows(shape[0])
        device = torch.device(device or self.device)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        bits = uniform_bits(work)
        per_row = math.prod(shape[1:])
        per_word = 2 if bits > 32 else 1
        blocks = torch.arange(math.ceil(per_row * per_word / 4), device=device)
        words = torch.stack(self.words(self.next_draw(), blocks, 0, device=device), dim=-1)
        words = words.reshape(shape[0], -1)[:, :per_row * per_word]
        if per_word == 2:
            field = ((words[:, 0::2] >> 6) << 26) | (words[:, 1::2] >> 6)
        else:
            field = words >> 9
        return unit_interval(field, bits, work).reshape(shape).to(dtype)

    def normals(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
        """Standard normals of ``shape`` by Box–Muller: uniform pairs ``(u, v)`` give ``r cos θ, r sin θ``
        with ``r = sqrt(-2 log u)``, ``θ = 2π v``; the pairs fill each row in order."""
        per_row = math.prod(shape[1:])
        pairs = math.ceil(per_row / 2)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        u = self.uniforms((shape[0], pairs, 2), work, device)
        first, second = box_muller(u[..., 0], u[..., 1])
        normal = torch.stack((first, second), dim=-1).reshape(shape[0], -1)[:, :per_row]
        return normal.reshape(shape).to(dtype)


def box_muller(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard normals from two independent uniforms on (0, 1)."""
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = (2.0 * math.pi) * v
    return radius * torch.cos(angle), radius * torch.sin(angle)


GeneratorLike = torch.Generator | Sequence[torch.Generator] | SeedStream | None
"""``None`` means a fresh generator seeded from OS entropy (never the global RNG)."""


def fresh_generator(device="cpu") -> torch.Generator:
    """A generator seeded from OS entropy: used where the caller passed none, so the global RNG stays untouched."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _device_of(generator: GeneratorLike, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(generator, (torch.Generator, SeedStream)):
        return generator.device
    if generator:
        return generator[0].device
    return torch.device("cpu")


def _draw(torch_draw: Callable[..., torch.Tensor], stream_draw: Callable[..., torch.Tensor], shape,
          generator: GeneratorLike, dtype, device) -> torch.Tensor:
    """``stream_draw`` from a SeedStream, else ``torch_draw`` (torch.rand or torch.randn) from one generator
    for the batch or one per row."""
    dev = _device_of(generator, device)
    shape = tuple(shape)
    if isinstance(generator, SeedStream):
        return stream_draw(generator, shape, dtype, dev)
    generator = fresh_generator(dev) if generator is None else generator
    if isinstance(generator, torch.Generator):
        return torch_draw(shape, generator=generator, dtype=dtype, device=dev)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: got {len(generator)} generators for a batch of {shape[0]} rows")
    return torch.cat([torch_draw((1, *shape[1:]), generator=g, dtype=dtype, device=dev) for g in generator])


def rand(shape, generator: GeneratorLike = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniform draws on [0, 1) ((0, 1) from a SeedStream)."""
    return _draw(torch.rand, SeedStream.uniforms, shape, generator, dtype, device)


def randn(shape, generator: GeneratorLike = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal draws."""
    return _draw(torch.randn, SeedStream.normals, shape, generator, dtype, device)


def _elementwise(op, param: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    if isinstance(generator, SeedStream):
        raise TypeError("a SeedStream has no torch.poisson/_standard_gamma; draw Kac noise with KacProcess.sample")
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


# ----------------------------------------------------------------- exact transforms of given uniforms

def poisson_cap(rate: torch.Tensor) -> torch.Tensor:
    """``R(λ) = ⌈λ + 10√λ + 45⌉``: ``P(N > R(λ)) < 2⁻⁶⁴`` for ``N ~ Poisson(λ)``, every ``λ ≤ 10⁴`` (tested)."""
    return torch.ceil(rate + 10.0 * torch.sqrt(rate) + 45.0).to(torch.int64)


def poisson_inverse(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Poisson counts by inversion: row ``i`` of ``u`` (``[B, M]``, uniforms on (0, 1)) against the CDF of
    Poisson(``rate[i]``) (``rate``: ``[B]``), i.e. the smallest ``k`` with ``F(k) >= u``, capped at ``R(λ)``.

    The CDF is a float64 table built on the CPU for ``k < R(λ)`` (pmf ``exp(k log λ - λ - log k!)``,
    summed in order), padded with ``+inf`` so each row stops at its own cap whatever the batch's widest
    row: the result depends on the row's own rate and uniforms only. It differs from exact inversion
    only when ``N > R(λ)`` (probability < 2⁻⁶⁴) or where the table's rounding (a few 1e-16, absolute)
    moves a boundary; with uniforms on a grid of ``2⁻ᵇ`` each probability is exact to ``2⁻ᵇ``
    (``b`` = 32 for float32 Kac draws, 52 for float64). Memory and time grow like ``B · R(max λ)``.
    """
    lam = rate.detach().to("cpu", torch.float64).reshape(-1, 1)
    cap = poisson_cap(lam)
    k = torch.arange(int(cap.max()), dtype=torch.float64)
    log_pmf = torch.xlogy(k, lam) - lam - torch.lgamma(k + 1)
    table = torch.cumsum(torch.exp(log_pmf), dim=1)
    table = torch.where(k < cap, table, torch.full_like(table, math.inf)).to(u.device)
    return torch.searchsorted(table, u.to(torch.float64).contiguous())


def marsaglia_tsang(shape_param: torch.Tensor, normal: torch.Tensor,
                    uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Marsaglia–Tsang (2000) attempt at Gamma(k, 1), ``k >= 1``: ``(d·v, accepted)``.

    ``d = k - 1/3``, ``v = (1 + z/√(9d))³``; accept iff ``v > 0`` and ``log u < z²/2 + d - d v + d log v``.
    The accepted values are exactly Gamma(k)-distributed; rejected ones must be redrawn.
    """
    d = shape_param - 1.0 / 3.0
    cube = (1.0 + normal * torch.rsqrt(9.0 * d)) ** 3
    positive = cube > 0
    cube = torch.where(positive, cube, torch.ones_like(cube))
    accepted = positive & (torch.log(uniform) < 0.5 * normal * normal + d - d * cube + d * torch.log(cube))
    return d * cube, accepted


def seeded_generators(seeds: Sequence[int], device="cpu") -> SeedStream:
    """One random stream per image seed (EDM-style per-image seeds), drawn as one batch: a SeedStream."""
    return SeedStream(seeds, device)
