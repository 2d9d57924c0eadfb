"""DistillKac: few-step image generation with Kac (telegrapher) flows and endpoint distillation.

A trained model from Python::

    import distillkac
    model = distillkac.load("RUN2/stage-1step")         # a run, stage or artefact directory
    images = model.sample(labels=[3, 3, 7], seed=0)     # uint8 tensor [3, C, H, W]
"""

__version__ = "0.1.0"


def load(path, device="auto"):
    """The model artefact at ``path`` (an artefact directory, or a run or stage directory holding
    ``artifact/``) on ``device`` (auto: CUDA if available), as a :class:`distillkac.model.Model`."""
    # Imported on use: the model needs the whole library (torch and all), which in turn imports
    # __version__ from this package, so a top-level import here would be circular.
    from distillkac.model import Model

    return Model.load(path, device)
