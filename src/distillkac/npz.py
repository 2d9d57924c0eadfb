"""``.npz`` archives: reading them without pickles, and resumable side files of unfinished computations.

A side file holds the progress of a long computation (``ref``'s moment sums, a row of ``eval``) with the
identity of the job it belongs to; a rerun of the same job continues from it, any other job starts over.
"""

from __future__ import annotations

import io
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_bytes

T = TypeVar("T")


#: What a file that is not an .npz (a zip archive) starts with, for the error message.
_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
               b"\x93NUMPY": "a single .npy array", b"\x80": "a Python pickle"}


def read_npz(file: Path, keys: Sequence[str], problem: str, optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (and those of ``optional`` the archive has) of an .npz archive, loaded without
    pickles; ``problem`` starts any error, which says what the file is when it is not an .npz."""
    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
    except OSError as err:
        raise DistillKacError(f"{problem} ({_reason(err)})") from err
    if not head.startswith(b"PK"):
        kind = next((name for start, name in _SIGNATURES.items() if head.startswith(start)), "not a zip archive")
        raise DistillKacError(f"{problem} (it is {kind}, not an .npz archive)")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DistillKacError(f"{problem} ({_reason(err)})") from err
    with loaded:
        missing = [key for key in keys if key not in loaded.files]
        if missing:
            raise DistillKacError(f"{problem} (no array {', '.join(missing)}; it has "
                                  f"{', '.join(loaded.files) or 'none'})")
        try:
            return {key: loaded[key] for key in (*keys, *optional) if key in loaded.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DistillKacError(f"{problem} ({_reason(err)})") from err


def _reason(err: Exception) -> str:
    """Why numpy could not read an archive, in one line (never numpy's advice to load pickles)."""
    if "pickle" in str(err):
        return "it holds Python objects, which are never loaded"
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def note(message: str) -> None:
    """One line on stderr that does not break a progress bar."""
    tqdm.write(f"distillkac: {message}", file=sys.stderr)


@dataclass(frozen=True)
class SideFile:
    """The progress of an unfinished job in an .npz: a count ``done_key`` of finished units, the job's arrays,
    and its ``identity`` (names -> str or int, stored as 0-d arrays) that a rerun must match to continue."""

    path: Path
    identity: dict[str, str | int]
    done_key: str = "done"

    def save(self, done: int, arrays: dict[str, np.ndarray]) -> None:
        """Write ``done`` and ``arrays`` with the identity, atomically (a kill leaves the previous save)."""
        identity = {name: np.array(value) if isinstance(value, str) else np.asarray(value, dtype=np.int64)
                    for name, value in self.identity.items()}
        buffer = io.BytesIO()
        np.savez(buffer, **identity, **{self.done_key: np.asarray(done, dtype=np.int64)}, **arrays)
        atomic_write_bytes(self.path, buffer.getvalue())

    def restore(self, keys: Sequence[str], parse: Callable[[dict[str, np.ndarray], int], T],
                optional: Sequence[str] = ()) -> tuple[int, T | None]:
        """(units done, ``parse(arrays, done)``) from the saved arrays ``keys`` (and those of ``optional``
        it has); (0, None) when there is no side file, or (with a note on stderr) when it belongs to
        another job, cannot be read, or ``parse`` refuses it by returning None or False."""
        if not self.path.is_file():
            return 0, None
        try:
            arrays = read_npz(self.path, (*self.identity, self.done_key, *keys), f"side file {self.path}",
                              optional)
            done = int(arrays[self.done_key])
            if all(arrays[name].item() == value for name, value in self.identity.items()):
                restored = parse(arrays, done)
                if restored:
                    return done, restored
        except (DistillKacError, TypeError, ValueError):
            pass
        note(f"{self.path} belongs to other settings or is unreadable; ignoring it and starting over")
        return 0, None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
