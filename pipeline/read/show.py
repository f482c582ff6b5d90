"""``show RUN_DIR``: the manifest and the tables of a run as aligned text.

The manifest's facts first, then each registered view's text tables (``View.show``), then one
line per table too large to print; a table no view lists is shown by the generic view.
"""

from __future__ import annotations

from pipeline.read.run import Run
from pipeline.read.text import number
from pipeline.read.views import VIEWS


def _facts(run: Run) -> str:
    manifest = run.manifest
    variables = ", ".join(f"{v['name']} {tuple(v['shape'])}" for v in manifest.get("variables", []))
    facts = [
        ("run", manifest.get("run_id")), ("directory", run.run_dir), ("date", manifest.get("date")),
        ("status", manifest.get("status")),
        ("job", manifest.get("job", {}).get("name")), ("model", manifest.get("model", {}).get("path")),
        ("model sha256", manifest.get("model", {}).get("sha256")),
        ("data", f"{manifest.get('data', {}).get('rows')} rows, fingerprint "
                 f"{str(manifest.get('data', {}).get('fingerprint'))[:16]}"),
        ("examples", manifest.get("examples")), ("loss", number(manifest.get("loss"))),
        ("parameters", manifest.get("parameters")), ("variables", variables or "-"),
        ("shards", manifest.get("shards")),
        ("workers", manifest.get("workers")), ("passes", manifest.get("passes")),
        ("seconds", manifest.get("seconds")), ("files", _files(manifest.get("files", []))),
    ]
    width = max(len(k) for k, _ in facts)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in facts) + "\n"


def _files(files: list[str]) -> str:
    """The run's files, a folder of parts (one per shard, maybe thousands) as one entry."""
    folders: dict[str, int] = {}
    for name in files:
        if "/" in name:
            folder = name.split("/", 1)[0] + "/"
            folders[folder] = folders.get(folder, 0) + 1
    listed = dict.fromkeys(name if "/" not in name else name.split("/", 1)[0] + "/" for name in files)
    return ", ".join(f"{name} ({folders[name]} files)" if name in folders else name for name in listed)


def show_run(run_dir: str) -> str:
    """The run as text: manifest facts, then every view's tables, then the one-line descriptions."""
    run = Run(run_dir)
    text = _facts(run)
    lines = []
    for view in VIEWS:
        shown = view.show(run)
        text += "".join(f"\n{title}\n{table}" for title, table in shown.tables)
        lines += shown.lines
    if lines:
        width = max(len(k) for k, _ in lines)
        text += "\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines) + "\n"
    return text
