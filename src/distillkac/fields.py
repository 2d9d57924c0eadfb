"""Config dataclasses from their JSON dicts (the inverse of ``dataclasses.asdict``), and the checks their
``validate`` methods share."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from distillkac.errors import DistillKacError


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, name: str, rule: str, value: Any) -> None:
    """Unless ``ok``, raise the one-line DistillKacError ``"{name}: {rule}, got {value!r}"``."""
    if not ok:
        raise DistillKacError(f"{name}: {rule}, got {value!r}")


def dataclass_from_dict(cls: type, values: Any, name: str) -> Any:
    """Build dataclass ``cls`` from a JSON-style dict: lists become tuples, unknown keys are refused
    (one line starting with ``name``). Field values are not validated here."""
    if not isinstance(values, dict):
        raise DistillKacError(f"{name}: expected a dict of fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DistillKacError(f"{name}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})
