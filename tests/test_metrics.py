"""Tests for distillkac.metrics and the `ref` / `fid` commands.

The Inception forward pass is slow on a CPU, so the FID tests use two sets of 6 images; they need the
offline weights file (shared/data/inception, or $DISTILLKAC_INCEPTION_WEIGHTS) and are skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from distillkac.cli import main
from distillkac.data import DataConfig, load_dataset, to_uint8, toy_mixture
from distillkac.errors import DistillKacError
from distillkac.metrics.digits import DigitsClassifier, default_cache_dir, digits_metrics
from distillkac.metrics.fid import (
    WEIGHTS_ENV,
    InceptionFeatures,
    Reference,
    compute_reference,
    feature_stats,
    fid_against_reference,
    fid_label,
    load_reference,
    reference_meta,
    resolve_inception_weights,
    save_reference,
)
from distillkac.metrics.inputs import image_file_batches
from distillkac.metrics.stats import GaussianStats, Moments, frechet_distance
from distillkac.metrics.toy2d import mixture_log_joint, sample_mixture, sliced_wasserstein, toy2d_metrics

SHARED_WEIGHTS = (Path(__file__).resolve().parents[2]
                  / "shared/data/inception/pt_inception-2015-12-05-pool3-nanfc.pth")
WEIGHTS = Path(os.environ.get(WEIGHTS_ENV) or SHARED_WEIGHTS)
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"Inception weights file {WEIGHTS} is "
                                   f"absent (set {WEIGHTS_ENV} to the pt_inception-2015-12-05 pool3 weights)")
SET_SIZE = 6


# ----------------------------------------------------------------------------------- helpers

def smooth_images(count: int, channels: int, low: int, seed: int) -> torch.Tensor:
    """uint8 [count, channels, 32, 32]: random low-resolution noise upsampled bilinearly."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((count, channels, low, low), generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8)


def write_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(folder / f"{i:03d}.png")
    return folder


class MeanColourFeatures:
    """A stand-in extractor: per-image channel means and mean squares (float64 [B, 2C])."""

    def __init__(self, weights_id: str = "fake-weights", batch_size: int = 4) -> None:
        self.weights_id = weights_id
        self.batch_size = batch_size
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = images.to(torch.float64) / 255
        return torch.cat([x.mean(dim=(2, 3)), x.square().mean(dim=(2, 3))], dim=1)


