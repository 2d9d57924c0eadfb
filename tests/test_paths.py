"""Paths: x_t and targets against their closed forms (torchcfm-style), and the Kac path's end points."""

import dataclasses
import math

import pytest
import torch

from distillkac.errors import DistillKacError
from distillkac.kac import KacProcess
from distillkac.paths import FlowPath, KacPath, PathConfig, VPPath, build_path
from distillkac.solvers import solve, time_grid

F64 = torch.float64


def _data(batch=6, shape=(3, 4, 4), seed=0):
    return 2 * torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64) - 1


@pytest.mark.parametrize("schedule,g_schedule", [("linear", "t"), ("linear", "quadratic"), ("cosine", "t")])
def test_kac_path_matches_its_closed_form(schedule, g_schedule):
    path = KacPath(KacProcess(9.0, 3.0), T=1.0, schedule=schedule, g_schedule=g_schedule)
    x0 = _data()
    t = torch.linspace(0.05, 1.0, 6, dtype=F64)
    s = path.sample(x0, t, torch.Generator().manual_seed(4))
    tau, is_atom = path.process.sample(path.coefficients(t)[2], x0.shape[1:], torch.Generator().manual_seed(4))
    f, df, g, dg = (c.reshape(-1, 1, 1, 1) for c in path.coefficients(t))
    assert torch.equal(s.noise, tau)
    torch.testing.assert_close(s.x_t, f * x0 + tau, rtol=0, atol=0)
    expected = df * x0 + dg * path.process.velocity(tau, g, is_atom=is_atom)
    torch.testing.assert_close(s.target, expected, rtol=0, atol=0)
    # Schedule derivatives against central differences.
    h = 1e-6
    for value, derivative in ((0, 1), (2, 3)):
        numeric = (path.coefficients(t + h)[value] - path.coefficients(t - h)[value]) / (2 * h)
        torch.testing.assert_close(numeric[:-1], path.coefficients(t)[derivative][:-1], rtol=1e-6, atol=1e-8)


def test_kac_path_end_points():
    path = KacPath(KacProcess(9.0, 3.0))
    x0 = _data()
    zero = path.sample(x0, torch.zeros(6, dtype=F64), torch.Generator().manual_seed(1))
    assert torch.equal(zero.x_t, x0)
    ends = [path.sample(data, torch.ones(6, dtype=F64), torch.Generator().manual_seed(2)).x_t
            for data in (x0, -x0)]
    assert torch.equal(ends[0], ends[1])  # x_T does not depend on x0
    prior = path.prior((6, 3, 4, 4), torch.Generator().manual_seed(2), dtype=F64)
    assert torch.equal(prior, ends[0])  # the prior is the path at T
    assert bool((prior.abs() <= 3.0).all())


def test_integrating_the_kac_velocity_lands_on_a_single_data_point():
    """For data that is one point, E[u* | x_t] = f'·x0 + g'·v(x_t - f·x0, g) exactly; the ODE returns to x0."""
    path = KacPath(KacProcess(9.0, 3.0))
    point = 0.3

    def velocity(x, t):
        f, df, g, dg = (c[:, None] for c in path.coefficients(t))
        return df * point + dg * path.process.velocity(x - f * point, g)

    prior = path.prior((2000, 1), torch.Generator().manual_seed(0), dtype=F64)
    errors = [(solve(velocity, prior, time_grid(n), "euler").x - point).abs().max().item() for n in (10, 40, 160)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_flow_path_closed_form():
    path = FlowPath()
    x0 = _data()
    t = torch.linspace(0.0, 1.0, 6, dtype=F64)
    s = path.sample(x0, t, torch.Generator().manual_seed(3))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    tb = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.x_t, (1 - tb) * x0 + tb * eps, rtol=0, atol=0)
    torch.testing.assert_close(s.target, eps - x0, rtol=0, atol=0)


def test_vp_path_closed_form_and_ddim():
    path = VPPath()
    x0 = _data()
    t = torch.linspace(0.1, 1.0, 6, dtype=F64)
    s = path.sample(x0, t, torch.Generator().manual_seed(5))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    alpha, sigma, dalpha, dsigma = path.alpha_sigma(t.reshape(-1, 1, 1, 1))
    theta = (t + 0.008) / 1.008 * math.pi / 2
    alpha_bar = torch.cos(theta) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(alpha.flatten() ** 2, torch.where(t >= 1, 0 * t, alpha_bar), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.x_t, alpha * x0 + sigma * eps, rtol=0, atol=0)
    torch.testing.assert_close(s.target, dalpha * x0 + dsigma * eps, rtol=0, atol=0)
    # The target is d x_t / dt with the noise held fixed.
    h = 1e-6
    shifted = [path.alpha_sigma((t + d).reshape(-1, 1, 1, 1)) for d in (h, -h)]
    numeric = ((shifted[0][0] - shifted[1][0]) * x0 + (shifted[0][1] - shifted[1][1]) * eps) / (2 * h)
    torch.testing.assert_close(numeric[:-1], s.target[:-1], rtol=1e-6, atol=1e-7)
    # DDIM with the exact conditional velocity reproduces the path exactly.
    later = torch.full((6,), 0.05, dtype=F64)
    stepped = path.ddim_step(s.x_t[:-1], t[:-1], later[:-1], s.target[:-1])
    a_s, s_s, _, _ = path.alpha_sigma(later[:-1].reshape(-1, 1, 1, 1))
    torch.testing.assert_close(stepped, a_s * x0[:-1] + s_s * eps[:-1], rtol=1e-10, atol=1e-10)


def test_build_path_round_trip_and_errors():
    for path in (KacPath(KacProcess(25.0, 2.0), 2.0, "cosine", "quadratic"), FlowPath(), VPPath()):
        assert build_path(path.to_config()) == path
    with pytest.raises(DistillKacError, match="unknown schedule 'exp'; valid: cosine, linear"):
        KacPath(KacProcess(), schedule="exp")
    with pytest.raises(DistillKacError, match="unknown g_schedule 'cube'; valid: quadratic, t"):
        KacPath(KacProcess(), g_schedule="cube")
    with pytest.raises(DistillKacError, match="unknown path kind 'sde'; valid: kac, flow, vp"):
        build_path({"kind": "sde"})
    with pytest.raises(DistillKacError, match="T must be"):
        KacPath(KacProcess(), T=0.0)
    with pytest.raises(ValueError, match=r"t must have shape \[6\]"):
        KacPath(KacProcess()).sample(_data(), torch.ones(3, dtype=F64))


def test_a_path_config_builds_its_path_directly():
    configs = (PathConfig(), PathConfig(kac_a=25.0, kac_c=2.0, T=2.0, schedule="cosine", g_schedule="quadratic"),
               PathConfig(kind="flow"), PathConfig(kind="vp"))
    for config in configs:
        config.validate()
        path = build_path(config)
        assert path == build_path(dataclasses.asdict(config))
        assert PathConfig.from_config(path.to_config()) == config
    with pytest.raises(DistillKacError, match=r"path.kac_c: must be a finite number > 0, got 0.0"):
        PathConfig(kac_c=0.0).validate()
    with pytest.raises(DistillKacError, match=r"path.T: the flow baseline is defined on \[0, 1\]; T must be 1"):
        PathConfig(kind="flow", T=2.0).validate()
