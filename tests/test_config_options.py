"""The benchmarks' and studies' options that are ExperimentConfig fields (common.run.config.add_config_options)
parse as ``python -m common.run`` parses them."""

from __future__ import annotations

import argparse

import pytest

from common.run.cli import add_config_options, config_from_args, config_parser
from common.run.config import ExperimentConfig, field_value

VALUES = {
    "model": "vgg16",
    "methods": "uniform,policy",
    "proxy": "kl",
    "rerank": "2",
    "rescore": "4",
    "rescore_images": "128",
    "calib_images": "64",
    "val_images": "100",
    "threads": "3",
    "seed": "5",
    "shapes": "level,energy",
    "final_calib_images": "512",
    "data_root": "/data/here",
}
"""A value on the command line for each field the scripts share."""

SHARED = {
    "bench_search": [
        *("model", "methods", "proxy", "rerank", "rescore", "rescore_images", "calib_images", "val_images"),
        *("threads", "seed", "shapes", "final_calib_images", "data_root"),
    ],
    "additivity": ["threads"],
    "image_noise": ["threads"],
    "matched_macs": ["threads"],
    "proxy_fidelity": ["model", "seed", "final_calib_images", "threads"],
    "proxy_tail": ["calib_images", "threads", "data_root"],
    "train_step": ["threads"],
}
"""The options each script takes from ExperimentConfig (its other flags, e.g. the studies' ``--methods`` filter
or ``--device`` without ``auto``, mean something else and are its own)."""


def _script_parsers(monkeypatch) -> dict[str, tuple[argparse.ArgumentParser, list[str]]]:
    """Each script's parser (the one its ``parse_args`` builds and parses with) and the arguments it requires."""
    from benchmarks import bench_search
    from studies.additivity import additivity
    from studies.image_noise import image_noise
    from studies.matched_macs import matched_macs
    from studies.proxy_fidelity import proxy_fidelity
    from studies.proxy_tail import proxy_tail
    from studies.train_step import train_step

    scripts = {
        "bench_search": (bench_search.parse_args, []),
        "additivity": (additivity.parse_args, ["--log", "x.log"]),
        "image_noise": (image_noise.parse_args, ["--log", "x.log"]),
        "matched_macs": (matched_macs.parse_args, ["--log", "x.log"]),
        "proxy_fidelity": (proxy_fidelity.parse_args, []),
        "proxy_tail": (proxy_tail.parse_args, ["--log", "x.log", "--plans", "energy:0"]),
        "train_step": (train_step.parse_args, ["--json", "j", "--out", "o"]),
    }
    real, seen = argparse.ArgumentParser.parse_args, []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        return real(self, args, namespace)

    out = {}
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        for name, (parse, required) in scripts.items():
            seen.clear()
            parse(required)
            out[name] = (seen[0], required)
    return out


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _experiment_value(field: str, text: str):
    """The value ``python -m common.run --<field> <text>`` runs with."""
    flag = "--" + field.replace("_", "-")
    return getattr(config_from_args(config_parser("python -m common.run").parse_args([flag, text])), field)


@pytest.mark.parametrize("field", sorted(VALUES))
def test_added_options_parse_as_the_experiment_cli(field):
    p = argparse.ArgumentParser()
    add_config_options(p, [field])
    flag = "--" + field.replace("_", "-")
    mine, theirs = _actions(p)[flag], _actions(config_parser("python -m common.run"))[flag]
    for attr in ("option_strings", "dest", "type", "choices", "metavar", "help", "nargs"):
        assert getattr(mine, attr) == getattr(theirs, attr), attr
    assert field_value(field, getattr(p.parse_args([flag, VALUES[field]]), field)) == _experiment_value(
        field, VALUES[field]
    )
    assert getattr(p.parse_args([]), field) == getattr(ExperimentConfig(), field)  # not given: the default


def test_a_scripts_own_default_is_kept_and_shown():
    p = argparse.ArgumentParser()
    add_config_options(p, ["threads", "shapes"], defaults={"threads": 2, "shapes": ("level",)})
    a = p.parse_args([])
    assert a.threads == 2 and a.shapes == ("level",)
    helps = {x.dest: x.help for x in p._actions}
    assert helps["threads"] == "torch CPU threads (default: 2)" and helps["shapes"].endswith("(default: level)")
    assert p.parse_args(["--threads", "4"]).threads == 4


def test_every_script_option_named_after_a_field_parses_as_the_experiment_cli(monkeypatch):
    experiment = _actions(config_parser("python -m common.run"))
    parsers = _script_parsers(monkeypatch)
    assert set(parsers) == set(SHARED)
    for name, (parser, required) in parsers.items():
        actions = _actions(parser)
        for field in SHARED[name]:
            flag = "--" + field.replace("_", "-")
            mine, theirs = actions[flag], experiment[flag]
            for attr in ("dest", "type", "choices", "metavar"):
                assert getattr(mine, attr) == getattr(theirs, attr), (name, flag, attr)
            value = getattr(parser.parse_args([*required, flag, VALUES[field]]), field)
            assert field_value(field, value) == _experiment_value(field, VALUES[field]), (name, flag)
