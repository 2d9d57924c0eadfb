"""Issue 12 on the command line: outputs that compose (sample -> ref/fid), nothing overwritten silently, errors
that name the flag as typed, accurate --help, and ``distillkac.load`` from Python. FID runs on a stand-in
feature extractor here (the real Inception network is exercised by test_metrics and test_own_images_e2e)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_unet_config
from PIL import Image

import distillkac
import distillkac.metrics.fid
from distillkac.checkpoint import save_artifact
from distillkac.cli import COMMANDS, build_parser, main
from distillkac.cli.distill import OVERRIDES as distill_overrides
from distillkac.cli.options import field_flags, speak_flags
from distillkac.cli.train import OVERRIDES
from distillkac.metrics.fid import inception_weights_id, resolve_inception_weights
from distillkac.nets import build_network

KAC = {"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}

pytestmark = pytest.mark.usefixtures("single_thread")


class StandInInception:
    """Replaces InceptionFeatures in the CLI: per-image channel means and mean squares, weights identified
    like the real network's."""

    def __init__(self, weights_path=None, device="cpu", batch_size=250) -> None:
        self.weights_id = inception_weights_id(resolve_inception_weights(weights_path))
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float64) / 255
        return torch.cat([x.mean(dim=(2, 3)), x.square().mean(dim=(2, 3))], dim=1)


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """A stand-in Inception (patched into the CLI) and its weights file."""
    monkeypatch.setattr(distillkac.metrics.fid, "InceptionFeatures", StandInInception)
    file = tmp_path / "weights.pth"
    file.write_bytes(b"stand-in weights")
    return file


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A run directory holding a tiny class-conditional image teacher (1x8x8, 3 classes)."""
    run = tmp_path_factory.mktemp("teacher")
    net = build_network(tiny_unet_config(num_classes=3), generator=torch.Generator().manual_seed(0))
    save_artifact(run / "artifact", net, {"kind": "teacher", "path": KAC})
    return run


def _sample(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--checkpoint", str(teacher), "--out", str(out), "--steps", "2", "--no-progress", *extra]


def _write_pngs(folder: Path, sizes: list[int], seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    for index, size in enumerate(sizes):
        pixels = generator.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


def _error(argv: list[str], capsys) -> str:
    """The stderr of ``distillkac ARGV``, checked to be one error line with exit code 2."""
    capsys.readouterr()
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("distillkac: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------ outputs compose

def test_sample_writes_one_png_per_image_beside_the_grid_and_the_npz(teacher, tmp_path, capsys):
    out = tmp_path / "samples"
    code, _, err = run_cli(_sample(teacher, out, "--num", "5"), capsys)
    assert code == 0, err
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)]
    with np.load(out / "samples.npz") as npz:
        stored = npz["samples"]
    files = np.stack([np.asarray(Image.open(out / "images" / name))[None] for name in names])
    assert stored.shape == (5, 1, 8, 8) and np.array_equal(files, stored)
    assert (out / "grid.png").is_file() and str(out / "images") in err


def test_ref_and_fid_read_what_sample_wrote_and_never_the_grid(teacher, weights, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(_sample(teacher, out, "--num", "5")) == 0
    ref = tmp_path / "ref.npz"
    code, stdout, err = run_cli(["ref", "--data", str(out / "images"), "--out", str(ref), "--inception-weights",
                                 str(weights), "--no-progress"], capsys)
    assert code == 0, err
    line = json.loads(stdout)
    assert (line["dataset"], line["count"], line["resolution"], line["channels"]) == ("folder", 5, [8, 8], 1)
    for images in (out, out / "images", out / "samples.npz"):
        code, stdout, err = run_cli(["fid", "--images", str(images), "--ref", str(ref), "--inception-weights",
                                     str(weights), "--no-progress"], capsys)
        assert code == 0, err
        result = json.loads(stdout)
        assert result["num_images"] == 5 and abs(result["fid"]) < 1e-9, (images, result)
    for data in (out / "samples.npz", out):
        code, stdout, err = run_cli(["ref", "--data", str(data), "--out", str(tmp_path / f"{data.name}-ref.npz"),
                                     "--inception-weights", str(weights), "--no-progress"], capsys)
        assert code == 0, err
        assert json.loads(stdout)["dataset"] == "npz" and json.loads(stdout)["count"] == 5


def test_ref_reads_the_resolution_from_the_images_and_asks_for_it_only_when_they_differ(weights, tmp_path, capsys):
    same = _write_pngs(tmp_path / "same", [12] * 4)
    code, stdout, err = run_cli(["ref", "--data", str(same), "--out", str(tmp_path / "a.npz"), "--inception-weights",
                                 str(weights), "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["resolution"] == [12, 12] and json.loads(stdout)["channels"] == 3
    mixed = _write_pngs(tmp_path / "mixed", [12, 12, 16])
    argv = ["ref", "--data", str(mixed), "--out", str(tmp_path / "b.npz"), "--inception-weights", str(weights),
            "--no-progress"]
    assert "--resolution" in _error(argv, capsys)
    code, stdout, err = run_cli([*argv, "--resolution", "8"], capsys)
    assert code == 0 and json.loads(stdout)["resolution"] == [8, 8], err


# --------------------------------------------------------------------------- nothing overwritten silently

def test_an_existing_ref_output_stays_byte_identical_without_overwrite(weights, tmp_path, capsys):
    folder = _write_pngs(tmp_path / "images", [8] * 4)
    ref = tmp_path / "ref.npz"
    argv = ["ref", "--data", str(folder), "--out", str(ref), "--inception-weights", str(weights), "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    first = ref.read_bytes()
    _write_pngs(tmp_path / "other", [8] * 3, seed=1)
    other = ["ref", "--data", str(tmp_path / "other"), *argv[3:]]
    err = _error(other, capsys)
    assert "already exists" in err and "--overwrite" in err and ref.read_bytes() == first
    assert run_cli([*other, "--overwrite"], capsys)[0] == 0
    assert ref.read_bytes() != first


def test_a_non_empty_sample_out_is_refused_and_overwrite_replaces_the_images(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _error(_sample(teacher, out, "--num", "4"), capsys)
    assert "--out" in err and "not empty" in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(_sample(teacher, out, "--num", "4", "--overwrite")) == 0
    assert main(_sample(teacher, out, "--num", "2")) == 2
    assert len(list((out / "images").iterdir())) == 4
    assert main(_sample(teacher, out, "--num", "2", "--overwrite")) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert (out / "notes.txt").read_text() == "mine"


def _toy_train(outdir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "toy2d", "--outdir", str(outdir), "--steps", "2", "--batch", "16",
            "--micro-batch", "16", "--warmup-images", "0", "--device", "cpu", "--no-progress", "--preview-every",
            "1000", *extra]


def test_a_foreign_outdir_is_refused_unless_overwrite_and_a_run_of_the_same_command_resumes(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    err = _error(_toy_train(foreign), capsys)
    assert "--outdir" in err and "not a train run" in err and "--overwrite" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    run = tmp_path / "run"
    assert main(_toy_train(run)) == 0
    code, _, err = run_cli(_toy_train(run, "--steps", "3"), capsys)
    assert code == 0 and "resumed from 2" in err
    hidden_only = tmp_path / "hidden"
    hidden_only.mkdir()
    (hidden_only / ".lock.tmp").write_text("")
    assert main(_toy_train(hidden_only)) == 0
    assert main(_toy_train(foreign, "--overwrite")) == 0
    assert (foreign / "thesis.tex").read_text() == "years of work" and (foreign / "artifact").is_dir()
    err = _error(["distill", "--teacher", str(run), "--outdir", str(run), "--plan", "4,2",
                                    "--steps-per-stage", "1", "--no-progress"], capsys)
    assert "not a distillation" in err
    err = _error(["eval", "--checkpoint", str(run), "--metric", "toy2d", "--num", "4", "--out",
                                    str(foreign), "--no-progress"], capsys)
    assert "--out" in err and "not empty" in err and not (foreign / "results.jsonl").exists()


def _dry_run(argv: list[str], capsys) -> dict | list:
    capsys.readouterr()
    code, out, err = run_cli([*argv, "--dry-run"], capsys)
    assert code == 0, err
    return json.JSONDecoder().raw_decode(out)[0]  # train adds a line with the parameter count


def test_config_replicates_a_train_run_and_a_distillation(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_toy_train(run, "--lr", "0.003", "--kac-a", "4")) == 0
    replica = _dry_run(["train", "--config", str(run / "config.json"), "--outdir", str(tmp_path / "b")], capsys)
    recorded = json.loads((run / "config.json").read_text())
    recorded.pop("environment")
    assert replica == recorded
    changed = _dry_run(["train", "--config", str(run / "config.json"), "--outdir", str(tmp_path / "b"),
                        "--steps", "7"], capsys)
    assert changed["train"]["steps"] == 7 and changed["path"]["kac_a"] == 4
    distill = ["distill", "--teacher", str(run), "--plan", "4,2", "--steps-per-stage", "1", "--batch", "16",
               "--micro-batch", "16", "--lr", "0.01", "--device", "cpu", "--no-progress"]
    assert main([*distill, "--outdir", str(tmp_path / "d")]) == 0
    again = ["distill", "--teacher", str(run), "--config", str(tmp_path / "d" / "config.json"), "--outdir"]
    first = _dry_run([*distill, "--outdir", str(tmp_path / "e")], capsys)
    assert _dry_run([*again, str(tmp_path / "e")], capsys) == first
    assert main([*distill, "--outdir", str(tmp_path / "d")]) == 0  # its own config.json: a rerun resumes
    with pytest.raises(distillkac.errors.DistillKacError, match="is a distillation; load one of its stages"):
        distillkac.load(tmp_path / "d", device="cpu")
    assert distillkac.load(tmp_path / "d" / "stage-2step", device="cpu").kind == "student"
    assert "--config" in _error(["train", "--config", str(tmp_path / "d" / "config.json"), "--outdir",
                                 str(tmp_path / "c")], capsys)


# ------------------------------------------------------------------------------ errors speak the CLI

def test_config_fields_become_the_flags_that_set_them():
    flags = field_flags(OVERRIDES)
    assert speak_flags("train.micro_batch: must divide train.batch = 32, got 128", flags) == \
        "--micro-batch: must divide --batch = 32, got 128"
    assert speak_flags("resume: /runs/path.kac_a/x was trained with path.kac_a = 9.0.", flags) == \
        "resume: /runs/path.kac_a/x was trained with --kac-a = 9.0."
    assert speak_flags("data.resolution: digits images are 8x8; optim.betas: left", flags) == \
        "--resolution: digits images are 8x8; optim.betas: left"
    distill_flags = field_flags(distill_overrides)
    assert speak_flags("train.micro_batch: must divide train.batch = 64", distill_flags) == \
        "--micro-batch: must divide --batch = 64"
    assert speak_flags("train.sample_every: must be an integer > 0", distill_flags) == \
        "--preview-every: must be an integer > 0"


def test_an_option_error_names_the_flag_as_typed(tmp_path, capsys):
    err = _error(_toy_train(tmp_path / "run", "--micro-batch", "5"), capsys)
    assert "--micro-batch: must divide --batch = 16, got 5" in err and "train." not in err
    err = _error(_toy_train(tmp_path / "run", "--channels", "1"), capsys)
    assert "--channels: the toy2d preset has no image network" in err
    assert main(_toy_train(tmp_path / "toy")) == 0
    err = _error(["train", "--config", str(tmp_path / "toy" / "config.json"), "--outdir", str(tmp_path / "again"),
                  "--model-channels", "8"], capsys)
    assert f"--model-channels: the run of {tmp_path / 'toy' / 'config.json'} has no image network" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line_for_every_command(teacher, weights, tmp_path, capsys):
    folder = _write_pngs(tmp_path / "images", [8] * 2)
    commands = [_sample(teacher, tmp_path / "s"), _toy_train(tmp_path / "t"),
                ["eval", "--checkpoint", str(teacher), "--metric", "digits", "--num", "2", "--out",
                 str(tmp_path / "e")],
                ["ref", "--data", str(folder), "--out", str(tmp_path / "r.npz"), "--inception-weights", str(weights)]]
    for argv in commands:
        err = _error([*argv, "--device", "cuda"], capsys)
        assert "--device cuda: CUDA is not available on this machine" in err, argv
    assert not any((tmp_path / name).exists() for name in ("s", "t", "e", "r.npz"))


def test_an_image_passed_as_reference_statistics_is_named_as_such(tmp_path, capsys):
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(jpeg)
    np.savez(tmp_path / "images.npz", samples=np.zeros((2, 3, 8, 8), dtype=np.uint8))
    err = _error(["fid", "--images", str(tmp_path / "images.npz"), "--ref", str(jpeg)], capsys)
    assert "--ref" in err and "JPEG image, not an .npz" in err
    assert "unsafe" not in err and "allow_pickle" not in err


def test_unreadable_images_are_one_summary_line_without_a_python_warning(weights, tmp_path, capsys):
    folder = _write_pngs(tmp_path / "images", [8] * 4)
    for name in ("bad-1.png", "bad-2.png"):
        (folder / name).write_bytes(b"\x89PNG but not really")
    code, stdout, err = run_cli(["ref", "--data", str(folder), "--out", str(tmp_path / "ref.npz"),
                                 "--inception-weights", str(weights), "--no-progress"], capsys)
    assert code == 0 and json.loads(stdout)["count"] == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distillkac: warning: ") and "skipped 2 unreadable" in lines[0]


# ------------------------------------------------------------------------------------ --help is accurate

def _option_entries(help_text: str) -> list[str]:
    """The help of each option: its line(s) from "  -x/--name" to the next option."""
    options = help_text.split("options:", 1)[1]
    return [entry for entry in re.split(r"\n(?=  -)", options) if entry.strip().startswith("-")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_real_defaults_once_without_internal_names(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    for text in ("``", "RunConfig", "the preset's value", "(default: None)", "(default: False)", "validate"):
        assert text not in out, (command, text)
    for entry in _option_entries(out):
        assert entry.count("default") <= 1, entry
    if command != "demo":
        assert "--no-progress" in out
    if command not in ("fid",):
        assert re.search(r"--out\w*( \w+)?, --out", out), "both spellings of the output option"


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"distillkac {distillkac.__version__}"


def test_the_other_spelling_of_the_output_option_is_accepted(teacher, tmp_path):
    assert main(["sample", "--checkpoint", str(teacher), "--outdir", str(tmp_path / "s"), "--steps", "1",
                 "--num", "1", "--no-progress"]) == 0
    assert (tmp_path / "s" / "images" / "000000.png").is_file()


# ------------------------------------------------------------------------------------ from Python

def test_load_and_sample_from_python_match_the_sample_command(teacher, tmp_path):
    model = distillkac.load(teacher, device="cpu")
    images = model.sample(labels=[2, 2, 1], seed=4, steps=2)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 8, 8)
    assert model.kind == "teacher" and model.num_classes == 3 and model.data_shape == (1, 8, 8)
    assert main(_sample(teacher, tmp_path / "s", "--num", "3", "--seed", "4", "--class", "2,2,1")) == 0
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        assert np.array_equal(npz["samples"], images.numpy())
    from_artifact = distillkac.load(teacher / "artifact", device="cpu")
    assert torch.equal(from_artifact.sample(labels=[2], seed=4, steps=2)[0], images[0])
    cycled = from_artifact.sample(num=4, seed=4, steps=2)  # labels cycle through the classes: 0, 1, 2, 0
    assert torch.equal(cycled, model.sample(labels=[0, 1, 2, 0], seed=4, steps=2))
    with pytest.raises(distillkac.errors.DistillKacError, match="num"):
        model.sample(num=2, labels=[0, 1, 2])


def test_the_readme_own_images_recipe_is_train_distill_sample_ref_fid_with_valid_options():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Train on your own images", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("distillkac ")]
    assert [command[1] for command in commands] == ["train", "distill", "sample", "ref", "fid"]
    parser = build_parser()
    for command in commands:
        parser.parse_args(command[1:])


def test_the_readme_shows_the_python_one_liner():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert 'model = distillkac.load("RUN2/stage-1step")' in readme
    assert "images = model.sample(labels=[3, 3, 7], seed=0)" in readme
