"""Presets, the training loop (determinism, resume, DDP, non-finite guards), the Kac teacher on toy2d,
and the ``train`` command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_toy_config, run_cli

from distillkac.checkpoint import load_artifact, load_training_state
from distillkac.config import RunConfig
from distillkac.data import load_dataset, toy_mixture
from distillkac.errors import DistillKacError
from distillkac.nets import REFERENCE_CONFIGS, build_network, config_parameter_count, count_parameters
from distillkac.paths import build_path
from distillkac.presets import PRESETS, get_preset, hyperparameter_table
from distillkac.sampling import cycle_labels, generate
from distillkac.train import TeacherObjective, resolve_config, train, train_teacher

SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = pytest.mark.usefixtures("single_thread")


def _stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            _assert_same_tensors(a[name], b[name])
        elif isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


# ------------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name):
    config = get_preset(name).validate()
    text = json.dumps(config.to_dict())
    again = RunConfig.from_dict(json.loads(text))
    assert again == config
    assert json.dumps(again.to_dict()) == text


def test_preset_parameter_counts():
    digits = get_preset("digits").net
    built = build_network(digits, generator=torch.Generator().manual_seed(0))
    assert count_parameters(built) == config_parameter_count(digits)
    for name in ("cifar10", "celeba64", "lsun-bedroom256"):
        assert get_preset(name).net == REFERENCE_CONFIGS[name]
        assert config_parameter_count(get_preset(name).net) == config_parameter_count(REFERENCE_CONFIGS[name])
    # method.md §5: the Kac-flow CIFAR-10 UNet has "about 35M" parameters.
    assert 30e6 < config_parameter_count(get_preset("cifar10").net) < 45e6
    table = hyperparameter_table()
    for name in PRESETS:
        count = config_parameter_count(get_preset(name).net) / 1e6
        assert f"| {name} |" in table and f"{count:.2f}M" in table


def test_preset_scales():
    cifar = get_preset("cifar10")
    assert (cifar.train.batch, cifar.optim.lr, cifar.train.steps) == (128, 2e-4, 400_000)
    assert cifar.optim.grad_clip == 1.0
    beta = 0.5 ** (cifar.train.batch / cifar.train.ema_halflife_images)
    assert beta == pytest.approx(0.9999, abs=1e-8)
    assert cifar.net.dropout == 0.1 and cifar.train.label_dropout == 0.1
    get_preset("digits").train.steps = 1
    assert PRESETS["digits"].train.steps != 1


@pytest.mark.parametrize(("section", "field", "value", "message"), [
    ("train", "steps", 0, "train.steps"), ("train", "batch", -4, "train.batch"),
    ("train", "micro_batch", 5, "must divide train.batch"), ("optim", "lr", 0.0, "optim.lr"),
    ("path", "kind", "ddpm", "path.kind"), ("path", "schedule", "cubic", "path.schedule"),
    ("train", "precision", "fp16", "train.precision"), ("train", "label_dropout", 1.0, "train.label_dropout"),
    ("path", "kac_a", float("nan"), "path.kac_a"), ("optim", "betas", (0.9,), "optim.betas"),
])
def test_validate_rejects_nonsense(section, field, value, message):
    config = make_toy_config()
    setattr(getattr(config, section), field, value)
    with pytest.raises(DistillKacError, match=message) as info:
        config.validate()
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys():
    values = make_toy_config().to_dict()
    values["train"]["stpes"] = 3
    with pytest.raises(DistillKacError, match="stpes"):
        RunConfig.from_dict(values)


# --------------------------------------------------------------------------------------- the loop

@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory, single_thread):
    """A toy2d Kac teacher, 300 steps of a small MLP (shared by the tests below)."""
    run_dir = tmp_path_factory.mktemp("toy-teacher")
    config = make_toy_config(steps=300, batch=128, micro_batch=64, hidden=64, depth=2, log_every=50,
                             ckpt_every=300, sample_every=300, ema_halflife_images=4000.0)
    config.data.toy_size = 4000
    config.optim.lr, config.optim.warmup_images = 3e-3, 2560
    train_teacher(config, run_dir, progress=False)
    return run_dir, config


def test_loss_decreases_and_run_directory_is_complete(toy_teacher):
    run_dir, config = toy_teacher
    rows = _stats(run_dir)
    assert [row["step"] for row in rows] == [50, 100, 150, 200, 250, 300]
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]
    assert all(row["nonfinite_skipped"] == 0 and row["grad_norm"] > 0 for row in rows)
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["environment"]["world_size"] == 1 and stored["environment"]["torch"] == torch.__version__
    assert RunConfig.from_dict(stored).train == config.train
    assert (run_dir / "samples" / "step-0000300.png").is_file()
    assert not (run_dir / ".lock").exists()
    model, meta = load_artifact(run_dir / "artifact")
    assert meta["kind"] == "teacher" and meta["train_step"] == 300 and meta["path"]["kac_a"] == 9.0
    state = load_training_state(run_dir / "training-state.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["ema"][name])


def _mixture_log_density(x: torch.Tensor, config) -> torch.Tensor:
    means, std, weights = toy_mixture(config.data)
    squared = (x.double()[:, None, :] - means[None]).square().sum(-1)
    log_normal = -squared / (2 * std**2) - math.log(2 * math.pi * std**2)
    return torch.logsumexp(log_normal + weights.log()[None], dim=1)


def test_kac_teacher_samples_beat_the_prior_under_the_exact_mixture(toy_teacher):
    run_dir, config = toy_teacher
    model, meta = load_artifact(run_dir / "artifact")
    path = build_path(meta["path"])
    samples = generate(model, path, seeds=range(1000), labels=cycle_labels(1000, 16), steps=50).samples
    prior = path.prior((1000, 2), generator=torch.Generator().manual_seed(0))
    data_ll = _mixture_log_density(load_dataset(config.data, "test").data[:1000], config).mean()
    sample_ll = _mixture_log_density(samples, config).mean()
    prior_ll = _mixture_log_density(prior, config).mean()
    # Kac noise on [-3, 3]^2 is tens of nats below the data; the teacher must close most of that gap.
    print(f"log-likelihood: data {data_ll:.2f}, samples {sample_ll:.2f}, prior {prior_ll:.2f}")
    assert prior_ll < data_ll - 50
    assert sample_ll > prior_ll + 0.9 * (data_ll - prior_ll)
    assert sample_ll > data_ll - 8


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    config = make_toy_config(steps=6, dropout=0.2)
    rng_before = torch.get_rng_state()
    train_teacher(config, tmp_path / "straight", progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # fork_rng leaves the global RNG alone
    first = make_toy_config(steps=3, dropout=0.2)
    result = train_teacher(first, tmp_path / "resumed", progress=False)
    assert result.step == 3
    result = train_teacher(config, tmp_path / "resumed", progress=False)
    assert (result.resumed_from, result.step) == (3, 6)
    straight = load_training_state(tmp_path / "straight" / "training-state.pt")
    resumed = load_training_state(tmp_path / "resumed" / "training-state.pt")
    for key in ("model", "ema", "optimizer"):
        _assert_same_tensors(straight[key], resumed[key])
    losses = [[row["loss"] for row in _stats(tmp_path / name)] for name in ("straight", "resumed")]
    assert losses[0] == losses[1]
    # A finished run asked for the same number of steps does nothing.
    assert train_teacher(config, tmp_path / "resumed", progress=False).step == 6


def test_resume_refuses_a_changed_config(tmp_path):
    train_teacher(make_toy_config(steps=2), tmp_path, progress=False)
    changed = make_toy_config(steps=4)
    changed.optim.lr = 5e-3
    with pytest.raises(DistillKacError, match="optim.lr = 0.001, now 0.005"):
        train_teacher(changed, tmp_path, progress=False)
    changed = make_toy_config(steps=4, seed=1)
    with pytest.raises(DistillKacError, match="train.seed"):
        train_teacher(changed, tmp_path, progress=False)


def test_lr_warmup_in_stats(tmp_path):
    train_teacher(make_toy_config(steps=3), tmp_path, progress=False)
    assert [row["lr"] for row in _stats(tmp_path)] == [5e-4, 1e-3, 1e-3]  # warm-up over 64 images


class PoisonedObjective:
    """The teacher's loss, made NaN on chosen calls (one call per step here)."""

    def __init__(self, inner: TeacherObjective, bad_calls: set[int]) -> None:
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

    def per_sample_loss(self, model, x0, y, generator):
        self.calls += 1
        loss = self.inner.per_sample_loss(model, x0, y, generator)
        return loss * float("nan") if self.calls in self.bad_calls else loss

    def artifact_meta(self):
        return self.inner.artifact_meta()


