"""The experiment's command line, generated from :class:`common.run.config.ExperimentConfig`'s fields.

One option per field, named ``--field-name`` (:func:`add_config_arguments`, :func:`config_parser`), parsed
back into a config by :func:`config_from_args`; :func:`add_config_options` gives a benchmark or study
the options of the fields it shares with the experiment, exactly as ``python -m common.run`` has them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from common.run.config import FIELDS, ExperimentConfig, field_kinds

__all__ = ["add_config_arguments", "add_config_options", "config_from_args", "config_parser"]


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _add_options(
    parser: argparse.ArgumentParser, names: Sequence[str], defaults: Mapping[str, Any], helps: Mapping[str, str]
) -> None:
    """The options of fields ``names`` (:func:`add_config_arguments`); one not given is absent from the namespace."""
    kinds = field_kinds()
    for name in names:
        f = FIELDS[name]
        kind, many, _ = kinds[f.name]
        flag = "--" + f.name.replace("_", "-")
        shown = _show(defaults[f.name]) if f.name in defaults else f.metadata.get("shown", _show(f.default))
        text = helps.get(f.name, f"{f.metadata['help']} (default: {shown})")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            if "off_flag" in f.metadata:
                parser.add_argument(
                    f.metadata["off_flag"],
                    dest=f.name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"same as --no-{flag[2:]}",
                )
        elif many:  # converted by the config (field_value), where a bad element is a usage error that names it
            parser.add_argument(flag, metavar=f"{kind.__name__.upper()},...", **kw)
        elif "choices" in f.metadata:
            parser.add_argument(flag, type=kind, choices=f.metadata["choices"], **kw)
        else:
            parser.add_argument(flag, type=kind, metavar=f.metadata.get("metavar", kind.__name__.upper()), **kw)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    exclude: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """One option per :class:`ExperimentConfig` field but ``exclude``, named ``--field-name``.

    Booleans are ``--name`` / ``--no-name`` switches (plus an ``off_flag`` alias where the field names one,
    e.g. ``--quiet``); tuples are comma-separated lists; other types convert with their own type; the help
    is the field's ``help`` metadata and its default. An option not given is absent from the parsed
    namespace, so the field keeps its default in :func:`config_from_args`; ``defaults`` (typed values)
    replace fields' defaults for this parser, and ``helps`` replaces whole help texts.
    """
    defaults, helps = dict(defaults or {}), dict(helps or {})
    _add_options(parser, [name for name in FIELDS if name not in exclude], defaults, helps)
    parser.set_defaults(**{k: v for k, v in defaults.items() if k not in exclude})


def add_config_options(
    parser: argparse.ArgumentParser, fields: Sequence[str], *, defaults: Mapping[str, Any] | None = None
) -> None:
    """The options of the named fields exactly as ``python -m common.run`` has them (flag, type, choices,
    metavar, help), for a script that shares those settings; each field is in the parsed namespace, at the
    value given, else ``defaults[field]`` (typed: the script's own default, shown in the help), else the
    field's default. A list field holds the text given, as in the experiment CLI (:func:`field_value`
    converts it)."""
    defaults = dict(defaults or {})
    _add_options(parser, fields, defaults, {})
    parser.set_defaults(**{n: defaults.get(n, FIELDS[n].default) for n in fields})


def config_parser(prog: str | None = None, description: str | None = None, **options: Any) -> argparse.ArgumentParser:
    """An argument parser holding :func:`add_config_arguments` (``options``: its keyword arguments)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p, **options)
    return p


def config_from_args(args: argparse.Namespace | Mapping[str, Any], **fixed: Any) -> ExperimentConfig:
    """The config of parsed options (:func:`add_config_arguments`); ``fixed`` fields win over them.

    Raises:
        ValueError: an element of a list that does not convert, or a value the config refuses.
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    values = {k: v for k, v in given.items() if k in names}  # list text is converted by the config
    return ExperimentConfig(**{**values, **fixed})