class TinyImageDataset:
    """The distillkac.data dataset interface over a uint8 tensor."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.data_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, indices):
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.images[rows].to(torch.float32) / 127.5 - 1, torch.zeros(len(rows), dtype=torch.long)

    def describe(self) -> dict:
        return {"name": "tiny", "count": len(self)}


def fake_reference(weights_id: str = "fake-weights", shape=(3, 32, 32), dim: int = 6) -> Reference:
    stats = GaussianStats(np.zeros(dim), np.eye(dim), 10)
    return Reference(stats, reference_meta({"name": "tiny"}, "train", 10, shape, weights_id))


# ------------------------------------------------------------------------------ small helpers

def test_to_uint8_inverts_the_dataset_scaling_and_clamps():
    values = torch.arange(256, dtype=torch.uint8)
    scaled = values.to(torch.float32) / 127.5 - 1  # how distillkac.data.get_batch maps uint8 to [-1, 1]
    assert torch.equal(to_uint8(scaled), values)
    assert to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0])).tolist() == [0, 0, 128, 255, 255]


def test_fid_label():
    assert [fid_label(n) for n in (50000, 5000, 1234, 10000, 999, 1500)] == [
        "FID-50k", "FID-5k", "FID-1234", "FID-10k", "FID-999", "FID-1500"]


def test_resolve_inception_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert resolve_inception_weights(None) is None
    with pytest.raises(DistillKacError, match="--inception-weights"):
        resolve_inception_weights(tmp_path / "missing.pth")
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    assert resolve_inception_weights(present) == str(present)
    monkeypatch.setenv(WEIGHTS_ENV, str(present))
    assert resolve_inception_weights(None) == str(present)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(DistillKacError, match=WEIGHTS_ENV):
        resolve_inception_weights(None)


def test_failed_download_asks_for_a_weights_file(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(DistillKacError, match=f"pass --inception-weights PATH or set {WEIGHTS_ENV}"):
        InceptionFeatures(None, "cpu")


def test_bad_weights_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DistillKacError, match="not a torch state_dict"):
        InceptionFeatures(garbage, "cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(DistillKacError, match="does not fit"):
        InceptionFeatures(wrong, "cpu")


# ------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_diagonal_gaussians():
    generator = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(2, 40, generator=generator, dtype=torch.float64).numpy()
    s1, s2 = (torch.rand(2, 40, generator=generator, dtype=torch.float64) * 3 + 0.01).numpy()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-8)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # For 2x2 PSD A, B: tr sqrt(AB) = sqrt(tr(AB) + 2 sqrt(det A det B)) (eigenvalues of AB are >= 0).
    a = np.array([[2.0, 0.7], [0.7, 1.0]])
    b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    trace_sqrt = math.sqrt(np.trace(a @ b) + 2 * math.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2 * trace_sqrt
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm_and_handles_rank_deficiency():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(60, 30, generator=generator, dtype=torch.float64).numpy()
    y = (torch.randn(80, 30, generator=generator, dtype=torch.float64) * 0.7 + 0.3).numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    mu1, mu2 = x.mean(0), y.mean(0)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-8)
    few = x[:5]  # a rank-4 covariance in 30-d: the distance of the Gaussian fit to itself is 0
    assert abs(frechet_distance(few.mean(0), np.cov(few, rowvar=False), few.mean(0),
                                np.cov(few, rowvar=False))) < 1e-12


def test_frechet_distance_refuses_bad_input():
    with pytest.raises(DistillKacError, match="not a covariance"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(DistillKacError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------- streaming statistics

def test_streaming_stats_equal_one_shot_numpy():
    generator = torch.Generator().manual_seed(2)
    # A large offset against a small spread is where naive sums of squares lose digits.
    features = torch.randn(1003, 48, generator=generator, dtype=torch.float64) * 0.5 + 7.0
    batches = torch.split(features, [1, 250, 250, 2, 500])
    stats = feature_stats(batches, lambda rows: rows, progress=False)
    assert stats.count == 1003
    np.testing.assert_allclose(stats.mu, features.numpy().mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.sigma, np.cov(features.numpy(), rowvar=False), rtol=0, atol=1e-10)
    moments = Moments.empty().add(features[:1])
    with pytest.raises(DistillKacError, match="at least 2"):
        moments.stats()


def test_moments_restore_their_arrays_and_older_shifted_sums():
    """``Moments.arrays`` round-trips bit for bit; the shifted sums that reference progress files held
    before (count, shift, sum, outer) give the same statistics to float64 round-off."""
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.5 + 7.0
    moments = Moments.empty().add(features[:20]).add(features[20:])
    restored = Moments.from_arrays(moments.arrays())
    assert restored.count == 50 and torch.equal(restored.mean, moments.mean)
    assert torch.equal(restored.scatter, moments.scatter)
    shift = features[:20].mean(dim=0)
    centred = features - shift
    legacy = {"count": np.asarray(50), "shift": shift.numpy(), "sum": centred.sum(dim=0).numpy(),
              "outer": (centred.T @ centred).numpy()}
    stats = Moments.from_arrays(legacy).stats()
    np.testing.assert_allclose(stats.mu, features.numpy().mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features.numpy(), rowvar=False), rtol=0, atol=1e-12)
    assert Moments.from_arrays({**legacy, "outer": legacy["outer"].astype(np.float32)}) is None
    assert Moments.from_arrays({**moments.arrays(), "count": np.asarray(0)}) is None


def test_compute_reference_uses_uint8_images_and_a_seeded_subset():
    images = smooth_images(10, 3, 4, seed=3)
    extractor = MeanColourFeatures(batch_size=3)
    ref = compute_reference(TinyImageDataset(images), "train", extractor, progress=False)
    expected = GaussianStats.from_features(extractor(images))
    np.testing.assert_allclose(ref.stats.mu, expected.mu, atol=1e-12)
    np.testing.assert_allclose(ref.stats.sigma, expected.sigma, atol=1e-12)
    assert ref.meta["resolution"] == [32, 32] and ref.meta["channels"] == 3 and ref.meta["count"] == 10
    assert ref.meta["weights_sha256"] == "fake-weights" and ref.meta["split"] == "train"
    subset = compute_reference(TinyImageDataset(images), "train", extractor, limit=4, seed=5, progress=False)
    chosen = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:4].sort().values
    np.testing.assert_allclose(subset.stats.mu, GaussianStats.from_features(extractor(images[chosen])).mu,
                               atol=1e-12)
    assert subset.meta["subset"] == {"limit": 4, "seed": 5} and subset.stats.count == 4


# ------------------------------------------------------------------------------ reference files

def test_reference_round_trip(tmp_path):
    ref = fake_reference()
    ref.stats.mu[:] = np.arange(6) * 0.1
    path = tmp_path / "ref.npz"
    saved = save_reference(path, ref.stats, ref.meta)
    loaded = load_reference(path)
    assert np.array_equal(loaded.stats.mu, ref.stats.mu)
    assert np.array_equal(loaded.stats.sigma, ref.stats.sigma)
    assert loaded.stats.mu.dtype == np.float64 and loaded.stats.count == 10
    assert loaded.meta == saved and saved["stats_sha256"] == ref.stats.sha256()
    assert loaded.meta["dataset"] == {"name": "tiny"} and loaded.path == str(path)


def test_reference_tampering_and_bad_files_are_detected(tmp_path):
    ref = fake_reference()
    path = tmp_path / "ref.npz"
    save_reference(path, ref.stats, ref.meta)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["sigma"][0, 0] += 1e-9
    np.savez(tmp_path / "altered.npz", **arrays)
    with pytest.raises(DistillKacError, match="altered.npz is corrupt or was altered"):
        load_reference(tmp_path / "altered.npz")
    (tmp_path / "junk.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(DistillKacError, match="junk.npz is not a distillkac reference"):
        load_reference(tmp_path / "junk.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(DistillKacError, match="plain.npy is not a distillkac reference"):
        load_reference(tmp_path / "plain.npy")
    with pytest.raises(DistillKacError, match="does not exist"):
        load_reference(tmp_path / "missing.npz")


def test_fid_refuses_other_weights_and_other_resolution():
    extractor = MeanColourFeatures(weights_id="other-weights")
    images = [smooth_images(4, 3, 4, seed=4)]
    with pytest.raises(DistillKacError, match="Inception weights fake-weights"):
        fid_against_reference(iter(images), fake_reference(), extractor, progress=False)
    extractor = MeanColourFeatures()
    small = [smooth_images(4, 3, 4, seed=4)[:, :, :16, :16]]
    with pytest.raises(DistillKacError, match=r"is for \[32, 32\] images, but the images are \[16, 16\]"):
        fid_against_reference(iter(small), fake_reference(), extractor, progress=False)
    gray = [smooth_images(4, 1, 4, seed=4)]
    with pytest.raises(DistillKacError, match="3-channel images"):
        fid_against_reference(iter(gray), fake_reference(), extractor, progress=False)
    assert extractor.calls == 0


def test_fid_against_reference_with_a_stand_in_extractor():
    images = smooth_images(12, 3, 4, seed=6)
    extractor = MeanColourFeatures()
    stats = GaussianStats.from_features(extractor(images))
    ref = Reference(stats, reference_meta({"name": "tiny"}, "train", 12, (3, 32, 32), "fake-weights"))
    result = fid_against_reference(torch.split(images, 5), ref, extractor, progress=False)
    assert result["fid"] == pytest.approx(0.0, abs=1e-10)
    assert result["num_images"] == 12 and result["label"] == "FID-12" and result["resolution"] == [32, 32]
    with pytest.raises(DistillKacError, match="uint8"):
        fid_against_reference([images.float()], ref, extractor, progress=False)


def test_image_file_batches_reads_folders_and_both_npz_layouts(tmp_path):
    images = smooth_images(5, 3, 4, seed=7)
    folder = write_pngs(images, tmp_path / "pngs")
    count, batches = image_file_batches(folder, batch_size=2)
    assert count == 5 and torch.equal(torch.cat(list(batches)), images)
    np.savez(tmp_path / "nhwc.npz", images=images.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "nchw.npz", images=images.numpy())
    for name in ("nhwc.npz", "nchw.npz"):
        count, batches = image_file_batches(tmp_path / name, batch_size=3)
        assert count == 5 and torch.equal(torch.cat(list(batches)), images)
    count, batches = image_file_batches(folder, batch_size=5, channels=1)
    assert next(batches).shape == (5, 1, 32, 32)
    np.savez(tmp_path / "floats.npz", images=images.numpy().astype(np.float32))
    with pytest.raises(DistillKacError, match="uint8"):
        image_file_batches(tmp_path / "floats.npz", batch_size=3)


# ------------------------------------------------------------------------------ real Inception

@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    colour = smooth_images(SET_SIZE, 3, 4, seed=10)
    gray = smooth_images(SET_SIZE, 1, 8, seed=11)
    return {"root": root, "colour": colour, "gray": gray,
            "colour_dir": write_pngs(colour, root / "colour"), "gray_dir": write_pngs(gray, root / "gray")}


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(WEIGHTS, "cpu", batch_size=SET_SIZE)


@pytest.fixture
def one_thread():
    """One torch and one BLAS thread: on a small shared CPU, extra threads spin and make the Inception
    forward and the 2048-d eigen-decompositions several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@needs_weights
