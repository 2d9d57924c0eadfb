"""A metric over generated samples made in parts: batch by batch, split between processes, resumable.

Each process folds its images into a part of the row: the FID feature moments of its images (the
images themselves are dropped batch by batch), or, for the small-data metrics, its samples and labels.
A part saves to and restores from a side file (``arrays`` / ``restore``); ``MetricContext.finish``
merges every process's part into the metric's values.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distillkac.data import DataConfig, to_uint8, toy_mixture
from distillkac.errors import DistillKacError
from distillkac.metrics import fid
from distillkac.metrics.digits import DigitsClassifier, digits_metrics, digits_reference_images
from distillkac.metrics.stats import Moments
from distillkac.metrics.toy2d import toy2d_metrics

METRICS = ("fid", "digits", "toy2d")
PRIMARY_VALUE = {"fid": "fid", "digits": "fd_digits", "toy2d": "sliced_wasserstein"}
"""The number each metric is tabulated and plotted by (lower is better for all three)."""
NATIVE_MODELS = {"digits": ("a digits model", [1, 8, 8], 10),
                 "toy2d": ("a model of the 4x4 grid mixture", [2], 16)}
"""metric -> (what it applies to, the data shape, the class count of a conditional model)."""


class MetricContext:
    """What a metric needs besides the samples (reference statistics, Inception network, classifier,
    mixture), checked up front and built on first use."""

    def __init__(self, metric: str, *, ref: str | os.PathLike | None, inception_weights: str | None,
                 batch_size: int, device: torch.device, progress: bool) -> None:
        self.metric = metric
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.reference = None
        if metric == "fid":
            if ref is None:
                raise DistillKacError("--ref: the fid metric needs reference statistics (an .npz from "
                                      "`distillkac ref`)")
            self.reference = fid.load_reference(ref)
            self.weights_path = fid.resolve_inception_weights(inception_weights)
            self.weights_id = fid.inception_weights_id(self.weights_path)
            fid.check_reference_compatible(self.reference, self.weights_id)

    def check_model(self, checkpoint: str, meta: dict[str, Any]) -> None:
        """Refuse a model whose data the metric does not apply to (before anything is generated)."""
        shape = [int(s) for s in meta["data_shape"]]
        classes = int(meta["num_classes"])
        if self.metric == "fid":
            if len(shape) != 3 or shape[0] not in (1, 3):
                raise DistillKacError(f"--metric fid: {checkpoint} makes data of shape {shape}, not images "
                                      f"[1 or 3, H, W]")
            fid.check_reference_compatible(self.reference, self.weights_id, tuple(shape))
            return
        what, need_shape, need_classes = NATIVE_MODELS[self.metric]
        if shape != need_shape or classes not in (0, need_classes):
            raise DistillKacError(f"--metric {self.metric}: {checkpoint} is not {what} (data {shape}, {classes} "
                                  f"classes; need {need_shape} and {need_classes} or 0 classes)")

    @property
    def reference_record(self) -> dict[str, Any] | None:
        if self.reference is None:
            return None
        meta = self.reference.meta
        dataset = meta.get("dataset", {})
        return {"path": self.reference.path, "stats_sha256": meta.get("stats_sha256"),
                "count": int(self.reference.stats.count), "split": meta.get("split"),
                "dataset": dataset.get("name") if isinstance(dataset, dict) else None}

    @functools.cached_property
    def extractor(self) -> fid.InceptionFeatures:
        return fid.InceptionFeatures(self.weights_path, self.device, self.batch_size)

    def new_part(self) -> MomentsPart | SamplesPart:
        """An empty part of a row for this process (what ``finish`` merges)."""
        return MomentsPart(self) if self.metric == "fid" else SamplesPart()

    def finish(self, parts: Sequence[dict[str, Any]], shards: Sequence[range], num_classes: int
               ) -> dict[str, Any]:
        """The metric's values from every process's part (``shards[r]``: the indices rank r made)."""
        if self.metric == "fid":
            moments = Moments.merge([p["moments"] for p in parts if p["moments"] is not None])
            return fid.fid_record(moments.stats(), self.reference, self.weights_id)
        samples, labels = assemble_in_seed_order(parts, shards)
        if self.metric == "digits":
            classifier, reference = self._digits_tools
            values = digits_metrics(samples, labels, classifier, reference)
            values["classifier_test_accuracy"] = float(classifier.test_accuracy)
        else:
            mixture = toy_mixture(DataConfig(name="toy2d", toy="grid"))
            values = toy2d_metrics(samples, labels if num_classes else None, mixture)
        return {**values, "label": PRIMARY_VALUE[self.metric]}

    @functools.cached_property
    def _digits_tools(self) -> tuple[DigitsClassifier, torch.Tensor]:
        return DigitsClassifier.load_or_train(), digits_reference_images()


def assemble_in_seed_order(parts: Sequence[dict[str, Any]], shards: Sequence[range]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples and labels of all processes, put back at their image indices (seed order)."""
    pairs = [(shard, part) for shard, part in zip(shards, parts) if part["samples"] is not None]
    num = sum(len(shard) for shard, _ in pairs)
    first = pairs[0][1]
    samples = first["samples"].new_empty((num, *first["samples"].shape[1:]))
    labels = first["labels"].new_empty(num)
    for shard, part in pairs:
        index = torch.as_tensor(list(shard), dtype=torch.long)
        samples[index] = part["samples"]
        labels[index] = part["labels"]
    return samples, labels


