"""Help texts of the three console scripts: every option explained, one default each, every command listed
once, and the ``sim://`` query options under ``nsdd-edge run --help``."""

from __future__ import annotations

import argparse
import re

import pytest

import export.cli
import nsdd_edge.cli
import train.cli
from nsdd_edge.cli_common import HelpFormatter, build_parser

TOOLS = {"nsdd-edge": nsdd_edge.cli, "nsdd-train": train.cli, "nsdd-export": export.cli}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_every_option_has_its_own_help_and_at_most_one_default(prog):
    module = TOOLS[prog]
    parser, modules = build_parser(prog, module.__doc__, module.COMMANDS)
    assert all(m is not None for m, _ in modules.values()), modules  # CI installs every extra
    problems = []
    for name, sub in _subparsers(parser).items():
        formatter = HelpFormatter(f"{prog} {name}")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{prog} {name} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action) if action.help else ""
            if not re.sub(r"\(default[^)]*\)", "", text).strip():
                problems.append(f"{label}: no help text")
            if text.count("(default") > 1:
                problems.append(f"{label}: two defaults: {text!r}")
            if "(default: None)" in text:
                problems.append(f"{label}: says '(default: None)': {text!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_top_level_help_lists_each_command_once(prog, capsys):
    module = TOOLS[prog]
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in module.COMMANDS:
        listed = re.findall(rf"^ {{2,8}}{re.escape(name)}( |$)", out, flags=re.MULTILINE)  # not wrapped help
        assert len(listed) == 1, f"{prog} --help lists {name!r} {len(listed)} times:\n{out}"


def test_run_help_lists_every_sim_option(capsys):
    """The options sim:// understands (from its own unknown-option message) are all in `run --help`."""
    from nsdd_edge.sources import open_source

    understood: set[str] = set()
    for uri in ("sim://?unknown_option=1", "sim://?format=bayer&unknown_option=1"):
        with pytest.raises(ValueError, match="unknown option") as exc:
            open_source(uri)
        understood |= {k.strip() for k in str(exc.value).split("understands", 1)[1].split(",")}
    understood -= {"geometry"}  # a LenslessGeometry: keyword only, never in a URI
    with pytest.raises(SystemExit):
        nsdd_edge.cli.main(["run", "--help"])
    out = capsys.readouterr().out
    missing = sorted(k for k in understood if not re.search(rf"^\s+{re.escape(k)}=", out, flags=re.MULTILINE))
    assert not missing, f"sim:// options missing from `nsdd-edge run --help`: {missing}"
