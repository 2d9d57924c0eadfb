"""Matplotlib without a display: the Agg pyplot and atomic PNG writes of finished figures."""

from __future__ import annotations

import io
import os
from typing import Any

from distillkac.files import atomic_write_bytes


def agg_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (renders to files; needs no display)."""
    import matplotlib  # imported on first use: slow to import, and the backend must be set before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure_png(figure: Any, path: str | os.PathLike, *, tight: bool = False) -> None:
    """Render ``figure`` as PNG (cropped to its drawn content with ``tight``), close it, and write the
    bytes to ``path`` atomically."""
    plt = agg_pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **({"bbox_inches": "tight"} if tight else {}))
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
