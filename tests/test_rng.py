"""The counter-based per-image streams (distillkac.rng.SeedStream) and the exact transforms they feed."""

import math

import pytest
import torch
from scipy import stats

from distillkac import rng
from distillkac.paths import build_path
from distillkac.rng import SeedStream

F64 = torch.float64
KS_CRITICAL_1PCT = 1.628  # sqrt(n)·D at the 1% level (Kolmogorov distribution)

# Random123's published known answers for philox4x32_10: (counter, key) -> output.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KNOWN_ANSWERS)
def test_philox_matches_random123(counter, key, expected):
    assert tuple(int(word) for word in rng.philox4x32(counter, key)) == expected


def test_philox_is_elementwise_and_broadcasts():
    counters = torch.arange(6).reshape(2, 3) * 0x10001
    batch = rng.philox4x32((counters, 5, 7, 0), (torch.tensor([[1], [2]]), 3))
    for i in range(2):
        for j in range(3):
            alone = rng.philox4x32((int(counters[i, j]), 5, 7, 0), (i + 1, 3))
            assert [int(word[i, j]) for word in batch] == [int(word) for word in alone]


@pytest.mark.parametrize("rate", [0.0, 0.5, 9.0, 25.0, 300.0])
def test_poisson_inversion_is_exact_on_a_uniform_grid(rate):
    """With u on the midpoint grid (i + 1/2)/N, inversion puts N·P(N = k) ± 1 points on each k."""
    count = 1 << 16
    u = (torch.arange(count, dtype=F64) + 0.5) / count
    flips = rng.poisson_inverse(torch.tensor([rate], dtype=F64), u[None])[0]
    observed = torch.bincount(flips).double()
    expected = torch.as_tensor(stats.poisson.pmf(range(observed.numel()), rate), dtype=F64) * count
    assert (observed - expected).abs().max().item() <= 1.0 + 1e-9 * count
    assert int(flips.max()) <= int(rng.poisson_cap(torch.tensor(rate, dtype=F64)))


def test_poisson_cap_bounds_the_truncation():
    rate = torch.cat([torch.linspace(0, 50, 501, dtype=F64), torch.linspace(50, 1e4, 2000, dtype=F64)])
    tail = stats.poisson.sf(rng.poisson_cap(rate).numpy(), rate.numpy())
    assert tail.max() < 2.0**-64


def test_poisson_rows_use_their_own_rate_only():
    u = torch.rand(4, 300, generator=torch.Generator().manual_seed(0), dtype=F64)
    rates = torch.tensor([0.0, 1.0, 9.0, 200.0], dtype=F64)
    batch = rng.poisson_inverse(rates, u)
    for row in range(4):
        assert torch.equal(batch[row], rng.poisson_inverse(rates[row:row + 1], u[row:row + 1])[0])


@pytest.mark.parametrize("shape_param", [1.0, 3.0, 12.0])
def test_marsaglia_tsang_accepted_draws_follow_the_gamma_law(shape_param):
    generator = torch.Generator().manual_seed(int(shape_param))
    count = 40_000
    normal = torch.randn(count, generator=generator, dtype=F64)
    uniform = torch.rand(count, generator=generator, dtype=F64)
    value, accepted = rng.marsaglia_tsang(torch.full((count,), shape_param, dtype=F64), normal, uniform)
    assert accepted.double().mean().item() > 0.9  # the method's acceptance rate is above 0.95 for k >= 1
    kept = torch.sort(value[accepted]).values.numpy()
    distance = stats.kstest(kept, stats.gamma(shape_param).cdf).statistic
    assert math.sqrt(kept.size) * distance < KS_CRITICAL_1PCT


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stream_uniforms_and_normals(dtype):
    stream = SeedStream(range(500))
    u = rng.rand((500, 7), stream, dtype=dtype)
    z = rng.randn((500, 7), stream, dtype=dtype)
    assert u.dtype == z.dtype == dtype and u.shape == z.shape == (500, 7)
    assert bool(((u > 0) & (u < 1)).all())
    n = u.numel()
    assert abs(u.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert math.sqrt(n) * stats.kstest(u.double().flatten().numpy(), "uniform").statistic < KS_CRITICAL_1PCT
    assert math.sqrt(n) * stats.kstest(z.double().flatten().numpy(), "norm").statistic < KS_CRITICAL_1PCT
    # Neighbouring elements and neighbouring seeds are uncorrelated (5 standard errors).
    flat = z.double()
    for a, b in ((flat[:, :-1], flat[:, 1:]), (flat[:-1], flat[1:])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 5 / math.sqrt(a.numel())


def test_stream_rows_depend_on_their_seed_only():
    seeds = [11, 3, 2**40 + 5, 7]
    stream = SeedStream(seeds)
    u, z = rng.rand((4, 3, 5), stream), rng.randn((4, 9), stream)
    for row, seed in enumerate(seeds):
        alone = SeedStream([seed])
        assert torch.equal(rng.rand((1, 3, 5), alone)[0], u[row])
        assert torch.equal(rng.randn((1, 9), alone)[0], z[row])
    again = SeedStream(seeds)
    assert torch.equal(rng.rand((4, 3, 5), again), u)
    assert not torch.equal(rng.rand((4, 3, 5), again), u)  # the next draw is a new one
    assert not torch.equal(u[0], u[3])


def test_seeded_generators_is_a_stream_and_errors_are_clear():
    stream = rng.seeded_generators([1, 2])
    assert isinstance(stream, SeedStream) and len(stream) == 2
    with pytest.raises(ValueError, match="SeedStream of 2 seeds for a batch of 3 rows"):
        rng.rand((3, 4), stream)
    with pytest.raises(TypeError, match="KacProcess.sample"):
        rng.poisson(torch.ones(2, 3), stream)
    with pytest.raises(ValueError, match="at least one seed"):
        SeedStream([])


@pytest.mark.parametrize("kind", ["kac", "flow", "vp"])
def test_paths_draw_per_image_noise_from_a_stream(kind):
    path = build_path({"kind": kind})
    x0 = torch.rand((3, 2, 4, 4), generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0.2, 0.6, 1.0])
    batch = path.sample(x0, t, SeedStream([7, 8, 9]))
    prior = path.prior((3, 2, 4, 4), SeedStream([7, 8, 9]))
    for row, seed in enumerate((7, 8, 9)):
        alone = path.sample(x0[row:row + 1], t[row:row + 1], SeedStream([seed]))
        assert torch.equal(alone.x_t[0], batch.x_t[row]) and torch.equal(alone.target[0], batch.target[row])
        assert torch.equal(path.prior((1, 2, 4, 4), SeedStream([seed]))[0], prior[row])


def test_streams_keep_every_tensor_on_the_stream_device():
    """On the meta device, any CPU tensor mixed into the arithmetic would raise: the GPU path's check."""
    words = rng.philox4x32((torch.arange(6, device="meta"), 1, 2, 0), (torch.zeros(3, 1, dtype=torch.int64,
                                                                             device="meta"), 5))
    assert all(word.device.type == "meta" and word.shape == (3, 6) for word in words)
    stream = SeedStream(range(3), device="meta")
    assert rng.rand((3, 5), stream).device.type == "meta"
    assert rng.randn((3, 4), stream, dtype=F64).device.type == "meta"
