"""Stage records as plain JSON: what every stage writes (evaluation.json, summary.json, CSV
rows, Prefect artifacts) goes through one conversion, so a numpy scalar or a NaN never reaches
a file as something ``json`` rejects or writes as an invalid token."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["JsonRecord", "jsonable"]

T = TypeVar("T", bound="JsonRecord")


def jsonable(obj: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays to Python, NaN and infinities to None (JSON
    has no NaN; Python's json would write an invalid token), tuples and sets to lists."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


class JsonRecord:
    """A dataclass that goes to and from a JSON dict, fields matched by name: a record written
    before a field was added still loads (the field takes its default), and keys it does not
    know are ignored. A subclass with nested records rebuilds them in its own ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def known_fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return {k: v for k, v in data.items() if k in names}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        return cls(**cls.known_fields(data))