class MomentsPart:
    """FID: the feature moments of this process's images so far, folded in batch by batch on the
    metric's device (so a resumed row goes through the same float64 operations as an uninterrupted one)."""

    keys = ("count", "mean", "scatter")

    def __init__(self, context: MetricContext) -> None:
        self.context = context
        self.moments = Moments.empty()

    def add(self, samples: torch.Tensor, labels: torch.Tensor) -> None:
        self.moments = self.moments.add(self.context.extractor(to_uint8(samples)))

    def arrays(self) -> dict[str, np.ndarray]:
        return self.moments.arrays()

    def restore(self, arrays: dict[str, np.ndarray], done: int) -> bool:
        """Take the moments of ``done`` images from a side file; False (nothing taken) if they do not fit."""
        moments = Moments.from_arrays(arrays)
        if moments is None or moments.count != done:
            return False
        self.moments = moments.to(self.context.device)
        return True

    def result(self) -> dict[str, Any]:
        return {"moments": self.moments.to("cpu") if self.moments.count else None}


class SamplesPart:
    """digits / toy2d: this process's samples and labels so far (on the CPU, in shard order)."""

    keys = ("samples", "labels")

    def __init__(self) -> None:
        self.samples: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, samples: torch.Tensor, labels: torch.Tensor) -> None:
        self.samples.append(samples.cpu())
        self.labels.append(labels.cpu())

    def arrays(self) -> dict[str, np.ndarray]:
        self.samples, self.labels = [torch.cat(self.samples)], [torch.cat(self.labels)]
        return {"samples": self.samples[0].numpy(), "labels": self.labels[0].numpy()}

    def restore(self, arrays: dict[str, np.ndarray], done: int) -> bool:
        """Take ``done`` samples and labels from a side file; False (nothing taken) if they do not fit."""
        samples, labels = arrays["samples"], arrays["labels"]
        if (samples.ndim < 2 or samples.shape[0] != done or samples.dtype.kind != "f" or labels.shape != (done,)
                or labels.dtype != np.int64):
            return False
        self.samples, self.labels = [torch.from_numpy(samples)], [torch.from_numpy(labels)]
        return True

    def result(self) -> dict[str, Any]:
        if not self.samples:
            return {"samples": None, "labels": None}
        return {"samples": torch.cat(self.samples), "labels": torch.cat(self.labels)}
