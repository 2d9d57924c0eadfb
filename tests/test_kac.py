"""The Kac process against its analytic law (method.md §1)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from distillkac import kac
from distillkac.kac import KacProcess
from distillkac.rng import SeedStream

F64 = torch.float64
CONSTANTS = [(9.0, 3.0), (25.0, 2.0), (1.0, 1.0)]
TIMES = [0.02, 0.3, 1.0]
DRAWS = 200_000
KS_CRITICAL_1PCT = 1.628  # sqrt(n)·D at the 1% level (Kolmogorov distribution)
GRID = 10_001


def _t(value):
    return torch.tensor([value], dtype=F64)


def _source(kind: str, seed: int):
    return torch.Generator().manual_seed(seed) if kind == "generator" else SeedStream([seed])


@pytest.mark.parametrize("source", ["generator", "stream"])
@pytest.mark.parametrize("a,c", CONSTANTS)
@pytest.mark.parametrize("t", TIMES)
def test_sampler_matches_the_analytic_law(a, c, t, source):
    kp = KacProcess(a, c)
    tau, is_atom = kp.sample(_t(t), (DRAWS,), _source(source, 7))
    _assert_matches_the_law(kp, t, tau[0], is_atom[0])


@pytest.mark.parametrize("t", [0.05, 1.0])
def test_stream_in_float32_over_many_seeds_matches_the_analytic_law(t):
    """The prior's setting: float32, one row per image seed, every row at the same time."""
    kp = KacProcess(9.0, 3.0)
    rows = 2000
    tau, is_atom = kp.sample(torch.full((rows,), t), (100,), SeedStream(range(rows)))
    assert tau.dtype == torch.float32
    ct = (kp.c * torch.tensor(t)).item()  # the cone's edge as computed in float32
    _assert_matches_the_law(kp, t, tau.double().flatten(), is_atom.flatten(), ct)


def _assert_matches_the_law(kp: KacProcess, t: float, x: torch.Tensor, atom: torch.Tensor,
                            ct: float | None = None) -> None:
    """Support, atoms, Kolmogorov–Smirnov against ``kp.cdf`` and the second moment of draws ``x`` of X_t."""
    a, c, draws = kp.a, kp.c, x.numel()
    ct = c * t if ct is None else ct
    assert bool((x.abs() <= ct).all())
    assert torch.equal(x.abs() == ct, atom)  # atoms are exactly the boundary draws
    # Atom fraction within 5 binomial standard deviations of e^{-at}.
    mass = math.exp(-a * t)
    assert abs(atom.double().mean().item() - mass) <= 5 * math.sqrt(mass * (1 - mass) / draws) + 1e-12
    # Kolmogorov–Smirnov on the continuous part against its conditional CDF, evaluated on a grid of
    # GRID points: D ≤ D_grid + (largest CDF increment between grid points), and we bound the latter too.
    inside = torch.sort(x[~atom]).values
    n = inside.numel()
    grid = torch.linspace(-ct, ct, GRID, dtype=F64)[1:-1]
    conditional = (kp.cdf(grid, _t(t)) - mass / 2) / (1 - mass)
    below = torch.searchsorted(inside, grid, right=True) / n
    strictly_below = torch.searchsorted(inside, grid, right=False) / n
    d_grid = max((below - conditional).abs().max().item(), (strictly_below - conditional).abs().max().item())
    increment = max(conditional[0].item(), conditional.diff().max().item(), 1 - conditional[-1].item())
    assert math.sqrt(n) * (d_grid + increment) < KS_CRITICAL_1PCT
    # Second moment within 5 standard errors of variance(t).
    squares = x**2
    standard_error = squares.std().item() / math.sqrt(draws)
    assert abs(squares.mean().item() - kp.variance(_t(t)).item()) < 5 * standard_error


