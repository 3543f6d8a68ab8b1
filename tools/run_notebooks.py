#!/usr/bin/env python3
"""Execute the curriculum's notebooks in place and save their outputs.

nbval compares every code cell's fresh output with the one stored in the notebook, so the
stored outputs are the test's expectations. After changing a notebook (or vlab itself in a
way the lessons show), regenerate them with:

    python tools/run_notebooks.py                 # every notebooks/*.ipynb, lessons in order
    python tools/run_notebooks.py 06 07           # only those whose name starts so
    python tools/run_notebooks.py --check         # execute without saving; exit 1 on error

then review the diff (`git diff notebooks/`) and run
`python -m pytest --nbval notebooks/ --nbval-sanitize-with notebooks/sanitize.cfg`.
The kernel runs in notebooks/ with the repository on PYTHONPATH, as under nbval.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def notebooks(prefixes: list[str]) -> list[Path]:
    # The numbered lessons in order, then any other notebook (the dashboard), as nbval sees them.
    found = sorted(NOTEBOOKS.glob("*.ipynb"), key=lambda p: (not p.name[:2].isdigit(), p.name))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    return found


def execute(path: Path, timeout: int, save: bool) -> float:
    nb = nbformat.read(path, as_version=4)
    # Widget state is stored, so a reader sees the views before running anything (nbviewer;
    # JupyterLab once the notebook is trusted); nbval never reads it.
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    nb.metadata.pop("widgets", None)
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        # Saved even when a cell fails: the stored error shows where (and nbval fails on it).
        if save:
            nbformat.write(stable_model_ids(nb, path.name), path)
    return time.perf_counter() - started


def stable_model_ids(nb, name: str):
    """The notebook with its widget model ids (random in the kernel) renamed in the order the
    models were made: a run that makes the same widgets keeps the same ids, so re-running a
    notebook changes only what its widgets show."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    text = nbformat.writes(nb)
    for n, model_id in enumerate(list(state)):
        text = text.replace(model_id, uuid.uuid5(uuid.NAMESPACE_URL, f"vlab/{name}/{n}").hex)
    return nbformat.reads(text, as_version=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="only notebooks whose name starts so (e.g. 06)")
    parser.add_argument("--check", action="store_true", help="execute, but do not save outputs")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    args = parser.parse_args(argv)
    # The kernel imports vlab from this checkout, installed or not.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    paths = notebooks(args.prefixes)
    if not paths:
        print("no notebook matches", args.prefixes, file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        try:
            seconds = execute(path, args.timeout, save=not args.check)
        except CellExecutionError as error:
            failed += 1
            print(f"FAIL {path.name}\n{error}", file=sys.stderr)
            continue
        print(f"{'ran ' if args.check else 'saved'} {path.name}  ({seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
