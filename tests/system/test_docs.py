"""The documentation: README.md (the front door) and the mkdocs site under docs/ together document
every command, every option and every job key; every --help has examples; docs/cli.md is the
parser's own reference, regenerated here; the site builds with ``mkdocs build --strict``; and
every ```python block of README.md and of docs/ runs as written.

The commands and options are read from the parser itself (``pipeline.cli._parser()``), so a
new command or option fails here until a page names it (docs/cli.md, which is generated, does
not count: a person must say what it is for).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import yaml

import paths
from pipeline.cli import _parser
from pipeline.job import job_keys

ROOT = paths.REPO
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, DOCS)
import gen_cli  # noqa: E402  (docs/gen_cli.py: the CLI reference's generator lives with the docs)


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def _nav_pages(nav) -> list[str]:
    """The pages of mkdocs.yml's nav, in order (paths relative to docs/)."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


NAV = _nav_pages(yaml.safe_load(_read("mkdocs.yml"))["nav"])
# README.md first, then the site's pages in the order of its nav (repository-relative paths).
PAGES = ["README.md"] + [f"docs/{page}" for page in NAV]
# What people wrote: every page but the generated CLI reference.
WRITTEN = "\n".join(_read(page) for page in PAGES if page != "docs/cli.md")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def _mentioned(text: str, where: str = WRITTEN) -> bool:
    """``text`` appears in the docs as a whole word (``--out`` is not found in ``--output``)."""
    return re.search(rf"(?<![\w-]){re.escape(text)}(?![\w-])", where) is not None


COMMANDS = sorted(_commands())


def test_the_parser_has_the_contracts_commands():
    assert {"run", "validate", "show", "report"} <= set(COMMANDS)


def test_every_page_of_docs_is_in_the_nav_and_every_nav_page_exists():
    pages = {os.path.relpath(os.path.join(folder, name), DOCS).replace(os.sep, "/")
             for folder, _, names in os.walk(DOCS) for name in names if name.endswith(".md")}
    assert pages == set(NAV), f"pages not in mkdocs.yml's nav: {sorted(pages - set(NAV))}; " \
                              f"nav pages missing: {sorted(set(NAV) - pages)}"


def test_the_readme_is_a_front_door():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 400, "README.md is the front door: move details to docs/"
    # The two quick-start commands exactly as CI (.ci/run) runs them.
    assert 'pip install -e ".[test]" && hessian-pipeline run jobs/example.yaml' in readme
    assert "\n. .venv/bin/activate && python -m pytest\n" in readme
    for page in NAV:
        if page != "index.md":
            assert f"](docs/{page}" in readme, f"README.md does not link docs/{page}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_and_option_is_in_the_docs(command):
    assert _mentioned(f"hessian-pipeline {command}"), f"no page shows `hessian-pipeline {command}`"
    missing = [option for option in _options(_commands()[command]) if not _mentioned(option)]
    assert not missing, f"no page of README.md and docs/ documents {command} {', '.join(missing)}"


def test_the_programs_own_options_are_in_the_docs():
    missing = [option for option in _options(_parser()) if not _mentioned(option)]
    assert not missing, f"no page of README.md and docs/ documents {', '.join(missing)}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command):
    text = _commands()[command].format_help()
    assert "examples:" in text and f"hessian-pipeline {command} " in text.split("examples:", 1)[1], text


def test_every_job_key_is_in_the_docs():
    missing = [key for key in job_keys() if f"`{key}`" not in _read("docs/job-file.md")]
    assert not missing, f"docs/job-file.md's job file table lacks {', '.join(missing)}"


def test_the_cli_reference_is_generated_from_the_parser():
    """docs/cli.md is what docs/gen_cli.py makes of the parser today, and has every command."""
    assert _read("docs/cli.md") == gen_cli.render(), "docs/cli.md is stale: run python docs/gen_cli.py"
    for command in COMMANDS:
        assert f"\n## hessian-pipeline {command}\n" in _read("docs/cli.md"), command


def test_the_site_builds_with_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a page outside the nav or a docstring that
    mkdocstrings cannot render is an error (about 2 s)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").exists()
    assert "pipeline.read.run.Run" in (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")


def test_every_views_accessors_are_on_the_api_page():
    """``Run``'s methods come from the views' mixins (mkdocstrings cannot follow ``*ACCESSORS``),
    so the API page lists each family's mixin: a new view's accessors must be added there."""
    from pipeline.read.views import ACCESSORS

    page = _read("docs/api.md")
    missing = [f"{a.__module__}.{a.__name__}" for a in ACCESSORS if f"::: {a.__module__}.{a.__name__}" not in page]
    assert not missing, f"docs/api.md does not render {missing}"


def _python_blocks() -> list[tuple[str, int, str]]:
    """``(file, line, code)`` of every ```python block of README.md and of docs/, in order."""
    blocks = []
    for page in PAGES:
        lines = _read(page).splitlines()
        for number, line in enumerate(lines):
            if line.strip() == "```python":
                end = lines.index("```", number + 1)
                blocks.append((page, number + 2, "\n".join(lines[number + 1:end])))
    return blocks


def test_the_docs_have_python_snippets():
    pages = {page for page, _, _ in _python_blocks()}
    assert len(_python_blocks()) >= 8 and "README.md" in pages and len(pages) >= 4, pages


@pytest.mark.slow
def test_every_python_snippet_in_the_docs_runs_as_written(tmp_path):
    """From a copy of ``jobs/``, after the series command (README's recipe 2), every ```python
    block of README.md and then of docs/ (nav order) runs in order in a fresh process (each in
    its own namespace; a failure names its file and line)."""
    import shutil

    shutil.copytree(os.path.join(ROOT, "jobs"), tmp_path / "jobs")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    series = subprocess.run([sys.executable, "-m", "pipeline", "run", "jobs/series.yaml", "--run-id", "s1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert series.returncode == 0, series.stderr
    script = "\n".join(f"exec(compile({code!r}, '{page} line {line}', 'exec'), {{'__name__': '__main__'}})"
                       for page, line, code in _python_blocks())
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "merged.keras").exists() and (tmp_path / "results" / "report" / "index.html").exists()
