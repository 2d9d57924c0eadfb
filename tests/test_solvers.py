"""Solvers reach their orders on analytic ODEs, on uniform and non-uniform grids, with exact NFE."""

import math

import pytest
import torch

from distillkac.errors import DistillKacError
from distillkac.guidance import guided_velocity
from distillkac.paths import FlowPath
from distillkac.solvers import EVALUATIONS_PER_STEP, solve, time_grid

ORDERS = {"euler": 1, "ab2": 2, "heun": 2, "midpoint": 2}


def _exact_problem():
    """dx/dt = x·cos(t) from t = 2 to 0: x(0) = x(2)·exp(-sin 2)."""
    return (lambda x, t: x * torch.cos(t)[:, None]), math.exp(-math.sin(2.0))


@pytest.mark.parametrize("method", ORDERS)
@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
def test_solver_orders(method, grid):
    velocity, exact = _exact_problem()
    errors = []
    for steps in (40, 80, 160):
        result = solve(velocity, torch.ones(1, 1, dtype=torch.float64), time_grid(steps, 2.0, grid), method)
        errors.append(abs(result.x.item() - exact))
        assert result.evaluations == steps * EVALUATIONS_PER_STEP[method]
    observed = math.log2(errors[1] / errors[2])
    assert abs(observed - ORDERS[method]) < 0.25, observed


def test_time_grid_has_n_steps():
    grid = time_grid(4, 2.0)
    assert grid.tolist() == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert time_grid(1).tolist() == [1.0, 0.0]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DistillKacError, match="steps must be a positive integer"):
            time_grid(bad)
    with pytest.raises(DistillKacError, match="unknown grid 'log'"):
        time_grid(3, kind="log")


def test_custom_grid_and_errors():
    velocity, _ = _exact_problem()
    x = torch.ones(1, 1, dtype=torch.float64)
    assert solve(velocity, x, [2.0, 1.2, 0.3, 0.0], "ab2").evaluations == 3
    with pytest.raises(DistillKacError, match="strictly decreasing"):
        solve(velocity, x, [1.0, 1.0, 0.0], "euler")
    with pytest.raises(DistillKacError, match="unknown solver 'rk4'"):
        solve(velocity, x, [1.0, 0.0], "rk4")
    with pytest.raises(DistillKacError, match="'ddim' needs the VP"):
        solve(velocity, x, [1.0, 0.0], "ddim", path=FlowPath())


def test_ab2_uses_the_variable_step_formula():
    """With u(t) = t (x-independent) AB-2 integrates linear velocities exactly after its Euler start."""
    grid = [1.0, 0.7, 0.2, 0.0]
    result = solve(lambda x, t: t[:, None].to(x.dtype), torch.zeros(1, 1, dtype=torch.float64), grid, "ab2")
    euler_start = -0.3 * 1.0  # first step: x = 0 - 0.3·u(1)
    exact_rest = -(0.7**2 - 0.0**2) / 2  # ∫_0^0.7 t dt, integrated backwards
    assert result.x.item() == pytest.approx(euler_start + exact_rest, abs=1e-14)


def test_on_step_sees_each_grid_point():
    seen = []
    solve(lambda x, t: -x, torch.ones(2, 1), time_grid(5), "ab2", on_step=lambda k, t, x, u: seen.append((k, t)))
    assert [k for k, _ in seen] == [0, 1, 2, 3, 4]
    assert [t for _, t in seen] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


class _LinearModel(torch.nn.Module):
    """u = A·x + b_y + t: labels in 0..2 and the null label 3."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        self.label_bias = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        return x @ self.weight + self.label_bias[y] + t[:, None]


def test_guidance_zero_is_the_conditional_model_and_batched_equals_separate():
    model = _LinearModel()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(5, 4, generator=g), torch.rand(5, generator=g), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(guided_velocity(model, x, t, y, 0.0), model(x, t, y))
    model.calls = 0
    guided = guided_velocity(model, x, t, y, 1.5)
    assert model.calls == 1  # one batched forward
    separate = 2.5 * model(x, t, y) - 1.5 * model(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(guided, separate, rtol=1e-6, atol=1e-6)


def test_guidance_argument_checks():
    from distillkac.guidance import check_guidance

    assert check_guidance(2, 10) == 2.0
    assert check_guidance(0, 0) == 0.0
    with pytest.raises(DistillKacError, match="guidance needs a class-conditional model"):
        check_guidance(1.0, 0)
    with pytest.raises(DistillKacError, match="guidance must be a finite number"):
        check_guidance(float("nan"), 10)


# ------------------------------------------------------------------------------------------- per-row grids

def _row_grids(rows: int, steps: int, seed: int) -> torch.Tensor:
    """Random strictly decreasing per-row grids in [0, 2): every row its own times, some ending above 0."""
    g = torch.Generator().manual_seed(seed)
    times = torch.rand(rows, steps + 1, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values * 2
    times[::2, -1] = 0.0
    return times


@pytest.mark.parametrize("method", ORDERS)
def test_per_row_grids_equal_solving_each_row_with_its_own_grid(method):
    """Rows are independent: solving all rows on their own grids at once is bitwise solving them one by one
    (float64, where a per-row step h and a shared float step round alike)."""
    grids = _row_grids(5, 7, seed=2)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def velocity(state, t):
        return state * torch.cos(t)[:, None] + t[:, None] ** 2

    together = solve(velocity, x, grids, method)
    assert together.evaluations == 7 * EVALUATIONS_PER_STEP[method]
    for row in range(5):
        alone = solve(velocity, x[row:row + 1], grids[row], method).x
        assert torch.equal(together.x[row:row + 1], alone), row


def test_per_row_grids_on_analytic_odes():
    """Euler on dx/dt = λx is x_0·Π(1 - λh_k) per row; AB-2 on dx/dt = t is exact after its Euler start."""
    grids = _row_grids(4, 6, seed=5)
    x = torch.full((4, 1), 1.5, dtype=torch.float64)
    steps = grids[:, :-1] - grids[:, 1:]
    euler = solve(lambda state, t: -0.8 * state, x, grids, "euler").x
    torch.testing.assert_close(euler[:, 0], 1.5 * (1 + 0.8 * steps).prod(dim=1), rtol=1e-14, atol=0)
    ab2 = solve(lambda state, t: t[:, None].to(state.dtype), x, grids, "ab2").x
    expected = 1.5 - steps[:, 0] * grids[:, 0] - (grids[:, 1] ** 2 - grids[:, -1] ** 2) / 2
    torch.testing.assert_close(ab2[:, 0], expected, rtol=0, atol=1e-14)


def test_per_row_grid_checks_and_hook():
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(DistillKacError, match=r"one row per sample \(\[3, steps \+ 1\]\), got shape \[2, 4\]"):
        solve(lambda state, t: state, x, _row_grids(2, 3, seed=0), "euler")
    increasing = _row_grids(3, 3, seed=0)
    increasing[1] = increasing[1].flip(0)
    with pytest.raises(DistillKacError, match="strictly decreasing"):
        solve(lambda state, t: state, x, increasing, "euler")
    with pytest.raises(DistillKacError, match="non-negative"):
        solve(lambda state, t: state, x, [1.0, 0.5, -0.5], "euler")
    seen = []
    grids = _row_grids(3, 2, seed=1)
    solve(lambda state, t: state, x, grids, "ab2", on_step=lambda k, t, state, u: seen.append(t))
    assert len(seen) == 2 and all(torch.equal(t, grids[:, k]) for k, t in enumerate(seen))
