"""The distillation's options: the trajectory pool, stage-1 targets, start states, loss form, student dropout,
their validation and command line, the UNet's zero-init option, and the ablation runner's smoke mode."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distill import KAC, NUM_CLASSES, _closed_form, _guided_coefficient, _linear_teacher

from distillkac.config import DistillConfig
from distillkac.distill import EndpointObjective, PoolSettings, Stage, pool_size
from distillkac.errors import DistillKacError
from distillkac.nets import build_network
from distillkac.nets.unet import AttentionBlock, ResBlock, UNetConfig
from distillkac.presets import get_distill_preset
from distillkac.solvers import solve, time_grid
from distillkac.stages import stage_run_config

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


def _objective(**options) -> EndpointObjective:
    teacher = _linear_teacher("ab2", 12, 0.5)
    pool = PoolSettings(size=6, refresh=4, seed=3)
    return EndpointObjective(teacher, KAC, Stage(1, 12, 4), pool=pool, **options)


def _pair(objective: EndpointObjective, seed: int = 5, batch: int = 32):
    x0 = torch.rand((batch, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    y = torch.arange(batch) % NUM_CLASSES
    return objective.endpoint_pair(x0, y, torch.Generator().manual_seed(seed))


def test_pool_holds_the_uninterrupted_solver_at_the_student_grid_times():
    objective = _objective(start_states="rollout", target="ab2-carried")
    objective.prepare_step(0)
    objective.pool.ensure((3,), torch.device("cpu"), torch.float64)
    pool = objective.pool
    assert pool.states.shape == (6, 5, 3)
    full = solve(lambda x, t: objective.teacher.velocity(x, t, pool.labels), pool.states[:, 0], time_grid(12),
                 method="ab2").x
    assert torch.allclose(pool.states[:, -1], full, rtol=0, atol=1e-12)
    assert float((pool.states[:, 1] - pool.states[:, 0]).abs().max()) > 0


def test_carried_target_is_the_next_pooled_state_and_restart_solves_the_segment():
    carried = _pair(_objective(start_states="rollout", target="ab2-carried"))
    restart = _pair(_objective(start_states="rollout", target="ab2-restart"))
    assert torch.equal(carried.x_start, restart.x_start) and torch.equal(carried.k, restart.k)
    c = _guided_coefficient(restart.y, 0.5)
    expected = _closed_form(restart.x_start, restart.t_start.double(), 1.0 / 12, 3, "ab2", c)
    assert (restart.target - expected).abs().max() < 1e-12
    # Carrying AB-2's history across the segment boundary is a different (the uninterrupted) solution.
    assert float((carried.target - restart.target).abs().max()) > 1e-8
    pool = _objective(start_states="rollout").pool
    pool.ensure((3,), torch.device("cpu"), torch.float64)
    for x_start, target, k in zip(carried.x_start, carried.target, carried.k.tolist()):
        rollout = int((pool.states[:, k] - x_start).abs().amax(dim=1).argmin())
        assert torch.equal(pool.states[rollout, k], x_start)
        assert torch.equal(pool.states[rollout, k + 1], target)


def test_euler_target_takes_euler_steps():
    pair = _pair(_objective(target="euler"))
    c = _guided_coefficient(pair.y, 0.5)
    expected = _closed_form(pair.x_start, pair.t_start.double(), 1.0 / 12, 3, "euler", c)
    assert (pair.target - expected).abs().max() < 1e-12


def test_mix_draws_both_kinds_of_start_state():
    objective = _objective(start_states="mix")
    pair = _pair(objective, batch=64)
    states = objective.pool.states
    pooled = [bool((states[:, k] == x).all(dim=1).any()) for x, k in zip(pair.x_start, pair.k.tolist())]
    assert 16 < sum(pooled) < 48


def test_pool_is_a_function_of_the_step_block_only():
    """A resumed stage rebuilds the same pool: pool r serves steps r·refresh .. (r+1)·refresh - 1."""
    first, second = _objective(start_states="rollout"), _objective(start_states="rollout")
    first.prepare_step(5)
    second.prepare_step(7)
    assert torch.equal(_pair(first).x_start, _pair(second).x_start)
    second.prepare_step(8)
    assert not torch.equal(_pair(first).x_start, _pair(second).x_start)


def test_pool_size_uses_each_pair_reuse_times():
    assert pool_size(64, 20, 20, 1.0) == 64
    assert pool_size(64, 20, 1, 1.0) == 1280
    assert pool_size(64, 20, 20, 4.0) == 16
    assert pool_size(1, 1, 100, 1.0) == 1


def test_velocity_loss_is_the_endpoint_loss_over_delta_squared():
    model = torch.nn.Linear(3, 3).double()

    def student(x, t, y):
        return model(x)

    endpoint = _objective().per_sample_loss(student, torch.zeros(16, 3, dtype=torch.float64),
                                            torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(2))
    velocity = _objective(loss="velocity").per_sample_loss(
        student, torch.zeros(16, 3, dtype=torch.float64), torch.zeros(16, dtype=torch.long),
        torch.Generator().manual_seed(2))
    assert torch.allclose(velocity, endpoint * 16, rtol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"target": "ab2"}, "--target: must be one of ab2-restart, ab2-carried, euler"),
    ({"target": "ab2-carried"}, "--target: ab2-carried reads the teacher's roll-outs"),
    ({"loss": "l1"}, "--loss: must be one of endpoint, velocity"),
    ({"student_dropout": 1.0}, r"--student-dropout: must be in \[0, 1\)"),
    ({"start_states": "prior"}, "--start-states: must be one of data, rollout, mix"),
    ({"pool_refresh": 0}, "--pool-refresh: must be a positive integer"),
    ({"pool_reuse": 0.0}, "--pool-reuse: must be a number > 0"),
])
def test_bad_distillation_options_are_refused(changes, message):
    with pytest.raises(DistillKacError, match=message):
        DistillConfig().with_changes(changes).validate()


def test_student_dropout_reaches_the_stage_network():
    meta = {"net": dataclasses.asdict(UNetConfig(image_channels=1, resolution=8, model_channels=16,
                                                 channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                                 dropout=0.0, groups=8)) | {"kind": "unet"},
            "path": KAC.to_config()}
    from distillkac.data import DataConfig

    settings = get_distill_preset("digits").with_changes({"student_dropout": 0.2, "start_states": "mix",
                                                          "target": "ab2-carried", "loss": "velocity"})
    config = stage_run_config(meta, DataConfig(name="digits"), Stage(1, 100, 20), settings, None)
    assert config.net.dropout == 0.2
    assert (config.distill["target"], config.distill["loss"], config.distill["start_states"]) == \
        ("ab2-carried", "velocity", "mix")
    kept = stage_run_config(meta, DataConfig(name="digits"), Stage(1, 100, 20), get_distill_preset("digits"), None)
    assert kept.net.dropout == 0.0


def test_zero_init_residual_zeroes_every_branch_output():
    config = UNetConfig(image_channels=1, resolution=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), dropout=0.0, groups=8, num_heads=2, zero_init="residual")
    model = build_network(config, generator=torch.Generator().manual_seed(0))
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks and attention
    assert all(float(b.conv2.weight.detach().abs().max()) == 0 for b in blocks)
    assert all(float(a.proj.weight.detach().abs().max()) == 0 for a in attention)
    default = build_network(dataclasses.replace(config, zero_init="output"), generator=torch.Generator().manual_seed(0))
    assert all(float(m.conv2.weight.detach().abs().max()) > 0 for m in default.modules() if isinstance(m, ResBlock))
    with pytest.raises(DistillKacError, match="zero_init: must be one of output, residual"):
        dataclasses.replace(config, zero_init="all").validate()


def test_distill_cli_passes_the_new_options(tmp_path, capsys):
    from conftest import make_toy_config

    from distillkac.cli import main
    from distillkac.train import train_teacher

    config = make_toy_config(steps=2, batch=16, micro_batch=16, hidden=8, depth=1, log_every=1, ckpt_every=2,
                             sample_every=2)
    train_teacher(config, tmp_path / "teacher", progress=False)
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--outdir", str(tmp_path / "out"), "--plan",
                 "4,2,1", "--start-states", "rollout", "--target", "ab2-carried", "--loss", "velocity",
                 "--student-dropout", "0.1", "--pool-refresh", "3", "--pool-reuse", "2", "--dry-run"])
    assert code == 0
    stages = json.loads(capsys.readouterr().out)
    distill = stages[0]["distill"]
    assert (distill["target"], distill["loss"], distill["pool_refresh"], distill["pool_reuse"]) == \
        ("ab2-carried", "velocity", 3, 2.0)
    assert stages[0]["net"]["dropout"] == 0.1


def test_ablation_runner_smoke(tmp_path):
    results, doc = tmp_path / "ablations.json", tmp_path / "ablations.md"
    command = [sys.executable, str(REPO / "benchmarks" / "ablate.py"), "--outdir", str(tmp_path / "work"), "--smoke",
               "--jobs", "1", "--factors", "kac,start,loss", "--kac-grid", "9:3", "--results", str(results),
               "--doc", str(doc)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    cells = json.loads(results.read_text())["smoke"]["cells"]
    names = [c["name"] for c in cells]
    assert names[:2] == ["default teacher", "default distillation"]
    assert {"a=9, c=3", "start states data (AB-2 restarted: the paper's)", "start states mix",
            "velocity loss (endpoint / Δ²)"} <= set(names)
    assert "start states rollout" not in names  # the default itself is not a variant
    assert all(len(row["blocks"]) == 2 for cell in cells for row in cell["rows"])
    assert all("difference" in row for cell in cells[2:] for row in cell["rows"])
    text = doc.read_text()
    assert "ablate.py: generated below --> smoke" in text and "| kac | a=9, c=3 | teacher |" in text
    subprocess.run([*command, "--report-only"], check=True, capture_output=True, timeout=600)
    assert doc.read_text().count("generated below --> smoke") == 1
    assert [c["name"] for c in json.loads(results.read_text())["smoke"]["cells"]] == names


def test_resuming_a_pooled_stage_reproduces_the_uninterrupted_stage(tmp_path):
    """The pool serving a step depends on the step only, so a stage stopped inside a pool's block and
    resumed equals the uninterrupted stage bit for bit."""
    from conftest import make_toy_config

    from distillkac.checkpoint import load_training_state
    from distillkac.config import OptimConfig, TrainConfig
    from distillkac.stages import run_distillation
    from distillkac.train import train_teacher

    config = make_toy_config(steps=20, batch=32, micro_batch=32, hidden=16, depth=1, log_every=10, ckpt_every=20,
                             sample_every=20)
    train_teacher(config, tmp_path / "teacher", progress=False)
    settings = DistillConfig(plan=(4, 2), guidance=0.5, start_states="mix", target="ab2-carried", pool_refresh=2,
                             steps_per_stage=6, closeness_samples=8, optim=OptimConfig(lr=1e-3, warmup_images=0),
                             train=TrainConfig(batch=32, micro_batch=16, ema_halflife_images=500.0, ema_rampup=None,
                                               device="cpu", log_every=1, ckpt_every=3, sample_every=100))
    run_distillation(tmp_path / "teacher", tmp_path / "whole", settings, progress=False)
    run_distillation(tmp_path / "teacher", tmp_path / "parts", dataclasses.replace(settings, steps_per_stage=3),
                     progress=False)
    run_distillation(tmp_path / "teacher", tmp_path / "parts", settings, progress=False)
    whole = load_training_state(tmp_path / "whole" / "stage-2step" / "training-state.pt")
    parts = load_training_state(tmp_path / "parts" / "stage-2step" / "training-state.pt")
    assert whole["step"] == parts["step"] == 6
    for key in ("model", "ema"):
        for name in whole[key]:
            assert torch.equal(whole[key][name], parts[key][name]), (key, name)


def test_pool_rolls_out_in_chunks_without_changing_the_states():
    whole, chunked = _objective(start_states="rollout").pool, _objective(start_states="rollout").pool
    chunked.settings = dataclasses.replace(chunked.settings, chunk=4)
    for pool in (whole, chunked):
        pool.ensure((3,), torch.device("cpu"), torch.float64)
    assert torch.allclose(whole.states, chunked.states, rtol=0, atol=1e-12)
    assert torch.equal(whole.labels, chunked.labels)