def test_sampler_is_deterministic_and_leaves_the_global_rng_alone():
    kp = KacProcess()
    t = torch.tensor([0.1, 0.5, 1.0])
    state = torch.get_rng_state()
    first = kp.sample(t, (3, 4, 4), torch.Generator().manual_seed(3))
    second = kp.sample(t, (3, 4, 4), torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].shape == (3, 3, 4, 4) and first[0].dtype == torch.float32
    kp.sample(t, (8,))  # no generator: a fresh one, never the global RNG
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(3, 8, 8), (7,)])
def test_stream_rows_are_bit_exact_whatever_the_batch(dtype, shape):
    """A row depends on its seed and time only: not on the other rows, their times, or its position."""
    kp = KacProcess()
    t = torch.tensor([0.0, 0.01, 0.5, 1.0, 4.0], dtype=dtype)
    seeds = [4, 8, 15, 16, 23]
    tau, atom = kp.sample(t, shape, SeedStream(seeds))
    assert tau.dtype == dtype and tau.shape == (5, *shape)
    for row in range(5):
        alone, alone_atom = kp.sample(t[row:row + 1], shape, SeedStream([seeds[row]]))
        assert torch.equal(alone[0], tau[row]) and torch.equal(alone_atom[0], atom[row])
    order = [3, 0, 4, 2, 1]
    shuffled, _ = kp.sample(t[order], shape, SeedStream([seeds[i] for i in order]))
    assert torch.equal(shuffled, tau[order])
    assert torch.equal(tau.abs() == kp.c * t.reshape(-1, *([1] * len(shape))), atom)
    again = SeedStream(seeds)
    assert torch.equal(kp.sample(t, shape, again)[0], tau)
    assert not torch.equal(kp.sample(t, shape, again)[0], tau)  # a stream's next draw is a new one