def test_fid_equals_torch_fidelity_and_is_zero_against_itself(image_sets, inception, one_thread):
    """Same PNG folders; the gray set goes through our 1-channel path and torch-fidelity's convert("RGB").

    The statistics of a set against themselves give < 1e-6: 6 images in 2048-d make rank-5
    covariances, where the square roots of round-off eigenvalues would otherwise show.
    """
    import torch_fidelity

    count_a, batches_a = image_file_batches(image_sets["colour_dir"], batch_size=SET_SIZE, channels=3)
    count_b, batches_b = image_file_batches(image_sets["gray_dir"], batch_size=SET_SIZE, channels=1)
    stats_a = feature_stats(batches_a, inception, progress=False)
    stats_b = feature_stats(batches_b, inception, progress=False)
    ours = frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(image_sets["colour_dir"]), input2=str(image_sets["gray_dir"]), fid=True, cuda=False,
        cache=False, verbose=False, save_cpu_ram=True,
        feature_extractor_weights_path=str(WEIGHTS))["frechet_inception_distance"]
    assert count_a == count_b == SET_SIZE and ours > 1.0
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert abs(frechet_distance(stats_a.mu, stats_a.sigma, stats_a.mu, stats_a.sigma)) < 1e-6


class StandInInception(MeanColourFeatures):
    """Replaces InceptionFeatures in the CLI: same constructor, weights identified like the real one."""

    def __init__(self, weights_path=None, device="cpu", batch_size=250) -> None:
        from distillkac.metrics.fid import inception_weights_id

        super().__init__(inception_weights_id(resolve_inception_weights(weights_path)), batch_size)


