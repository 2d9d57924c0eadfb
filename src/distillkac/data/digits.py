"""The bundled 8x8 digits of scikit-learn with a fixed stratified train/test split."""

from __future__ import annotations

import torch

from distillkac.data.dataset import DataConfig, InMemoryDataset, check_native_shape, scale_info

#: The fixed digits split: 297 of the 1797 images are held out, stratified by class, chosen with a
#: torch.Generator seeded with DIGITS_SPLIT_SEED (independent of DataConfig.seed).
DIGITS_TEST_SIZE = 297
DIGITS_SPLIT_SEED = 2509


def digits_split_indices(split: str) -> torch.Tensor:
    """Sorted indices into ``sklearn.datasets.load_digits()`` of the fixed train (1500) / test (297) split.

    Per class, a test share proportional to the class size (largest remainders to reach 297 in all)
    is drawn by a permutation from ``torch.Generator().manual_seed(DIGITS_SPLIT_SEED)``.
    """
    targets = torch.as_tensor(_sklearn_digits().target, dtype=torch.long)
    classes, counts = torch.unique(targets, return_counts=True)
    exact = counts.double() * DIGITS_TEST_SIZE / targets.numel()
    quota = exact.floor().long()
    shortfall = DIGITS_TEST_SIZE - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:shortfall]] += 1
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(targets == cls).flatten()
        test.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    is_test = torch.zeros(targets.numel(), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return torch.nonzero(is_test if split == "test" else ~is_test).flatten()


def load(cfg: DataConfig, split: str) -> InMemoryDataset:
    check_native_shape(cfg, 8, 1)
    bunch = _sklearn_digits()
    indices = digits_split_indices(split)
    values = torch.as_tensor(bunch.images, dtype=torch.float64)[indices]
    images = torch.round(values * (255.0 / 16.0)).to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)[indices]
    info = {"name": "digits", "split": split, "source": "sklearn.datasets.load_digits (bundled 8x8 digits)",
            "source_format": "sklearn",
            "preprocessing": f"values 0..16 -> round(v * 255 / 16) uint8; {scale_info(cfg.hflip)}; fixed "
                             f"stratified split: {DIGITS_TEST_SIZE} test images, seed {DIGITS_SPLIT_SEED}"}
    dataset = InMemoryDataset(images, labels, num_classes=10, class_names=[str(d) for d in range(10)],
                              hflip=cfg.hflip, info=info)
    dataset.source_indices = indices
    return dataset


def _sklearn_digits():
    from sklearn.datasets import load_digits  # scikit-learn (with scipy) takes a second to import: only here

    return load_digits()
