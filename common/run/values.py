"""Values as notebooks, YAML and the command line give them, converted to a config field's type
(:func:`convert_value`; :func:`common.run.config.field_value` applies it to a field by name)."""

from __future__ import annotations

import os
from numbers import Integral, Real
from typing import Any

__all__ = ["convert_value"]

_WORDS = {float: "number", int: "whole number", str: "string", bool: "True or False"}


def _list_items(text: str) -> list[str]:
    """The items of ``"a,b"``, ``"[a, b]"`` or ``"(a, b)"`` (quotes around an item are dropped)."""
    s = text.strip()
    if len(s) >= 2 and (s[0], s[-1]) in (("[", "]"), ("(", ")")):
        s = s[1:-1]
    items = [x.strip() for x in s.split(",")]
    return [x[1:-1] if len(x) >= 2 and x[0] == x[-1] and x[0] in "'\"" else x for x in items if x]


def _one(kind: type, value: Any) -> Any:
    """``value`` as one ``kind``; ``None`` when it is not one (a bool is no number)."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        if isinstance(value, Integral):
            return int(value)
        return int(value) if isinstance(value, float) and value.is_integer() else None
    if kind is float:
        return float(value) if isinstance(value, Real) else None
    if kind is str:
        return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    return value


def convert_value(value: Any, kind: type, many: bool, optional: bool, label: str, hint: str | None = None) -> Any:
    """``value`` as one ``kind`` (``many``: a tuple of them; ``optional``: or None), the way
    :func:`common.run.config.field_value` documents it.

    Raises:
        ValueError: a value or item of the wrong type, naming ``label`` and the offending value.
    """
    word = _WORDS.get(kind, kind.__name__)
    if many:  # one number stands for a list of one
        want = f"a {word} or a list of {word}s" if kind in (int, float) else f"a list of {word}s"
    else:
        want = word if kind is bool else f"a {word}"
    if optional:
        want += " or None"

    def fail(detail: str = "") -> ValueError:
        return ValueError(f"{label} must be {want}, got {value!r}{detail}" + (f"; {hint}" if hint else ""))

    if value is None:
        if optional:
            return None
        raise fail()
    if not many:
        out = _one(kind, value)
        if out is None:
            raise fail()
        return out
    if isinstance(value, str) and kind is not bool:
        items = []
        for text in _list_items(value):
            try:
                items.append(kind(text))
            except ValueError as e:
                raise fail(f" ({text!r} is not a {word}: {e})") from None
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            one = _one(kind, item)
            if one is None:
                raise fail(f" ({item!r} is not a {word})")
            items.append(one)
    elif kind is not str and _one(kind, value) is not None:
        items = [_one(kind, value)]  # one number for a list of numbers
    else:
        raise fail()
    return None if optional and not items else tuple(items)
