"""Issue 12, the training side: a folder of images as a first-class dataset (no preset: resolution, channels,
classes and network read from the images), no traps in short runs (micro-batch, warm-up, bounded previews
written after their checkpoint), and preemption (SIGTERM / SIGUSR1 stop train, distill and eval after
saving, exit 143, rerunning resumes; Ctrl-C says what was kept)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_config, run_cli
from PIL import Image

import distillkac.train
from distillkac import preemption
from distillkac.checkpoint import load_artifact, load_training_state
from distillkac.config import fit_to_run
from distillkac.data import DataConfig, inspect_images, load_dataset
from distillkac.errors import DistillKacError
from distillkac.evaluate import evaluate
from distillkac.nets import REFERENCE_CONFIGS, build_network
from distillkac.paths import build_path
from distillkac.preemption import Preempted
from distillkac.presets import distill_preset_for, get_distill_preset, get_preset, image_network
from distillkac.resume import check_resume_config
from distillkac.train import TeacherObjective, resolve_config, train, train_teacher

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------ image folders

def _shape_image(kind: int, size: int, seed: int) -> np.ndarray:
    """A dark image holding a bright disc (0), a square (1) or vertical stripes (2), of a random colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    masks = [(y - centre) ** 2 + (x - centre) ** 2 < (size / 3) ** 2,
             (abs(y - centre) < size / 4) & (abs(x - centre) < size / 4), (x // 2) % 2 == 0]
    image = np.zeros((size, size, 3), np.uint8)
    image[masks[kind]] = rng.integers(128, 256, 3)
    return image


def _make_folder(root: Path, per_class: int = 8, size: int = 8, classes=("disc", "square", "stripes"),
                 grey: bool = False) -> Path:
    for kind, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = Image.fromarray(_shape_image(kind, size, seed=100 * kind + index))
            (image.convert("L") if grey else image).save(root / name / f"{index:03d}.png")
    return root


def test_inspect_images_reads_sizes_channels_and_classes(tmp_path):
    colour = inspect_images(_make_folder(tmp_path / "colour"))
    assert (colour.count, colour.sizes, colour.channels) == (24, {(8, 8): 24}, 3)
    assert colour.class_names == ("disc", "square", "stripes") and colour.resolution() == 8
    grey = inspect_images(_make_folder(tmp_path / "grey", grey=True), labels="none")
    assert grey.channels == 1 and grey.class_names == ()
    Image.fromarray(_shape_image(0, 12, 0)[:, :10]).save(tmp_path / "colour" / "disc" / "wide.png")
    (tmp_path / "colour" / "disc" / "broken.png").write_bytes(b"not a png")
    mixed = inspect_images(tmp_path / "colour")
    assert mixed.unreadable == 1 and mixed.sizes == {(8, 8): 24, (10, 12): 1}
    with pytest.raises(DistillKacError, match=r"--resolution: the 25 images .* come in 2 sizes \(8x8: 24, 10x12: 1"):
        mixed.resolution()


def test_the_network_rule_uses_the_reference_sizes_and_smaller_widths_for_small_images():
    for resolution, preset in ((32, "cifar10"), (64, "celeba64"), (256, "lsun-bedroom256")):
        net = image_network(resolution, 3, 10)
        reference = REFERENCE_CONFIGS[preset]
        assert (net.model_channels, net.channel_mult, net.num_res_blocks, net.attn_resolutions) == (
            reference.model_channels, reference.channel_mult, reference.num_res_blocks, reference.attn_resolutions)
    assert image_network(8, 1, 10) == get_preset("digits").net
    small = image_network(16, 3, 3)
    assert (small.model_channels, small.channel_mult, small.attn_resolutions) == (32, (1, 2, 2), ())
    odd = image_network(28, 3, 0)  # 28 px: one level fewer, attention at 14 px instead of 16
    assert (odd.channel_mult, odd.attn_resolutions) == ((1, 2, 2), (14,))
    for resolution in (4, 8, 12, 16, 20, 28, 32, 48, 64, 96, 256, 27):
        image_network(resolution, 3, 2).validate()


def test_train_on_a_folder_without_a_preset(tmp_path, capsys):
    folder = _make_folder(tmp_path / "shapes")
    code, _, err = run_cli(["train", "--data", str(folder), "--outdir", str(tmp_path / "run"), "--steps", "4",
                            "--batch", "12", "--device", "cpu"], capsys)
    assert code == 0, err
    for said in ("read from 24 images", "(all 8x8)", "resolution 8, 3 channel(s), 3 classes (disc, square, stripes)",
                 "micro-batch lowered from 128 to 12", "warm-up shortened from 12,800 to 9 images",
                 "network: UNet 32ch (1-2)", "M parameters", "run: 4 steps of 12 images", "speed:", "images/s"):
        assert said in err, said
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data"] | {"path": None} == DataConfig("folder", resolution=8, channels=3).to_dict()
    assert stored["train"]["label_dropout"] == 0.1 and stored["train"]["preview_guidance"] == 1.0
    _, meta = load_artifact(tmp_path / "run" / "artifact")
    assert meta["num_classes"] == 3 and meta["data_shape"] == [3, 8, 8]
    assert (tmp_path / "run" / "samples" / "step-0000004.png").is_file()
    assert "warm-up shortened" in (tmp_path / "run" / "log.txt").read_text()


def test_folder_options_and_errors(tmp_path, capsys):
    folder = _make_folder(tmp_path / "shapes", per_class=3)
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(folder.rglob("*.png")):
            handle.write(file, file.relative_to(folder).as_posix())

    def dry_run(*argv: str) -> dict:
        code, out, err = run_cli(["train", "--outdir", str(tmp_path / "run"), "--dry-run", *argv], capsys)
        assert code == 0, err
        return json.loads(out.rsplit("parameters:", 1)[0])

    assert dry_run("--data", str(archive))["net"]["num_classes"] == 3
    assert dry_run("--data", str(folder), "--labels", "subfolders")["data"]["labels"] == "subfolders"
    unconditional = dry_run("--data", str(folder), "--labels", "none")
    assert unconditional["net"]["num_classes"] == 0 and unconditional["train"]["preview_guidance"] == 0.0
    wider = dry_run("--data", str(folder), "--model-channels", "24", "--channels", "1")
    assert (wider["net"]["model_channels"], wider["net"]["groups"], wider["data"]["channels"]) == (24, 8, 1)
    Image.fromarray(_shape_image(1, 16, 0)).save(folder / "square" / "big.png")
    code, _, err = run_cli(["train", "--data", str(folder), "--outdir", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "give --resolution N" in err
    assert dry_run("--data", str(folder), "--resolution", "8")["data"]["resolution"] == 8
    code, _, err = run_cli(["train", "--outdir", str(tmp_path / "run")], capsys)
    assert code == 2 and err.startswith("distillkac: error: --data: give a folder")
    code, _, err = run_cli(["train", "--preset", "digits", "--labels", "none", "--outdir", str(tmp_path / "r")],
                           capsys)
    assert code == 2 and "--labels" in err
    assert not (tmp_path / "run").exists()


def test_distill_takes_its_settings_from_a_folder_teacher(tmp_path, capsys):
    folder = _make_folder(tmp_path / "shapes", per_class=4)
    config = resolve_config(get_preset("digits"), (3, 8, 8), 3)
    config.data = DataConfig("folder", path=str(folder), resolution=8, channels=3)
    config.train.steps, config.train.batch, config.train.micro_batch, config.train.device = 2, 8, 8, "cpu"
    config.train.preview_num = 0
    train_teacher(config, tmp_path / "teacher", progress=False)
    code, _, err = run_cli(["distill", "--teacher", str(tmp_path / "teacher"), "--outdir", str(tmp_path / "students"),
                            "--plan", "2,1", "--steps-per-stage", "2", "--batch", "8", "--closeness-samples", "4",
                            "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    _, meta = load_artifact(tmp_path / "students" / "stage-1step" / "artifact")
    assert meta["num_classes"] == 3 and meta["guidance"] == 1.0
    assert distill_preset_for(DataConfig("folder", resolution=32), 0).guidance == 0.0
    assert distill_preset_for(DataConfig("folder", resolution=32), 5) == get_distill_preset("cifar10")


# ------------------------------------------------------------------------------------- short runs

def test_short_runs_fit_the_micro_batch_and_the_warmup_and_say_so(tmp_path, capsys):
    def dry_run(*argv: str) -> tuple[dict, str]:
        code, out, err = run_cli(["train", "--preset", "digits", "--outdir", str(tmp_path / "run"), "--dry-run",
                                  "--device", "cpu", *argv], capsys)
        assert code == 0, err
        return json.loads(out.rsplit("parameters:", 1)[0]), err

    config, err = dry_run("--batch", "32", "--steps", "15")
    assert (config["train"]["micro_batch"], config["optim"]["warmup_images"]) == (32, 96)
    assert "micro-batch lowered from 128 to 32" in err and "warm-up shortened from 12,800 to 96 images" in err
    assert (config["train"]["preview_num"], config["train"]["preview_steps"]) == (16, 20)
    config, err = dry_run("--batch", "48", "--steps", "15", "--warmup-images", "5000", "--preview-num", "4")
    assert (config["train"]["micro_batch"], config["optim"]["warmup_images"]) == (48, 5000)
    assert "warm-up" not in err and config["train"]["preview_num"] == 4
    config, err = dry_run()
    assert "micro-batch" not in err and "warm-up" not in err
    optim, train_config, notes = fit_to_run(get_preset("cifar10").optim, get_preset("cifar10").train, 400_000 * 128,
                                            fit_micro_batch=True, fit_warmup=True)
    assert optim == get_preset("cifar10").optim and train_config == get_preset("cifar10").train and notes == []


def test_a_finished_warmup_may_change_on_resume():
    config = make_toy_config()
    stored = config.to_dict()
    config.optim.warmup_images = 32
    check_resume_config(stored, config, Path("state"), images_done=64)  # both warm-ups (64, 32) are over
    with pytest.raises(DistillKacError, match="optim.warmup_images = 64, now 32"):
        check_resume_config(stored, config, Path("state"), images_done=48)


def _toy_training(config, run_dir: Path, preview) -> None:
    dataset = load_dataset(config.data, "train")
    config = resolve_config(config, dataset.data_shape, dataset.num_classes)
    model = build_network(config.net, generator=torch.Generator().manual_seed(0))
    objective = TeacherObjective(build_path({"kind": "kac"}), dataset.num_classes)
    train(config, run_dir, model, objective, dataset, preview=preview, progress=False)


def test_previews_come_after_their_checkpoint_and_zero_turns_them_off(tmp_path):
    seen = []

    def preview(model, step, on_step=None):
        seen.append((step, load_training_state(tmp_path / "run" / "training-state.pt")["step"]))
        on_step()
        return torch.zeros(4, 2)

    _toy_training(make_toy_config(steps=4, ckpt_every=2, sample_every=2), tmp_path / "run", preview)
    assert seen == [(2, 2), (4, 4)]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-0000002.png",
                                                                                 "step-0000004.png"]
    _toy_training(make_toy_config(steps=2, sample_every=0), tmp_path / "off", preview)
    assert len(seen) == 2 and not (tmp_path / "off" / "samples").exists()


def test_a_stop_signal_during_a_preview_drops_it_and_keeps_the_checkpoint(tmp_path):
    def preview(model, step, on_step=None):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the preview is drawn
        on_step()
        raise AssertionError("the preview should have stopped")

    with pytest.raises(Preempted, match="stopped by SIGTERM after step 2 of 6"):
        _toy_training(make_toy_config(steps=6, ckpt_every=4, sample_every=2), tmp_path, preview)
    assert load_training_state(tmp_path / "training-state.pt")["step"] == 2
    assert not (tmp_path / "samples").exists() and not (tmp_path / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and preemption.requested() is None



def test_the_preview_bar_counts_every_solver_step(tmp_path, monkeypatch):
    """The preview's progress bar ends full, also for a solver that evaluates the network twice per step."""
    bars = []

    class RecordingBar:
        def __init__(self, *, total, **kwargs):
            self.total, self.done = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, count):
            self.done += count

    monkeypatch.setattr(distillkac.train, "tqdm", RecordingBar)
    config = make_toy_config(steps=2, preview_steps=3, preview_solver="heun", preview_num=8)
    train_teacher(config, tmp_path / "run", progress=False)
    assert [(bar.done, bar.total) for bar in bars] == [(3, 3)]


# ------------------------------------------------------------------------------------- preemption

def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distillkac", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _last_step(stats: Path) -> int:
    try:
        lines = stats.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _signal_when(process: subprocess.Popen, ready, number: int, timeout: float = 120.0) -> tuple[int, str]:
    """Send signal ``number`` once ``ready()`` holds; (exit code, stderr)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready():
        assert time.monotonic() < deadline, "the command never got going"
        time.sleep(0.002)
    process.send_signal(number)
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def _train_args(outdir: Path) -> list[str]:
    return ["train", "--preset", "toy2d", "--outdir", str(outdir), "--steps", "120", "--batch", "16",
            "--micro-batch", "16", "--ckpt-every", "1000", "--log-every", "1", "--preview-every", "0",
            "--device", "cpu", "--no-progress"]


def test_sigterm_stops_train_after_a_checkpoint_and_rerunning_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _signal_when(_launch(_train_args(run)), lambda: _last_step(run / "stats.jsonl") >= 5,
                             signal.SIGTERM)
    assert code == preemption.EXIT_CODE and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("distillkac: stopped by SIGTERM after step ") and "rerun the same command" in last
    step = int(last.split("after step ")[1].split()[0])
    assert 5 <= step < 120 and load_training_state(run / "training-state.pt")["step"] == step
    assert _last_step(run / "stats.jsonl") == step
    assert run_cli(_train_args(run), capsys)[0] == 0
    assert run_cli(_train_args(tmp_path / "straight"), capsys)[0] == 0
    resumed, straight = (load_training_state(d / "training-state.pt") for d in (run, tmp_path / "straight"))
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][name], straight[key][name]) for name in straight[key])


def test_sigusr1_stops_distill_mid_stage_and_rerunning_finishes(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    train_teacher(make_toy_config(steps=4), teacher, progress=False)
    args = ["distill", "--teacher", str(teacher), "--outdir", str(tmp_path / "students"), "--plan", "4,2,1",
            "--steps-per-stage", "120", "--batch", "32", "--micro-batch", "32", "--ckpt-every", "1000",
            "--log-every", "1", "--preview-every", "0", "--closeness-samples", "4", "--device", "cpu",
            "--no-progress"]
    stage = tmp_path / "students" / "stage-2step"
    code, err = _signal_when(_launch(args), lambda: _last_step(stage / "stats.jsonl") >= 3, signal.SIGUSR1)
    assert code == preemption.EXIT_CODE and "Traceback" not in err, err
    assert "stopped by SIGUSR1 after step" in err and str(stage) in err
    step = load_training_state(stage / "training-state.pt")["step"]
    assert 3 <= step < 120 and not (tmp_path / "students" / "stage-1step").exists()
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert load_training_state(tmp_path / "students" / "stage-1step" / "training-state.pt")["step"] == 120


def test_sigterm_stops_eval_after_a_batch_and_rerunning_gives_the_same_row(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    train_teacher(make_toy_config(steps=4), teacher, progress=False)
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(teacher), "--steps", "4", "--solver", "euler", "--metric", "toy2d",
            "--num", "1200", "--batch", "6", "--save-every", "1", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    code, err = _signal_when(_launch(args), lambda: out.is_dir() and any(out.glob(".partial-*.npz")),
                             signal.SIGTERM)
    assert code == preemption.EXIT_CODE and "Traceback" not in err, err
    assert "stopped by SIGTERM after" in err and "rerun the same command to resume" in err
    assert any(out.glob(".partial-*.npz")) and not (out / "results.jsonl").exists()
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    row = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    straight = evaluate([str(teacher)], [4], ["euler"], [0.0], "toy2d", 1200, batch_size=6, device="cpu",
                        progress=False)
    assert row["value"] == straight[0]["value"]


def test_ctrl_c_says_truthfully_what_was_kept(tmp_path, capsys, monkeypatch):
    original = distillkac.train._Trainer.after_step

    def interrupted(self, *args):
        original(self, *args)
        if self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(distillkac.train._Trainer, "after_step", interrupted)
    argv = ["train", "--preset", "toy2d", "--steps", "6", "--batch", "16", "--micro-batch", "16", "--device", "cpu",
            "--preview-every", "0", "--no-progress"]
    code, _, err = run_cli([*argv, "--outdir", str(tmp_path / "fresh"), "--ckpt-every", "100"], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("distillkac: interrupted after 3 of 6 steps; nothing was saved yet "
                                            "(the first checkpoint comes at step 6)")
    assert not (tmp_path / "fresh" / "training-state.pt").exists()
    code, _, err = run_cli([*argv, "--outdir", str(tmp_path / "saved"), "--ckpt-every", "2"], capsys)
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"distillkac: interrupted after 3 of 6 steps; the checkpoint of step 2 "
                                            f"in {tmp_path / 'saved'} is kept, rerun the same command to resume")