def test_stream_chunks_do_not_change_the_draws(monkeypatch):
    kp = KacProcess()
    t = torch.linspace(0.0, 1.0, 9)
    whole = kp.sample(t, (4, 5), SeedStream(range(9)))
    monkeypatch.setitem(kac._STREAM_CHUNK, "cpu", 40)  # two rows of 20 coordinates per chunk
    chunked = kp.sample(t, (4, 5), SeedStream(range(9)))
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_per_row_generators_make_rows_independent_of_the_batch():
    kp = KacProcess()
    t = torch.tensor([0.2, 0.7, 1.0])
    batched, _ = kp.sample(t, (5,), [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    for row, seed in enumerate((10, 11, 12)):
        alone, _ = kp.sample(t[row:row + 1], (5,), [torch.Generator().manual_seed(seed)])
        assert torch.equal(batched[row], alone[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_is_deterministic_on_cuda():
    kp = KacProcess()
    t = torch.rand(4, device="cuda")
    draws = [kp.sample(t, (64,), torch.Generator("cuda").manual_seed(1))[0] for _ in range(2)]
    assert torch.equal(*draws)


@pytest.mark.parametrize("a,c", CONSTANTS)
@pytest.mark.parametrize("t", [0.05, 0.4, 1.5])
def test_density_and_atoms_integrate_to_one(a, c, t):
    kp = KacProcess(a, c)
    ct = c * t
    density = lambda x: kp.density(torch.tensor(x, dtype=F64), torch.tensor(t, dtype=F64)).item()  # noqa: E731
    area = sum(integrate.quad(density, lo, hi, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
               for lo, hi in ((-ct, 0.0), (0.0, ct)))
    assert abs(area + math.exp(-a * t) - 1) < 1e-8
    assert abs(kp.cdf(torch.tensor(ct, dtype=F64), torch.tensor(t, dtype=F64)).item() - 1) == 0
    edge = kp.cdf(torch.tensor(ct * (1 - 1e-14), dtype=F64), torch.tensor(t, dtype=F64)).item()
    assert abs(edge - (1 - math.exp(-a * t) / 2)) < 1e-12


@pytest.mark.parametrize("a,c", CONSTANTS)
def test_density_solves_the_telegrapher_equation(a, c):
    kp = KacProcess(a, c)
    h = 1e-3
    for t in (0.3, 0.8, 1.5):
        for fraction in (-0.7, -0.2, 0.1, 0.5, 0.85):
            x, tt = torch.tensor(fraction * c * t, dtype=F64), torch.tensor(t, dtype=F64)
            p = lambda dx, dt, x=x, tt=tt: kp.density(x + dx, tt + dt).item()  # noqa: E731
            p_tt = (p(0, h) - 2 * p(0, 0) + p(0, -h)) / h**2
            p_t = (p(0, h) - p(0, -h)) / (2 * h)
            p_xx = (p(h, 0) - 2 * p(0, 0) + p(-h, 0)) / h**2
            residual = p_tt + 2 * a * p_t - c**2 * p_xx
            scale = abs(p_tt) + abs(2 * a * p_t) + abs(c**2 * p_xx)
            assert abs(residual) <= 1e-4 * scale


@pytest.mark.parametrize("a,c", CONSTANTS)
def test_velocity_satisfies_the_continuity_equation(a, c):
    """∂_t P(X_t ≤ x) = -p(x, t)·v(x, t) for 0 < x < ct."""
    kp = KacProcess(a, c)
    h = 1e-4
    for t in (0.1, 0.6, 1.2):
        x = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=F64) * c * t
        tt = torch.full_like(x, t)
        dcdf_dt = (kp.cdf(x, tt + h) - kp.cdf(x, tt - h)) / (2 * h)
        flux = kp.density(x, tt) * kp.velocity(x, tt)
        # atol: the central difference's rounding floor, ~1e-15 (cdf rounding) / h.
        torch.testing.assert_close(dcdf_dt, -flux, rtol=1e-5, atol=1e-11)


def test_velocity_limits_and_bound():
    kp = KacProcess(9.0, 3.0)
    # Diffusion regime a·t ≫ 1, |x| ≪ ct: v → x/(2t), relative error O(1/(at)).
    for t in (20.0, 200.0):
        x = torch.tensor([0.5, 1.0], dtype=F64)
        v = kp.velocity(x, torch.tensor(t, dtype=F64))
        assert bool(((v / (x / (2 * t)) - 1).abs() < 1.0 / (9.0 * t)).all())
    # Near the cone |x| → ct: v → x/(t + 2/a).
    t = torch.tensor(0.4, dtype=F64)
    x = 3.0 * 0.4 * (1 - torch.tensor([1e-8, 1e-12], dtype=F64))
    torch.testing.assert_close(kp.velocity(x, t), x / (t + 2 / 9.0), rtol=1e-6, atol=0)
    # |v| < c inside, = c on the atoms.
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=F64) * 2
    x = (2 * torch.rand(64, 200, generator=g, dtype=F64) - 1) * 3.0 * t[:, None]
    assert bool((kp.velocity(x, t[:, None]).abs() < 3.0).all())
    t = torch.tensor(0.4, dtype=F64)
    edge = torch.tensor([-1.0, 1.0], dtype=F64) * (3.0 * t)
    torch.testing.assert_close(kp.velocity(edge, t),
                               torch.tensor([-3.0, 3.0], dtype=F64), rtol=0, atol=0)
    tau, atom = kp.sample(torch.tensor([0.05]), (1000,), torch.Generator().manual_seed(1))
    v = kp.velocity(tau, torch.tensor(0.05), is_atom=atom)
    assert torch.equal(v[atom].abs(), torch.full_like(v[atom], 3.0))


def test_numerically_safe_at_small_times_and_at_the_cone():
    kp = KacProcess(9.0, 3.0)
    for dtype in (torch.float32, F64):
        t = torch.tensor([0.0, 1e-12, 1e-6, 1e-3, 1.0], dtype=dtype)
        x = 3.0 * t * torch.tensor([0.0, 0.999999, -0.5, 1.0, 0.3], dtype=dtype)
        for value in (kp.density(x, t), kp.cdf(x, t), kp.velocity(x, t), kp.variance(t), kp.atom_mass(t)):
            assert bool(torch.isfinite(value).all()) and value.dtype == dtype
    # The variance series and the closed form agree where they meet.
    small, large = torch.tensor(0.99e-2 / 18, dtype=F64), torch.tensor(1.01e-2 / 18, dtype=F64)
    closed = lambda t: (9.0 / 9.0) * (t - (1 - torch.exp(-18 * t)) / 18)  # noqa: E731
    torch.testing.assert_close(kp.variance(small), closed(small), rtol=1e-9, atol=0)
    torch.testing.assert_close(kp.variance(large), closed(large), rtol=1e-9, atol=0)


def test_float32_agrees_with_float64():
    kp = KacProcess(9.0, 3.0)
    t = torch.linspace(0.05, 1.0, 20, dtype=F64)[:, None]
    x = torch.linspace(-0.95, 0.95, 30, dtype=F64)[None, :] * 3.0 * t
    for fn in (kp.density, kp.cdf, kp.velocity):
        torch.testing.assert_close(fn(x.float(), t.float()).double(), fn(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"a": 0.0}, "a .*> 0"), ({"a": -1.0}, "a .*> 0"), ({"c": 0.0}, "c .*> 0"), ({"c": float("nan")}, "c .*finite"),
])
def test_invalid_constants(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KacProcess(**kwargs)


def test_invalid_arguments():
    kp = KacProcess()
    with pytest.raises(ValueError, match="t must be >= 0"):
        kp.sample(torch.tensor([-0.1]), (2,))
    with pytest.raises(ValueError, match="t must be finite"):
        kp.variance(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="x must be finite"):
        kp.density(torch.tensor([float("inf")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="t must be a floating-point"):
        kp.sample(torch.tensor([1, 2]), (2,))
    with pytest.raises(ValueError, match=r"t must be a 1-D tensor"):
        kp.sample(torch.ones(2, 2), (2,))
    with pytest.raises(ValueError, match="generator: got 1 generators for a batch of 2"):
        kp.sample(torch.ones(2), (2,), [torch.Generator()])
    assert np.isclose(kp.atom_mass(torch.tensor(1.0)).item(), math.exp(-9.0))
