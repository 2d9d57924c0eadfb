"""Reliability (issue #7): interrupted ``distill`` and ``ref`` commands resume where they stopped and
end exactly like uninterrupted ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_config, run_cli
from PIL import Image

import distillkac.metrics.fid
import distillkac.train
from distillkac.checkpoint import load_training_state
from distillkac.cli.ref import progress_path
from distillkac.metrics.fid import inception_weights_id, load_reference, resolve_inception_weights
from distillkac.train import train_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


def _same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


# -------------------------------------------------------------------------------------- distill

def _distill_args(teacher: Path, outdir: Path) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--outdir", str(outdir), "--plan", "4,2",
            "--steps-per-stage", "6", "--batch", "32", "--micro-batch", "32", "--lr", "1e-3",
            "--ema-halflife", "500", "--ckpt-every", "3", "--log-every", "1", "--sample-every", "100",
            "--closeness-samples", "8", "--device", "cpu", "--precision", "fp32", "--no-progress"]


def test_distill_interrupted_mid_stage_resumes_to_the_uninterrupted_student(tmp_path, capsys, monkeypatch):
    teacher = tmp_path / "teacher"
    train_teacher(make_toy_config(steps=4), teacher, progress=False)
    assert run_cli(_distill_args(teacher, tmp_path / "whole"), capsys)[0] == 0

    original = distillkac.train._Trainer.after_step

    def interrupted_after_step(self, *args):
        original(self, *args)
        if self.step == 5:  # one step past the checkpoint at step 3: its stats row is already written
            raise KeyboardInterrupt

    monkeypatch.setattr(distillkac.train._Trainer, "after_step", interrupted_after_step)
    code, _, err = run_cli(_distill_args(teacher, tmp_path / "parts"), capsys)
    assert code == 130 and err.strip().splitlines()[-1].startswith("distillkac: interrupted")
    stage = tmp_path / "parts" / "stage-2step"
    assert load_training_state(stage / "training-state.pt")["step"] == 3 and not (stage / ".lock").exists()
    monkeypatch.undo()
    assert run_cli(_distill_args(teacher, tmp_path / "parts"), capsys)[0] == 0
    whole = load_training_state(tmp_path / "whole" / "stage-2step" / "training-state.pt")
    parts = load_training_state(stage / "training-state.pt")
    assert whole["step"] == parts["step"] == 6
    assert all(_same_tensors(whole[key], parts[key]) for key in ("model", "ema", "optimizer"))
    closeness = [json.loads((tmp_path / run / "stage-2step" / "closeness.json").read_text())
                 for run in ("whole", "parts")]
    assert closeness[0]["max"] == closeness[1]["max"] and closeness[0]["final"] == closeness[1]["final"]
    losses = [[row.get("loss") for row in map(json.loads, (tmp_path / run / "stage-2step" / "stats.jsonl")
                                              .read_text().splitlines()) if "loss" in row]
              for run in ("whole", "parts")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


# ------------------------------------------------------------------------------------------ ref

class _CountingFeatures:
    """Stands in for InceptionFeatures: 5 fixed float64 statistics of each uint8 image; counts its calls
    and can be told to stop (like a kill) on a given call."""

    calls = 0
    stop_at: int | None = None

    def __init__(self, weights_path=None, device="cpu", batch_size=250) -> None:
        self.weights_id = inception_weights_id(resolve_inception_weights(weights_path))
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        if type(self).calls == type(self).stop_at:
            raise KeyboardInterrupt
        x = images.to(torch.float64) / 255
        return torch.stack([x.mean((1, 2, 3)), x[:, 0].std((1, 2)), x[:, :, :4].mean((1, 2, 3)),
                            x[:, :, :, :4].mean((1, 2, 3)), x.amax((1, 2, 3))], dim=1)


@pytest.fixture
def ref_inputs(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    for index in range(14):
        pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in weights")
    monkeypatch.setattr(distillkac.metrics.fid, "InceptionFeatures", _CountingFeatures)
    monkeypatch.setattr(_CountingFeatures, "calls", 0)
    monkeypatch.setattr(_CountingFeatures, "stop_at", None)

    def argv(out: Path, batch: int = 2) -> list[str]:
        return ["ref", "--dataset", "folder", "--data", str(folder), "--resolution", "8", "--out", str(out),
                "--inception-weights", str(weights), "--batch", str(batch), "--save-every", "2",
                "--no-progress"]

    return argv


def test_ref_interrupted_resumes_from_its_partial_sums(tmp_path, capsys, ref_inputs):
    straight, resumed = tmp_path / "straight.npz", tmp_path / "resumed.npz"
    assert run_cli(ref_inputs(straight), capsys)[0] == 0
    assert _CountingFeatures.calls == 7  # 14 images in batches of 2
    _CountingFeatures.calls, _CountingFeatures.stop_at = 0, 6
    assert run_cli(ref_inputs(resumed), capsys)[0] == 130
    assert not resumed.exists() and progress_path(str(resumed)).is_file()  # sums of batches 1-4
    _CountingFeatures.calls, _CountingFeatures.stop_at = 0, None
    code, out, _ = run_cli(ref_inputs(resumed), capsys)
    assert code == 0 and _CountingFeatures.calls == 3  # only batches 5, 6 and 7 were computed again
    assert not progress_path(str(resumed)).exists()
    a, b = load_reference(straight), load_reference(resumed)
    assert np.array_equal(a.stats.mu, b.stats.mu) and np.array_equal(a.stats.sigma, b.stats.sigma)
    assert a.meta == b.meta and json.loads(out)["count"] == 14


def test_ref_progress_of_other_settings_is_not_reused(tmp_path, capsys, ref_inputs):
    straight, resumed = tmp_path / "straight.npz", tmp_path / "resumed.npz"
    assert run_cli(ref_inputs(straight, batch=3), capsys)[0] == 0
    _CountingFeatures.calls, _CountingFeatures.stop_at = 0, 4
    assert run_cli(ref_inputs(resumed, batch=2), capsys)[0] == 130
    _CountingFeatures.calls, _CountingFeatures.stop_at = 0, None
    code, _, err = run_cli(ref_inputs(resumed, batch=3), capsys)
    assert code == 0 and _CountingFeatures.calls == 5 and "starting over" in err
    assert np.array_equal(load_reference(straight).stats.sigma, load_reference(resumed).stats.sigma)