def test_cli_ref_then_fid_with_a_stand_in_extractor(tmp_path, capsys, monkeypatch):
    """The command chain on a PNG folder (`ref`) and the same images as an NHWC .npz (`fid`): FID ~ 0."""
    import distillkac.metrics.fid

    monkeypatch.setattr(distillkac.metrics.fid, "InceptionFeatures", StandInInception)
    images = smooth_images(9, 3, 4, seed=16)
    folder = write_pngs(images, tmp_path / "pngs")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in weights")
    ref_file = tmp_path / "ref.npz"
    assert main(["ref", "--dataset", "folder", "--data", str(folder), "--resolution", "32", "--out",
                 str(ref_file), "--inception-weights", str(weights), "--batch", "4", "--no-progress"]) == 0
    ref_line = json.loads(capsys.readouterr().out.strip())
    assert ref_line["count"] == 9 and ref_line["resolution"] == [32, 32] and ref_line["channels"] == 3
    assert load_reference(ref_file).meta["weights_sha256"] == hashlib.sha256(b"stand-in weights").hexdigest()
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=images.permute(0, 2, 3, 1).numpy())
    assert main(["fid", "--images", str(npz), "--ref", str(ref_file), "--inception-weights", str(weights),
                 "--batch", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[0])
    assert len(lines) == 1 and result["num_images"] == 9 and result["label"] == "FID-9"
    assert abs(result["fid"]) < 1e-10 and result["reference_split"] == "train"


@pytest.mark.slow
@needs_weights
def test_cli_ref_then_fid_of_the_same_images_is_zero(image_sets, capsys, one_thread):
    """The real network: `ref` on the PNG folder, `fid` on the same images as an NHWC .npz: FID < 1e-6."""
    root = image_sets["root"]
    ref_file = root / "colour-ref.npz"
    assert main(["ref", "--dataset", "folder", "--data", str(image_sets["colour_dir"]), "--resolution", "32",
                 "--out", str(ref_file), "--inception-weights", str(WEIGHTS), "--device", "cpu",
                 "--batch", "5", "--no-progress"]) == 0
    ref_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ref_line["count"] == SET_SIZE and ref_line["resolution"] == [32, 32] and ref_line["channels"] == 3
    npz = root / "colour.npz"
    np.savez(npz, images=image_sets["colour"].permute(0, 2, 3, 1).numpy())
    assert main(["fid", "--images", str(npz), "--ref", str(ref_file), "--inception-weights", str(WEIGHTS),
                 "--device", "cpu", "--batch", "3", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert len(lines) == 1 and result["num_images"] == SET_SIZE and result["label"] == f"FID-{SET_SIZE}"
    assert abs(result["fid"]) < 1e-6


# ---------------------------------------------------------------------------------- CLI errors

def run_cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distillkac: error: ")
    return err[0]


def test_cli_fid_errors_are_one_line(tmp_path, capsys):
    """Every check here happens before the Inception network is built, so no weights file is needed."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in weights")
    ref_file = tmp_path / "ref.npz"
    ref = fake_reference(weights_id=hashlib.sha256(b"stand-in weights").hexdigest())
    save_reference(ref_file, ref.stats, ref.meta)
    images = tmp_path / "images.npz"
    np.savez(images, images=smooth_images(3, 3, 4, seed=8).numpy())
    message = run_cli_error(["fid", "--images", str(tmp_path / "nope"), "--ref", str(ref_file),
                             "--inception-weights", str(weights)], capsys)
    assert "--images:" in message and "nope does not exist" in message
    other_ref = tmp_path / "other.npz"
    save_reference(other_ref, fake_reference().stats, fake_reference().meta)
    message = run_cli_error(["fid", "--images", str(images), "--ref", str(tmp_path / "missing.npz")], capsys)
    assert "missing.npz does not exist" in message
    message = run_cli_error(["fid", "--images", str(images), "--ref", str(images)], capsys)
    assert "is not a distillkac reference statistics file" in message
    message = run_cli_error(["fid", "--images", str(images), "--ref", str(other_ref),
                             "--inception-weights", str(weights)], capsys)
    assert "was made with Inception weights fake-weights" in message
    message = run_cli_error(["ref", "--dataset", "cifar10", "--data", str(tmp_path), "--out",
                             str(tmp_path / "r.npz"), "--resolution", "64"], capsys)
    assert "--resolution/--channels" in message


# --------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(classifier_cache):
    return DigitsClassifier.load_or_train(classifier_cache, seed=0)


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset(DataConfig(name="digits"), "test")


def test_digits_classifier_is_accurate_and_cached(classifier, classifier_cache, digits_test):
    images, labels = digits_test.get_batch(torch.arange(len(digits_test)))
    accuracy = float((classifier.predict(images) == labels).double().mean())
    assert accuracy >= 0.95 and accuracy == pytest.approx(classifier.test_accuracy, abs=1e-12)
    assert not classifier.from_cache and classifier.features(images[:3]).shape == (3, 64)
    again = DigitsClassifier.load_or_train(classifier_cache, seed=0)
    assert again.from_cache and again.test_accuracy == classifier.test_accuracy
    assert torch.equal(again(images), classifier(images))
    sidecars = list(classifier_cache.glob("*.json"))
    assert len(sidecars) == 1 and json.loads(sidecars[0].read_text())["test_accuracy"] >= 0.95


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKAC_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DISTILLKAC_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "distillkac"


def test_digits_metrics_real_digits_versus_noise(classifier, digits_test):
    images, labels = digits_test.get_batch(torch.arange(len(digits_test)))
    half = len(digits_test) // 2
    real = digits_metrics(images[:half], labels[:half], classifier, images[half:])
    noise = torch.rand(images[:half].shape, generator=torch.Generator().manual_seed(9)) * 2 - 1
    fake = digits_metrics(noise, labels[:half], classifier, images[half:])
    assert real["class_accuracy"] >= 0.95 and fake["class_accuracy"] < 0.5
    assert real["fd_digits"] < 0.1 * fake["fd_digits"] and real["fd_pixels"] < 0.1 * fake["fd_pixels"]
    assert set(real) == {"class_accuracy", "fd_digits", "fd_pixels", "num_samples", "num_reference"}
    null_labels = torch.full((half,), 10)
    assert digits_metrics(images[:half], null_labels, classifier, images[half:])["class_accuracy"] is None


# ---------------------------------------------------------------------------------------- toy2d

def test_mixture_log_density_matches_scipy():
    means, std, weights = toy_mixture(DataConfig(name="toy2d"))
    points = torch.tensor([[0.1, -0.2], [0.75, 0.75], [-0.3, 0.26]], dtype=torch.float64)
    expected = [math.log(sum(float(w) * scipy.stats.multivariate_normal(m.numpy(), std ** 2).pdf(p.numpy())
                             for m, w in zip(means, weights))) for p in points]
    log_density = torch.logsumexp(mixture_log_joint(points, (means, std, weights)), dim=1)
    np.testing.assert_allclose(log_density.numpy(), expected, rtol=1e-10)


def test_toy2d_metrics_of_exact_samples_and_of_one_mode():
    mixture = toy_mixture(DataConfig(name="toy2d"))
    means, std, weights = mixture
    count = 4000
    points, modes = sample_mixture(mixture, count, torch.Generator().manual_seed(12))
    metrics = toy2d_metrics(points, modes, mixture)
    # Modes 10 std apart: E log p = log w - log(2 pi std^2) - 1 (2-D); log N has variance 1 per sample.
    expected = math.log(1 / 16) - math.log(2 * math.pi * std ** 2) - 1
    assert metrics["log_likelihood"] == pytest.approx(expected, abs=5 / math.sqrt(count))
    assert metrics["mode_coverage"] == 1.0 and metrics["class_accuracy"] >= 0.999
    single = means[5] + std * torch.randn(count, 2, generator=torch.Generator().manual_seed(13),
                                          dtype=torch.float64)
    one_mode = toy2d_metrics(single, torch.full((count,), 5), mixture)
    assert one_mode["mode_coverage"] == pytest.approx(1 / 16, abs=1e-12)
    assert one_mode["class_accuracy"] >= 0.999
    assert toy2d_metrics(single, None, mixture)["class_accuracy"] is None
    assert metrics["sliced_wasserstein"] < 0.05 < one_mode["sliced_wasserstein"]


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift():
    points = torch.randn(500, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    shift = torch.tensor([0.3, -1.2], dtype=torch.float64)
    directions = torch.randn((2, 64), generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    expected = float((shift @ directions).square().mean().sqrt())
    measured = sliced_wasserstein(points, points + shift, 64, torch.Generator().manual_seed(15))
    assert measured == pytest.approx(expected, abs=1e-12)
    assert sliced_wasserstein(points, points, 64, torch.Generator().manual_seed(15)) == 0.0

