"""Run-log values as standard JSON (RFC 8259), and back.

:func:`encode_value` turns a record's payload into plain JSON-ready data (numpy / torch scalars and
arrays, tuples, paths, devices and dtypes included); non-finite floats become the strings ``"nan"``,
``"inf"`` and ``"-inf"``, which :func:`decode_value` turns back into floats. For that to be lossless,
those three exact strings are refused as payload values. :func:`dumps` writes the encoded data (one
compact line for a record, indented for a document) and refuses anything non-standard;
:func:`values_equal` compares decoded values as record lookups must (NaN equals NaN).

Used by :mod:`common.run.logs`, the only implementation of the run-log format, and by
:mod:`common.run.documents`. Never imports torch or numpy: readers of logs and documents must not need them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["decode_value", "dumps", "encode_value", "values_equal"]

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _float_token(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def encode_value(value: Any, where: str = "payload") -> Any:
    """Convert a payload value into plain, standard-JSON-ready Python data.

    numpy / torch scalars become Python scalars, numpy arrays and torch tensors nested lists,
    tuples lists, ``os.PathLike`` and ``torch.device`` / ``torch.dtype`` strings, and non-finite
    floats the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Args:
        value: the value to convert.
        where: the value's location, used in error messages (e.g. ``"candidate.plan"``).

    Returns:
        A structure of dict (str keys) / list / str / int / float / bool / None.

    Raises:
        TypeError: a dict key that is not a string, or a value of an unsupported type.
        ValueError: a string equal to ``"nan"``, ``"inf"`` or ``"-inf"`` (reserved, see module doc).
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # int subclasses (IntEnum, ...) become plain ints
    if isinstance(value, float):
        return _float_token(float(value))
    if isinstance(value, str):
        if value in _NONFINITE:
            raise ValueError(
                f"{where}: the string {value!r} is reserved for non-finite floats in run logs; "
                "pass a float instead or use another spelling"
            )
        return str(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where}: dict key {key!r} is a {type(key).__name__}; run-log keys must be "
                    "str (JSON would silently turn it into a string)"
                )
            out[key] = encode_value(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [encode_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return encode_value(value.tolist(), where)
        if isinstance(value, numpy.generic):
            return encode_value(value.item(), where)
    torch = sys.modules.get("torch")  # never import torch here: readers must not need it
    if torch is not None:
        if isinstance(value, torch.Tensor):
            return encode_value(value.detach().cpu().tolist(), where)
        if isinstance(value, (torch.device, torch.dtype)):
            return str(value)
    raise TypeError(f"{where}: cannot log a value of type {type(value).__name__}: {value!r:.80}")


def decode_value(value: Any) -> Any:
    """Inverse of the non-finite encoding: turn ``"nan"``/``"inf"``/``"-inf"`` back into floats.

    Args:
        value: data as loaded by :func:`json.loads`.

    Returns:
        The same structure (new containers) with those strings replaced; dict keys untouched.
    """
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def dumps(data: Any, *, indent: int | None = None) -> str:
    # allow_nan=False guards the standard-JSON promise even if encoding was bypassed.
    if indent is None:
        return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return json.dumps(data, ensure_ascii=True, allow_nan=False, indent=indent)


def values_equal(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (record matching must find NaN-valued keys)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)
