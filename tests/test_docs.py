"""README.md documents every command, every option and every job key; every --help has examples.

The commands and options are read from the parser itself (``pipeline.cli._parser()``), so a
new command or option fails here until README.md names it.
"""

from __future__ import annotations

import argparse
import os
import re

import pytest

from pipeline.cli import _parser
from pipeline.job import job_keys

README = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def _mentioned(text: str) -> bool:
    """``text`` appears in README.md as a whole word (``--out`` is not found in ``--output``)."""
    return re.search(rf"(?<![\w-]){re.escape(text)}(?![\w-])", README) is not None


COMMANDS = sorted(_commands())


def test_the_parser_has_the_contracts_commands():
    assert {"run", "validate", "show", "report"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_and_option_is_in_the_readme(command):
    assert _mentioned(f"hessian-pipeline {command}"), f"README.md does not show `hessian-pipeline {command}`"
    missing = [option for option in _options(_commands()[command]) if not _mentioned(option)]
    assert not missing, f"README.md does not document {command} {', '.join(missing)}"


def test_the_programs_own_options_are_in_the_readme():
    missing = [option for option in _options(_parser()) if not _mentioned(option)]
    assert not missing, f"README.md does not document {', '.join(missing)}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command):
    text = _commands()[command].format_help()
    assert "examples:" in text and f"hessian-pipeline {command} " in text.split("examples:", 1)[1], text


def test_every_job_key_is_in_the_readme():
    missing = [key for key in job_keys() if f"`{key}`" not in README]
    assert not missing, f"README.md's job file table lacks {', '.join(missing)}"