def _poisoned_run(run_dir: Path, bad_calls: set[int], skip: int):
    config = make_toy_config(steps=6, batch=32, micro_batch=32, ckpt_every=2, skip_nonfinite=skip)
    dataset = load_dataset(config.data, "train")
    config = resolve_config(config, dataset.data_shape, dataset.num_classes)
    model = build_network(config.net, generator=torch.Generator().manual_seed(0))
    teacher = TeacherObjective(build_path(dataclasses.asdict(config.path)), 16)
    objective = PoisonedObjective(teacher, bad_calls)
    return train(config, run_dir, model, objective, dataset, progress=False)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(DistillKacError, match="non-finite loss or gradient at step 3 .*step 2") as info:
        _poisoned_run(tmp_path, {3}, skip=0)
    assert "\n" not in str(info.value)
    assert load_training_state(tmp_path / "training-state.pt")["step"] == 2
    model, meta = load_artifact(tmp_path / "artifact")
    assert meta["train_step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / ".lock").exists()


def test_skip_nonfinite_counts_skipped_steps(tmp_path):
    result = _poisoned_run(tmp_path / "ok", {3, 5}, skip=2)
    assert (result.step, result.nonfinite_skipped) == (6, 2)
    rows = _stats(tmp_path / "ok")
    assert [row["nonfinite_skipped"] for row in rows] == [0, 0, 1, 1, 2, 2]
    assert rows[2]["loss"] is None
    state = load_training_state(tmp_path / "ok" / "training-state.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    with pytest.raises(DistillKacError, match="at step 5"):
        _poisoned_run(tmp_path / "bad", {3, 4, 5}, skip=2)


def _cli_train(outdir: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["--preset", "toy2d", "--outdir", str(outdir), "--steps", "4", "--batch", "64",
            "--micro-batch", "16", "--device", "cpu", "--no-progress", "--sample-every", "1000", *extra]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher, "-m", "distillkac", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_ddp_matches_one_process(tmp_path):
    single = _cli_train(tmp_path / "one")
    assert single.returncode == 0, single.stderr
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    double = _cli_train(tmp_path / "two", launcher=torchrun)
    assert double.returncode == 0, double.stderr[-2000:]
    stored = json.loads((tmp_path / "two" / "config.json").read_text())
    assert stored["environment"]["world_size"] == 2
    one = load_training_state(tmp_path / "one" / "training-state.pt")
    two = load_training_state(tmp_path / "two" / "training-state.pt")
    for key in ("model", "ema"):
        for name in one[key]:
            torch.testing.assert_close(one[key][name], two[key][name], atol=1e-5, rtol=0)


def test_micro_batches_must_be_shared_evenly_by_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistillKacError, match="3 micro-batches per step .* cannot be shared by 2 processes"):
        train_teacher(make_toy_config(batch=24, micro_batch=8), tmp_path, progress=False)
    assert not tmp_path.joinpath("config.json").exists()


# ----------------------------------------------------------------------------------------- the CLI

def test_dry_run_prints_config_and_parameter_count_and_writes_nothing(tmp_path, capsys):
    code, out, _ = run_cli(["train", "--preset", "digits", "--outdir", str(tmp_path / "run"), "--dry-run",
                             "--steps", "7", "--lr", "1e-3"], capsys)
    assert code == 0
    text, count_line = out.rsplit("parameters:", 1)
    config = RunConfig.from_dict(json.loads(text))
    assert config.train.steps == 7 and config.optim.lr == 1e-3 and config.data.name == "digits"
    assert int(count_line.strip().replace(",", "")) == config_parameter_count(config.net)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "mnist"], "invalid choice: 'mnist'"),
    (["--preset", "digits", "--steps", "-5"], "--steps: must be an integer > 0"),
    (["--preset", "digits", "--batch", "128", "--micro-batch", "48"], "must divide --batch = 128"),
    (["--preset", "digits", "--path", "ddpm"], "invalid choice: 'ddpm'"),
    (["--preset", "toy2d", "--resolution", "32"], "has no image network"),
    (["--preset", "digits", "--label-dropout", "1.5"], "--label-dropout: must be in [0, 1)"),
])
def test_bad_train_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code, _, err = run_cli(["train", "--outdir", str(tmp_path / "run"), *argv], capsys)
    assert code == 2
    assert err.startswith("distillkac: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_help_shows_defaults(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    assert "(default: 800 digits; 400,000 cifar10, celeba64;" in " ".join(out.split())
