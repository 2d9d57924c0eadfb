"""Evaluation metrics.

- ``fid``: FID on torch-fidelity's Inception features (the standard protocol), reference statistics;
- ``stats``: streaming, mergeable feature moments (``Moments``), Gaussian statistics, Fréchet distance;
- ``digits`` / ``toy2d``: the CPU-sized datasets' own metrics, never called FID (a Fréchet distance in the
  features of a small classifier trained here; the exact mixture likelihood, sliced Wasserstein, modes);
- ``context``: a metric over samples generated in parts (batches, processes), as ``eval`` runs it.
"""
