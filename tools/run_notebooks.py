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
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def notebooks(prefixes: list[str]) -> list[Path]:
    # The numbered lessons in order, then any other notebook (the dashboard), as nbval sees them.
    found = sorted(NOTEBOOKS.glob("*.ipynb"), key=lambda p: (not p.name[:2].isdigit(), p.name))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    return found


def execute(path: Path, timeout: int, save: bool) -> float:
    nb = nbformat.read(path, as_version=4)
    # Widget state (every model's value, under random model ids) is not stored: it would
    # rewrite the whole file on every run and nbval never reads it. The widgets draw again
    # when a learner runs the cells.
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                            record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    nb.metadata.pop("widgets", None)
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        # Saved even when a cell fails: the stored error shows where (and nbval fails on it).
        if save:
            nbformat.write(nb, path)
    return time.perf_counter() - started


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
