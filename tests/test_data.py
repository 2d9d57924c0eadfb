"""Tests for distillkac.data: digits, CIFAR-10 (batches, image folders, the shared zip), folders, toy2d."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillkac.data import (
    CIFAR10_CLASSES,
    DataConfig,
    checkerboard_squares,
    load_dataset,
    toy_mixture,
)
from distillkac.data import images as data
from distillkac.errors import DistillKacError
from distillkac.rng import seeded_generators

CIFAR_ZIP = Path("/work/shared/data/cifar10/cifar10_jpegq75.zip")


# ------------------------------------------------------------------------------------ fixture helpers

def _random_pixels(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, channels), generator=generator, dtype=torch.uint8).numpy()


def _write_image(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder).as_posix())
    return zip_path


def _class_folder(root: Path) -> Path:
    """cat/ (3 images) and dog/ (2 images) of assorted sizes and formats."""
    sizes = {"cat/a.png": (12, 10), "cat/b.jpg": (10, 10), "cat/c.png": (9, 14), "dog/a.png": (16, 8),
             "dog/b.bmp": (10, 11)}
    formats = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP"}
    for seed, (name, (height, width)) in enumerate(sizes.items()):
        _write_image(root / name, _random_pixels(seed, height, width), formats[Path(name).suffix])
    return root


def _cifar_style_folder(root: Path, classes=CIFAR10_CLASSES, per_class: int = 1) -> Path:
    seed = 0
    for split in ("train", "test"):
        for cls in classes:
            for k in range(per_class):
                seed += 1
                _write_image(root / split / cls / f"{k:04d}.png", _random_pixels(seed, 32, 32))
    return root


def _write_cifar_batch(path: Path, pixels: np.ndarray, labels: list[int]) -> None:
    batch = {b"batch_label": b"fake", b"data": pixels.reshape(len(labels), 3072), b"labels": labels,
             b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(batch, protocol=4))


def _fake_cifar_batches(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for seed, name in enumerate([*data.CIFAR10_TRAIN_BATCHES, "test_batch"]):
        count = 3 if name == "test_batch" else 2
        pixels = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(seed),
                               dtype=torch.uint8).numpy()
        labels = [(seed + k) % 10 for k in range(count)]
        _write_cifar_batch(folder / name, pixels, labels)
        written[name] = (pixels, labels)
    return written


def _folder_cfg(path: Path, **overrides) -> DataConfig:
    return DataConfig(name="folder", path=str(path), resolution=overrides.pop("resolution", 8), **overrides)


# ------------------------------------------------------------------------------------------- config

def test_config_round_trips_through_json():
    cfg = DataConfig(name="folder", path="/x", resolution=64, channels=1, hflip=True, bad_files="error",
                     toy="checkerboard", toy_size=7, seed=3, labels="none")
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DataConfig.from_dict({"name": "digits"}) == DataConfig(name="digits")


def test_config_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(DistillKacError, match=r"data: unknown key\(s\) \['size'\]"):
        DataConfig.from_dict({"name": "digits", "size": 3})
    with pytest.raises(DistillKacError, match="data: missing key 'name'"):
        DataConfig.from_dict({"path": "x"})


# ------------------------------------------------------------------------------------------- digits

def test_digits_shapes_ranges_and_split_sizes():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = load_dataset(DataConfig("digits")), load_dataset(DataConfig("digits"), "test")
    assert (len(train), len(test)) == (1500, 297)
    for ds in (train, test):
        assert ds.data_shape == (1, 8, 8) and ds.num_classes == 10 and ds.data.dtype == torch.uint8
        expected = np.round(bunch.images[ds.source_indices.numpy()] * 255 / 16).astype(np.uint8)
        assert torch.equal(ds.data[:, 0], torch.from_numpy(expected))
        assert torch.equal(ds.labels, torch.from_numpy(bunch.target[ds.source_indices.numpy()]).long())
    x, y = train.get_batch(torch.arange(len(train)))
    assert x.dtype == torch.float32 and y.dtype == torch.long and x.shape == (1500, 1, 8, 8)
    assert (x.min().item(), x.max().item()) == (-1.0, 1.0)
    torch.testing.assert_close(x, train.data.float() / 127.5 - 1, rtol=0, atol=1e-6)
    image, label = train[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8) and label == int(train.labels[3])


def test_digits_split_is_disjoint_stratified_and_fixed():
    train, test = load_dataset(DataConfig("digits", seed=5)), load_dataset(DataConfig("digits"), "test")
    all_indices = torch.cat([train.source_indices, test.source_indices]).sort().values
    assert torch.equal(all_indices, torch.arange(1797))
    total = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10).double()
    held_out = torch.bincount(test.labels, minlength=10).double()
    assert torch.all((held_out - total * 297 / 1797).abs() < 1)
    again = load_dataset(DataConfig("digits"), "test")
    assert torch.equal(again.source_indices, test.source_indices) and torch.equal(again.data, test.data)


def test_hflip_uses_only_the_generator_and_flips_whole_images():
    ds = load_dataset(DataConfig("digits", hflip=True))
    indices = torch.arange(64)
    plain = ds.data[indices].float() / 127.5 - 1
    mirrored = torch.flip(plain, dims=[-1])
    asymmetric = (plain != mirrored).flatten(1).any(1)
    assert asymmetric.all()
    x, _ = ds.get_batch(indices, torch.Generator().manual_seed(0))
    flipped = (x == mirrored).flatten(1).all(1)
    assert torch.all(flipped | (x == plain).flatten(1).all(1))
    assert 16 <= int(flipped.sum()) <= 48  # Binomial(64, 1/2): mean 32, sd 4
    x_again, _ = ds.get_batch(indices, torch.Generator().manual_seed(0))
    x_other, _ = ds.get_batch(indices, torch.Generator().manual_seed(1))
    assert torch.equal(x, x_again) and not torch.equal(x, x_other)
    assert torch.equal(ds.get_batch(indices)[0], plain)


def test_hflip_with_per_row_generators_does_not_depend_on_the_batch():
    ds = load_dataset(DataConfig("digits", hflip=True))
    seeds = list(range(100, 110))
    batch, _ = ds.get_batch(torch.arange(10), seeded_generators(seeds))
    for row, seed in enumerate(seeds):
        single, _ = ds.get_batch(torch.tensor([row]), seeded_generators([seed]))
        assert torch.equal(single[0], batch[row])


def test_describe_is_json_ready():
    summary = load_dataset(DataConfig("digits")).describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["count"] == 1500 and summary["data_shape"] == [1, 8, 8]
    assert sum(summary["class_counts"]) == 1500


# -------------------------------------------------------------------------------------- folders

def test_zip_and_folder_give_identical_tensors_and_subfolder_labels(tmp_path):
    folder = _class_folder(tmp_path / "pets")
    archive = _zip_folder(folder, tmp_path / "pets.zip")
    from_folder = load_dataset(_folder_cfg(folder))
    from_zip = load_dataset(_folder_cfg(archive))
    assert torch.equal(from_folder.data, from_zip.data) and torch.equal(from_folder.labels, from_zip.labels)
    assert from_folder.class_names == ("cat", "dog") and from_folder.num_classes == 2
    assert from_folder.labels.tolist() == [0, 0, 0, 1, 1]
    assert from_folder.data.shape == (5, 3, 8, 8) and from_folder.data_shape == (3, 8, 8)
    assert from_zip.describe()["source_format"] == "zip-images"
    assert from_folder.describe()["split"] == "all"


def test_single_wrapper_folder_is_not_a_class(tmp_path):
    _class_folder(tmp_path / "src" / "wrapper")
    archive = _zip_folder(tmp_path / "src", tmp_path / "wrapped.zip")
    ds = load_dataset(_folder_cfg(archive))
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 0, 0, 1, 1]


def test_flat_folder_is_unconditional_and_split_is_ignored(tmp_path):
    for k in range(3):
        _write_image(tmp_path / f"img{k}.png", _random_pixels(k, 20, 30))
    (tmp_path / "notes.txt").write_text("not an image")
    train = load_dataset(_folder_cfg(tmp_path))
    test = load_dataset(_folder_cfg(tmp_path), "test")
    assert train.num_classes == 0 and train.class_names == () and train.labels.tolist() == [0, 0, 0]
    assert torch.equal(train.data, test.data)
    assert train.describe()["ignored_files"] == 1 and train.describe()["class_counts"] == []


def test_label_modes(tmp_path):
    folder = _class_folder(tmp_path / "pets")
    assert load_dataset(_folder_cfg(folder, labels="none")).num_classes == 0
    _write_image(folder / "loose.png", _random_pixels(9, 10, 10))
    assert load_dataset(_folder_cfg(folder)).num_classes == 0
    with pytest.raises(DistillKacError, match="from class sub-folders .*loose.png is not in a class"):
        load_dataset(_folder_cfg(folder, labels="folders"))


def test_train_test_subfolders_pick_the_split_and_share_class_names(tmp_path):
    for name, seed in {"train/a/0.png": 0, "train/b/0.png": 1, "train/b/1.png": 2, "test/b/0.png": 3}.items():
        _write_image(tmp_path / name, _random_pixels(seed, 8, 8))
    train = load_dataset(_folder_cfg(tmp_path))
    test = load_dataset(_folder_cfg(tmp_path), "test")
    assert train.class_names == test.class_names == ("a", "b")
    assert train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [1]
    assert torch.equal(test.data[0], torch.from_numpy(_random_pixels(3, 8, 8)).permute(2, 0, 1))
    assert test.describe()["split"] == "test"


def test_centre_crop_then_resize(tmp_path):
    colour = (200, 50, 10)
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = (0, 255, 0), colour, (0, 0, 255)
    _write_image(tmp_path / "wide.png", wide)
    _write_image(tmp_path / "tall.png", np.ascontiguousarray(wide.transpose(1, 0, 2)))
    rgb = load_dataset(_folder_cfg(tmp_path, resolution=5))
    assert rgb.data.shape == (2, 3, 5, 5)
    # LANCZOS of a constant region is that constant up to 8-bit fixed-point rounding.
    assert (rgb.data.int() - torch.tensor(colour).view(1, 3, 1, 1)).abs().max() <= 1
    grey = load_dataset(_folder_cfg(tmp_path, resolution=5, channels=1))
    luma = (200 * 299 + 50 * 587 + 10 * 114) / 1000  # PIL's ITU-R 601-2 "L" conversion
    assert grey.data.shape == (2, 1, 5, 5) and (grey.data.float() - luma).abs().max() <= 1
    exact = load_dataset(_folder_cfg(tmp_path, resolution=10))
    assert torch.equal(exact.data[1], torch.from_numpy(wide[:, 10:20]).permute(2, 0, 1))


# ----------------------------------------------------------------------------------------- cifar10

def test_cifar10_from_python_batches(tmp_path):
    written = _fake_cifar_batches(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train = load_dataset(DataConfig("cifar10", path=str(path)))
        test = load_dataset(DataConfig("cifar10", path=str(path)), "test")
        assert len(train) == 10 and len(test) == 3 and train.data_shape == (3, 32, 32)
        assert train.class_names == CIFAR10_CLASSES and train.describe()["source_format"] == "cifar-batches"
        pixels, labels = written["data_batch_3"]
        assert torch.equal(train.data[4:6], torch.from_numpy(pixels)) and train.labels[4:6].tolist() == labels
        assert torch.equal(test.data, torch.from_numpy(written["test_batch"][0]))


def test_cifar10_batches_refuse_other_pickles_and_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _fake_cifar_batches(folder)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DistillKacError, match="lacks the CIFAR-10 batch file\\(s\\) data_batch_2"):
        load_dataset(DataConfig("cifar10", path=str(folder)))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": print}, protocol=4))
    with pytest.raises(DistillKacError, match="test_batch is not a CIFAR-10 python batch .*refusing to load"):
        load_dataset(DataConfig("cifar10", path=str(folder)), "test")


def test_cifar10_download_goes_through_torchvision_only_when_asked(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, download))
        _fake_cifar_batches(Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    target = tmp_path / "new"
    with pytest.raises(DistillKacError, match="does not exist"):
        load_dataset(DataConfig("cifar10", path=str(target)))
    assert calls == []
    ds = load_dataset(DataConfig("cifar10", path=str(target), download=True), "test")
    assert calls == [(str(target), True)] and len(ds) == 3
    load_dataset(DataConfig("cifar10", path=str(target), download=True), "test")
    images = _cifar_style_folder(tmp_path / "images", classes=("cat", "dog"))
    assert len(load_dataset(DataConfig("cifar10", path=str(images), download=True), "test")) == 2
    assert len(calls) == 1


def test_cifar10_image_folder_uses_the_standard_class_order(tmp_path):
    classes = tuple(reversed(CIFAR10_CLASSES))
    _cifar_style_folder(tmp_path / "c", classes=classes)
    archive = _zip_folder(tmp_path / "c", tmp_path / "c.zip")
    ds = load_dataset(DataConfig("cifar10", path=str(archive)), "test")
    assert ds.class_names == CIFAR10_CLASSES and ds.labels.tolist() == list(range(10))
    expected = _random_pixels(len(classes) + 1 + classes.index("airplane"), 32, 32)
    assert torch.equal(ds.data[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_cifar10_image_folder_with_other_names_sorts_them(tmp_path):
    _cifar_style_folder(tmp_path, classes=("zebra", "ant"), per_class=2)
    ds = load_dataset(DataConfig("cifar10", path=str(tmp_path)))
    assert ds.class_names == ("ant", "zebra") and ds.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="the shared CIFAR-10 zip is not on this machine")
def test_shared_cifar10_zip():
    with data._open_image_source(CIFAR_ZIP) as source:
        index = data._index_images(source, "train", "cifar10", require_split=True, labels="folders")
    assert index.class_names == CIFAR10_CLASSES
    assert torch.bincount(torch.tensor(index.labels)).tolist() == [5000] * 10
    test = load_dataset(DataConfig("cifar10", path=str(CIFAR_ZIP)), "test")
    assert len(test) == 10000 and test.data_shape == (3, 32, 32) and test.skipped == ()
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    x, _ = test.get_batch(torch.arange(0, 10000, 997))
    assert x.min() >= -1 and x.max() <= 1


# ------------------------------------------------------------------------------------ error cases

def test_unknown_name_split_and_choices():
    with pytest.raises(DistillKacError, match="data.name: unknown value 'mnist'; choose one of digits, "
                                              "cifar10, folder, toy2d"):
        load_dataset(DataConfig("mnist"))
    with pytest.raises(DistillKacError, match="split: unknown split 'val'; choose one of train, test"):
        load_dataset(DataConfig("digits"), "val")
    with pytest.raises(DistillKacError, match="data.bad_files: unknown value 'ignore'; choose one of skip, "
                                              "error"):
        load_dataset(DataConfig("digits", bad_files="ignore"))
    with pytest.raises(DistillKacError, match="data.toy: unknown value 'moons'"):
        load_dataset(DataConfig("toy2d", toy="moons"))
    with pytest.raises(DistillKacError, match="data.channels: must be 1 or 3, got 2"):
        load_dataset(DataConfig("digits", channels=2))
    with pytest.raises(DistillKacError, match="data.download: only the cifar10 dataset can be downloaded"):
        load_dataset(DataConfig("digits", download=True))


def test_shape_mismatch_names_both_values():
    with pytest.raises(DistillKacError, match="data.resolution: digits images are 8x8, got resolution 64"):
        load_dataset(DataConfig("digits", resolution=64))
    with pytest.raises(DistillKacError, match="data.resolution: cifar10 images are 32x32, got resolution 64"):
        load_dataset(DataConfig("cifar10", path="/nowhere", resolution=64))
    with pytest.raises(DistillKacError, match=r"cifar10 images have 3 channel\(s\), got channels 1"):
        load_dataset(DataConfig("cifar10", path="/nowhere", channels=1))
    with pytest.raises(DistillKacError, match="data.resolution: the folder dataset needs a resolution"):
        load_dataset(DataConfig("folder", path="/nowhere"))


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(DistillKacError, match="data.path: the cifar10 dataset needs a path .*batches-py"):
        load_dataset(DataConfig("cifar10"))
    with pytest.raises(DistillKacError, match="data.path: the folder dataset needs a path"):
        load_dataset(DataConfig("folder", resolution=8))
    with pytest.raises(DistillKacError, match="data.path: .*missing does not exist"):
        load_dataset(_folder_cfg(tmp_path / "missing"))
    text = tmp_path / "list.txt"
    text.write_text("hello")
    with pytest.raises(DistillKacError, match="is neither a folder, a .zip archive, nor a cifar-10-batches"):
        load_dataset(DataConfig("cifar10", path=str(text)))


def test_empty_folder_and_zip(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillKacError, match="data.path: no images .*found in .*empty"):
        load_dataset(_folder_cfg(tmp_path / "empty"))
    with zipfile.ZipFile(tmp_path / "readme.zip", "w") as archive:
        archive.writestr("README.txt", "no images here")
        archive.writestr(".hidden.png", b"\x89PNG")
    with pytest.raises(DistillKacError, match="data.path: no images .*found in .*readme.zip"):
        load_dataset(_folder_cfg(tmp_path / "readme.zip"))


def _folder_with_bad_files(root: Path) -> Path:
    _class_folder(root)
    (root / "cat" / "broken.png").write_bytes(b"this is text, not a PNG")
    jpeg = root / "dog" / "cut.jpg"
    _write_image(jpeg, _random_pixels(7, 16, 16), "JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    return root


def test_bad_files_are_skipped_with_a_count(tmp_path):
    root = _folder_with_bad_files(tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file\\(s\\) .*first: cat/broken.png"):
        ds = load_dataset(_folder_cfg(root))
    assert len(ds) == 5 and ds.skipped == ("cat/broken.png", "dog/cut.jpg")
    assert ds.describe()["skipped_files"] == 2 and ds.labels.tolist() == [0, 0, 0, 1, 1]


def test_bad_files_refused_when_asked(tmp_path):
    root = _folder_with_bad_files(tmp_path)
    with pytest.raises(DistillKacError, match="data.path: cannot read cat/broken.png in .* as an image"):
        load_dataset(_folder_cfg(root, bad_files="error"))


def test_all_files_unreadable(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(DistillKacError, match=r"none of the 2 image files in .* could be read \(first: a"):
        load_dataset(_folder_cfg(tmp_path))


def test_cifar10_images_must_be_32x32(tmp_path):
    _cifar_style_folder(tmp_path, classes=("cat", "dog"))
    _write_image(tmp_path / "train" / "dog" / "big.png", _random_pixels(0, 32, 40))
    with pytest.raises(DistillKacError, match="cifar10 images must all be 32x32; train/dog/big.png is 40x32"):
        load_dataset(DataConfig("cifar10", path=str(tmp_path)))


def test_cifar10_image_folder_layout_errors(tmp_path):
    _class_folder(tmp_path / "flat")
    with pytest.raises(DistillKacError, match="needs train/<class>/ and test/<class>/ sub-folders"):
        load_dataset(DataConfig("cifar10", path=str(tmp_path / "flat")))
    _write_image(tmp_path / "loose" / "train" / "x.png", _random_pixels(0, 32, 32))
    _write_image(tmp_path / "loose" / "train" / "cat" / "y.png", _random_pixels(1, 32, 32))
    with pytest.raises(DistillKacError, match="train/x.png is not in a class sub-folder"):
        load_dataset(DataConfig("cifar10", path=str(tmp_path / "loose")))
    with pytest.raises(DistillKacError, match="no images in the test/ sub-folder"):
        load_dataset(_folder_cfg(tmp_path / "loose"), "test")


# ------------------------------------------------------------------------------------------- toy2d

def test_toy_grid_mixture_parameters():
    means, std, weights = toy_mixture(DataConfig("toy2d"))
    coords = torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64)
    assert means.shape == (16, 2) and std == 0.05
    assert torch.equal(means[:, 0], coords.repeat(4))
    assert torch.equal(means[:, 1], coords.repeat_interleave(4))
    torch.testing.assert_close(weights, torch.full((16,), 1 / 16, dtype=torch.float64))
    with pytest.raises(DistillKacError, match="data.toy: only the grid toy is a Gaussian mixture"):
        toy_mixture(DataConfig("toy2d", toy="checkerboard"))


def test_toy_grid_samples_match_their_modes():
    ds = load_dataset(DataConfig("toy2d", seed=0))
    means, std, _ = toy_mixture(DataConfig("toy2d"))
    assert len(ds) == 20000 and ds.data_shape == (2,) and ds.num_classes == 16
    assert ds.data.dtype == torch.float32
    nearest = torch.cdist(ds.data.double(), means).argmin(1)
    # Modes are 0.5 = 10 std apart: a point crosses a midline with probability < 4 * P(Z > 5) ~ 1.2e-6,
    # so the expected number of mismatches among 20000 points is below 0.03; we allow none.
    assert torch.equal(nearest, ds.labels)
    residual = ds.data.double() - means[ds.labels]
    assert abs(residual.std().item() / std - 1) < 0.02  # relative sd of the estimate ~ 0.4%
    frequencies = torch.bincount(ds.labels, minlength=16).double() / len(ds)
    assert (frequencies - 1 / 16).abs().max() < 0.0086  # 5 binomial sd
    x, y = ds.get_batch(torch.tensor([5, 0]))
    assert torch.equal(x, ds.data[[5, 0]]) and torch.equal(y, ds.labels[[5, 0]])


def test_toy_is_deterministic_per_seed_and_split():
    cfg = DataConfig("toy2d", toy_size=500, seed=4)
    first, again = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(first.data, again.data) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.data, load_dataset(cfg, "test").data)
    assert not torch.equal(first.data, load_dataset(DataConfig("toy2d", toy_size=500, seed=5)).data)


def test_toy_checkerboard_points_lie_in_their_squares():
    corners, side = checkerboard_squares()
    assert corners.shape == (8, 2) and side == 0.5
    cells = torch.round((corners + 1) / side).long()
    assert torch.all(cells.sum(1) % 2 == 0)
    ds = load_dataset(DataConfig("toy2d", toy="checkerboard", toy_size=4000))
    offset = ds.data.double() - corners[ds.labels]
    assert ds.num_classes == 8 and torch.all((offset >= 0) & (offset <= side))
    assert ds.data.abs().max() <= 1


def test_toy_option_errors():
    with pytest.raises(DistillKacError, match="data.hflip: flips are for images"):
        load_dataset(DataConfig("toy2d", hflip=True))
    with pytest.raises(DistillKacError, match="toy2d is 2-D points; leave resolution and channels unset"):
        load_dataset(DataConfig("toy2d", resolution=8))
    with pytest.raises(DistillKacError, match="data.toy_size: must be a positive integer, got 0"):
        load_dataset(DataConfig("toy2d", toy_size=0))


@pytest.mark.parametrize("progress", [True, False])
def test_decoding_bar_follows_progress(tmp_path, monkeypatch, progress):
    """``--no-progress`` reaches the decoding bar of large image sets (shown from 5,000 images)."""
    shown = []

    class RecordingBar:
        def __init__(self, *, total, disable, **kwargs):
            shown.append(not disable)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, count):
            pass

    monkeypatch.setattr(data, "tqdm", RecordingBar)
    folder = _class_folder(tmp_path / "set")
    names = [f"{cls}/{k:05d}.png" for cls in ("cat", "dog") for k in range(2500)]
    monkeypatch.setattr(data, "_index_images", lambda *args, **kwargs: data._ImageIndex(
        names, [0] * 2500 + [1] * 2500, ("cat", "dog"), "all"))
    monkeypatch.setattr(data, "_decode_one", lambda name, blob, convert: np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(data._ImageSource, "read", lambda self, name: b"")
    load_dataset(_folder_cfg(folder), "train", progress=progress)
    assert shown == [progress]
