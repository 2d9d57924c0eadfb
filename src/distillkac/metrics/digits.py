"""Metrics for the 8x8 digits (never called FID): a Fréchet distance in the features of a small CNN
classifier trained here ("fd_digits") and in pixel space ("fd_pixels"), and the classifier's agreement
with the requested labels."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from distillkac.data import DataConfig, InMemoryDataset, load_dataset
from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_bytes, sha256_bytes, sha256_file
from distillkac.metrics.stats import GaussianStats, frechet_distance, labelled_accuracy
from distillkac.runtime import torch_threads

CACHE_ENV = "DISTILLKAC_CACHE"
DIGITS_FEATURE_DIM = 64
_DIGITS_FORMAT = "distillkac-digits-classifier"
_DIGITS_VERSION = 1
_DIGITS_TRAINING = {"epochs": 15, "batch_size": 64, "lr": 2e-3}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distillkac").expanduser()


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits: 3x3 convolutions (16, 32 channels), 2x2 max-pool, 64-d hidden, 10 logits.

    Inputs are float images in [-1, 1], ``[N, 1, 8, 8]``. ``features`` is the 64-d penultimate layer
    (after its ReLU) used for the "fd_digits" Fréchet distance. ``test_accuracy`` is the accuracy on
    the held-out digits split measured when it was trained.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, DIGITS_FEATURE_DIM)
        self.out = nn.Linear(DIGITS_FEATURE_DIM, 10)
        self.test_accuracy = float("nan")
        self.from_cache = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(dim=1)

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> DigitsClassifier:
        """The classifier cached under ``cache_dir`` (default ``$DISTILLKAC_CACHE`` or ~/.cache/distillkac),
        trained on the digits train split (deterministic given ``seed``) when no valid cached copy exists.

        The cache is keyed by the seed, the training settings and the sha256 of the training images;
        the JSON sidecar records the held-out accuracy and the weights' sha256 (checked on load).
        """
        train, test = _digits_split("train"), _digits_split("test")
        train_bytes = train.data.numpy().tobytes() + train.labels.numpy().tobytes()
        settings = {"format": _DIGITS_FORMAT, "version": _DIGITS_VERSION, "seed": int(seed),
                    **_DIGITS_TRAINING, "train_sha256": sha256_bytes(train_bytes)}
        key = sha256_bytes(json.dumps(settings, sort_keys=True).encode())[:16]
        folder = Path(cache_dir or default_cache_dir()).expanduser()
        weights_file = folder / f"digits-classifier-{key}.safetensors"
        sidecar_file = weights_file.with_suffix(".json")
        cached = _load_cached_classifier(weights_file, sidecar_file, settings)
        if cached is not None:
            return cached
        with torch_threads(1):  # a tiny model: extra threads would only spin on a shared machine
            model = _train_digits_classifier(train, seed)
        images, labels = test.get_batch(torch.arange(len(test)))
        model.test_accuracy = labelled_accuracy(model.predict(images), labels, 10)
        weights = save_safetensors(model.state_dict())
        atomic_write_bytes(weights_file, weights)
        sidecar = {**settings, "test_accuracy": model.test_accuracy, "test_count": len(test),
                   "weights_sha256": sha256_bytes(weights)}
        atomic_write_bytes(sidecar_file, json.dumps(sidecar, indent=2, sort_keys=True).encode())
        return model


def digits_reference_images() -> torch.Tensor:
    """The held-out digits (the fixed test split of distillkac.data), float [-1, 1] ``[297, 1, 8, 8]``."""
    test = _digits_split("test")
    return test.get_batch(torch.arange(len(test)))[0]


def _digits_split(split: str) -> InMemoryDataset:
    return load_dataset(DataConfig(name="digits"), split)


def _load_cached_classifier(weights_file: Path, sidecar_file: Path, settings: dict[str, Any]
                            ) -> DigitsClassifier | None:
    """The cached classifier when the sidecar matches ``settings`` and the weights hash; else None."""
    if not (weights_file.is_file() and sidecar_file.is_file()):
        return None
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except (OSError, ValueError):
        return None
    if any(sidecar.get(k) != v for k, v in settings.items()) or sidecar.get("weights_sha256") != sha256_file(
            weights_file):
        return None
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(weights_file)))
    model.eval()
    model.test_accuracy = float(sidecar["test_accuracy"])
    model.from_cache = True
    return model


def _init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """He-uniform weights (bound sqrt(6 / fan_in)) and zero biases, drawn from ``generator``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                bound = (6.0 / fan_in) ** 0.5
                module.weight.copy_((torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound)
                module.bias.zero_()


def _train_digits_classifier(train, seed: int) -> DigitsClassifier:
    """Adam on cross-entropy over the train split, shuffled and initialised from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    _init_parameters(model, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=_DIGITS_TRAINING["lr"])
    images, labels = train.get_batch(torch.arange(len(train)))
    batch = _DIGITS_TRAINING["batch_size"]
    model.train()
    for _ in range(_DIGITS_TRAINING["epochs"]):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            loss = F.cross_entropy(model(images[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def digits_metrics(samples: torch.Tensor, requested_labels: torch.Tensor, classifier: DigitsClassifier,
                   reference: torch.Tensor) -> dict[str, Any]:
    """Metrics for 8x8 digit samples (float [-1, 1], ``[N, 1, 8, 8]``) against held-out real digits.

    "class_accuracy": fraction of labelled samples the classifier assigns to the requested label (null
    labels left out; None if none); "fd_digits": Fréchet distance between Gaussian fits of the
    classifier's 64-d penultimate features of the samples and of ``reference``; "fd_pixels": the same
    in pixel space (64-d, pixel values in [-1, 1]). These are not FIDs (no Inception network).
    """
    for name, images in (("samples", samples), ("reference", reference)):
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8) or images.shape[0] < 2:
            raise DistillKacError(f"{name}: digits metrics need at least 2 images [N, 1, 8, 8], got "
                                  f"{list(images.shape)}")
    requested = torch.as_tensor(requested_labels, dtype=torch.long).reshape(-1).cpu()
    if requested.shape[0] != samples.shape[0]:
        raise DistillKacError(f"requested_labels: got {requested.shape[0]} labels for {samples.shape[0]} "
                              f"samples")
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    samples, reference = samples.float().to(device), reference.float().to(device)
    return {
        "class_accuracy": labelled_accuracy(classifier.predict(samples).cpu(), requested, 10),
        "fd_digits": _fitted_distance(classifier.features(samples), classifier.features(reference)),
        "fd_pixels": _fitted_distance(samples.flatten(1), reference.flatten(1)),
        "num_samples": int(samples.shape[0]),
        "num_reference": int(reference.shape[0]),
    }


def _fitted_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussian fits of two feature sets ``[N, D]``."""
    fit_a, fit_b = GaussianStats.from_features(a), GaussianStats.from_features(b)
    return frechet_distance(fit_a.mu, fit_a.sigma, fit_b.mu, fit_b.sigma)
