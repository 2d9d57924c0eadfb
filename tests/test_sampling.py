"""Sampling: per-image seeds, NFE accounting, student/teacher meta rules, output files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_unet_config
from PIL import Image

from distillkac.checkpoint import save_artifact
from distillkac.errors import DistillKacError
from distillkac.nets import MLPConfig, build_network
from distillkac.paths import build_path
from distillkac.rng import seeded_generators
from distillkac.sampling import cycle_labels, generate, sample_artifact, save_grid_png, save_result

KAC = {"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}

pytestmark = pytest.mark.usefixtures("single_thread")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


class RowByRow(torch.nn.Module):
    """Evaluates its network one row at a time, so its outputs cannot depend on the batch."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.num_classes, self.config = net, net.num_classes, net.config

    def forward(self, x, t, y):
        return torch.cat([self.net(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])


class CountingModel(torch.nn.Module):
    """Counts network rows evaluated (NFE summed over samples)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.num_classes, self.config, self.rows = net, net.num_classes, net.config, 0

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        return self.net(x, t, y)


@pytest.fixture
def unet() -> torch.nn.Module:
    return _perturbed(build_network(tiny_unet_config(3), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_samples_do_not_depend_on_the_batch_size(unet, guidance):
    path = build_path(KAC)
    labels = cycle_labels(16, 3)
    model = RowByRow(unet)
    single = generate(model, path, seeds=range(16), labels=labels, steps=4, guidance=guidance, batch_size=1)
    batched = generate(model, path, seeds=range(16), labels=labels, steps=4, guidance=guidance, batch_size=16)
    assert torch.equal(single.samples, batched.samples)
    assert single.samples.std() > 0.1
    # A plain network's batched BLAS sums may differ in the last bits; the noise may not.
    plain_1 = generate(unet, path, seeds=range(16), labels=labels, steps=4, guidance=guidance, batch_size=1)
    plain_16 = generate(unet, path, seeds=range(16), labels=labels, steps=4, guidance=guidance, batch_size=16)
    torch.testing.assert_close(plain_1.samples, plain_16.samples, atol=1e-5, rtol=0)
    prior_16 = path.prior((16, 1, 8, 8), generator=seeded_generators(range(16)))
    prior_1 = path.prior((1, 1, 8, 8), generator=seeded_generators([5]))
    assert torch.equal(prior_16[5:6], prior_1)


def test_seeds_select_the_images(unet):
    path = build_path(KAC)
    a = generate(unet, path, seeds=[3, 4], labels=[0, 1], steps=3).samples
    b = generate(unet, path, seeds=[4, 3], labels=[1, 0], steps=3).samples
    assert torch.equal(a, b.flip(0))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize(("solver", "guidance", "expected"),
                         [("ab2", 0.0, 10), ("ab2", 2.0, 20), ("euler", 0.0, 10), ("heun", 0.0, 20),
                          ("heun", 1.0, 40), ("midpoint", 0.5, 40)])
def test_nfe_accounting(unet, solver, guidance, expected):
    model = CountingModel(unet)
    result = generate(model, build_path(KAC), seeds=range(6), labels=cycle_labels(6, 3), steps=10,
                      solver=solver, guidance=guidance, batch_size=4)
    assert result.nfe_per_sample == expected
    assert model.rows == expected * 6
    assert result.steps == 10


def _save(tmp_path, model, **meta) -> str:
    directory = tmp_path / meta.get("kind", "teacher")
    save_artifact(directory, model, {"kind": "teacher", "path": KAC, **meta})
    return str(directory)


def test_student_meta_fixes_steps_solver_and_guidance(tmp_path, unet):
    student = _save(tmp_path, unet, kind="student", steps=4, grid="uniform", solver="euler", guidance=1.5)
    result = sample_artifact(student, seeds=range(3), labels=[0, 1, 2])
    assert (result.steps, result.solver, result.guidance, result.nfe_per_sample) == (4, "euler", 1.5, 4)
    # The baked-in guidance means the student is evaluated once per step on the conditional label.
    plain = generate(unet, build_path(KAC), seeds=range(3), labels=[0, 1, 2], steps=4, solver="euler")
    assert torch.equal(result.samples, plain.samples)
    with pytest.raises(DistillKacError, match="distilled for 4 step"):
        sample_artifact(student, seeds=[0], labels=[0], steps=8)
    with pytest.raises(DistillKacError, match="Euler steps only"):
        sample_artifact(student, seeds=[0], labels=[0], solver="ab2")
    with pytest.raises(DistillKacError, match="baked in"):
        sample_artifact(student, seeds=[0], labels=[0], guidance=3.0)


def test_teacher_options_are_checked(tmp_path, unet):
    teacher = _save(tmp_path, unet)
    result = sample_artifact(teacher, seeds=range(2), labels=[0, 2], steps=5, solver="heun", guidance=1.0)
    assert (result.steps, result.nfe_per_sample) == (5, 20)
    with pytest.raises(DistillKacError, match="label 3 is out of range"):
        sample_artifact(teacher, seeds=[0], labels=[3], steps=2)
    unconditional = build_network(MLPConfig(dim=2, hidden=8, depth=1, num_classes=0),
                                  generator=torch.Generator().manual_seed(0))
    directory = tmp_path / "uncond"
    save_artifact(directory, unconditional, {"kind": "teacher", "path": KAC})
    with pytest.raises(DistillKacError, match="unconditional"):
        sample_artifact(directory, seeds=[0], labels=None, steps=2, guidance=1.0)
    assert sample_artifact(directory, seeds=[0, 1], steps=2).samples.shape == (2, 2)


def test_grid_png_and_npz_files(tmp_path, unet):
    result = sample_artifact(_save(tmp_path, unet), seeds=range(5, 11), labels=cycle_labels(6, 3), steps=2)
    files = save_result(result, tmp_path / "out", nrow=3)
    with Image.open(files["picture"]) as picture:
        # 3 x 2 images of 8 px with 1 px gaps, enlarged 4 times.
        assert picture.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    with np.load(files["npz"]) as npz:
        assert npz["samples"].dtype == np.uint8 and npz["samples"].shape == (6, 1, 8, 8)
        assert npz["seeds"].tolist() == [5, 6, 7, 8, 9, 10]
        assert npz["labels"].tolist() == [0, 1, 2, 0, 1, 2]
        meta = json.loads(str(npz["meta"]))
    assert meta["steps"] == 2 and meta["nfe_per_sample"] == 2
    expected = ((result.samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert np.array_equal(np.load(files["npz"])["samples"], expected.numpy())


def test_grid_png_pixels(tmp_path):
    images = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)])
    save_grid_png(images, tmp_path / "g.png", nrow=2, scale=1)
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    assert pixels.shape == (4, 7, 3)
    assert (pixels[1:3, 1:3] == 0).all() and (pixels[1:3, 4:6] == 255).all()


def test_sample_command_writes_grid_and_npz(tmp_path, unet, capsys):
    from distillkac.cli import main

    teacher = _save(tmp_path, unet)
    out = tmp_path / "out"
    code = main(["sample", "--checkpoint", teacher, "--steps", "3", "--guidance", "1", "--num", "5", "--seed", "7",
                 "--class", "2,0", "--out", str(out), "--device", "cpu"])
    assert code == 0 and "NFE 6 per sample" in capsys.readouterr().err
    with np.load(out / "samples.npz") as npz:
        assert npz["seeds"].tolist() == [7, 8, 9, 10, 11] and npz["labels"].tolist() == [2, 0, 2, 0, 2]
        expected = sample_artifact(teacher, seeds=range(7, 12), labels=[2, 0, 2, 0, 2], steps=3, guidance=1.0)
        assert np.array_equal(npz["samples"], ((expected.samples + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    assert (out / "grid.png").is_file()
    assert main(["sample", "--checkpoint", teacher, "--class", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "label 5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
