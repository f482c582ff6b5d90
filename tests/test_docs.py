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


def _python_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block of README.md, in order."""
    blocks, lines = [], README.splitlines()
    for number, line in enumerate(lines):
        if line.strip() == "```python":
            end = lines.index("```", number + 1)
            blocks.append((number + 2, "\n".join(lines[number + 1:end])))
    return blocks


def test_the_readme_has_python_snippets():
    assert len(_python_blocks()) >= 4


@pytest.mark.slow
def test_every_python_snippet_in_the_readme_runs_as_written(tmp_path):
    """From a copy of ``jobs/``, after README's series command, every ```python block runs in
    order in a fresh process (each in its own namespace; a failure names its README line)."""
    import shutil
    import subprocess
    import sys

    repo = os.path.join(os.path.dirname(__file__), os.pardir)
    shutil.copytree(os.path.join(repo, "jobs"), tmp_path / "jobs")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    series = subprocess.run([sys.executable, "-m", "pipeline", "run", "jobs/series.yaml", "--run-id", "s1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert series.returncode == 0, series.stderr
    script = "\n".join(f"exec(compile({code!r}, 'README.md line {line}', 'exec'), {{'__name__': '__main__'}})"
                       for line, code in _python_blocks())
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "merged.keras").exists() and (tmp_path / "results" / "report" / "index.html").exists()
