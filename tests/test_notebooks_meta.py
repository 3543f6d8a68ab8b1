"""The curriculum's notebooks are well-formed lessons that nbval can actually check.

nbval compares each code cell's fresh output with the stored one, but a cell stored without
outputs or an execution count is compared against nothing: it passes while checking nothing.
These tests read the notebooks as JSON (no kernel, no /dev/kvm) and fail on such holes, on
broken Index / Back / Next navigation, and on a notebook that does not end by asserting what
its guest did.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = [
    "00-index", "01-accel-init", "02-cpu-realize-and-cpuid", "03-vcpu-create-and-kvm-run",
    "04-set-cpuid2-tsc-msrs", "05-memory-and-loading", "06-run-loop-and-exits",
    "07-vm-entry-exit-step-by-step", "08-cpu-modes", "09-kvm-vs-tcg", "10-multiboot-kernels",
    "11-inside-kvm-run", "12-booting-linux",
]
LINK = re.compile(r"\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def _paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _nav_links(nb) -> dict[str, str]:
    """Index / Back / Next link targets from the notebook's navigation lines (markdown cells
    whose links start with those words); each must appear and agree wherever it appears."""
    found: dict[str, set[str]] = {}
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for match in LINK.finditer(cell.source):
            word = match["text"].split(":")[0].strip()
            if word in ("Index", "Back", "Next"):
                found.setdefault(word, set()).add(match["target"])
    for word, targets in found.items():
        assert len(targets) == 1, f"{word} links disagree: {sorted(targets)}"
    return {word: targets.pop() for word, targets in found.items()}


def test_the_curriculum_is_complete_and_numbered():
    assert [p.stem for p in _paths()] == EXPECTED


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_navigation_links(path):
    nb = _read(path)
    links = _nav_links(nb)
    assert set(links) == {"Index", "Back", "Next"}, f"{path.name} lacks {sorted({'Index', 'Back', 'Next'} - set(links))}"
    assert links["Index"] == "00-index.ipynb"
    for word, target in links.items():
        assert (NOTEBOOKS / target).resolve().exists(), f"{path.name}: {word} -> {target} does not exist"
    i = EXPECTED.index(path.stem)
    if i > 0:
        assert links["Back"] == f"{EXPECTED[i - 1]}.ipynb"
    expected_next = EXPECTED[i + 1] if i + 1 < len(EXPECTED) else EXPECTED[0]
    assert links["Next"] == f"{expected_next}.ipynb"
    # at the top (first cell) and at the bottom (last cell), so a reader finds them either way
    assert LINK.search(nb.cells[0].source) and LINK.search(nb.cells[-1].source), (
        f"{path.name}: the navigation line belongs in the first and the last cell")
    assert nb.cells[0].cell_type == nb.cells[-1].cell_type == "markdown"


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_every_code_cell_was_run_and_has_outputs(path):
    nb = _read(path)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{path.name} has no code"
    counts = []
    for n, cell in enumerate(code_cells, 1):
        first = cell.source.splitlines()[0] if cell.source else ""
        assert cell.source.strip(), f"{path.name}: code cell {n} is empty"
        assert cell.execution_count is not None, (
            f"{path.name}: code cell {n} ({first!r}) has no execution count: nbval skips it")
        assert cell.outputs, (
            f"{path.name}: code cell {n} ({first!r}) has no stored output: nbval would compare "
            f"it against nothing. Print what the cell shows, then run tools/run_notebooks.py")
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: code cell {n} stored an error: {errors[0].get('ename')}"
        counts.append(cell.execution_count)
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..n: run the notebook top to bottom "
        f"in a fresh kernel (tools/run_notebooks.py)")


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_ends_with_an_assertion_cell(path):
    nb = _read(path)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    tree = ast.parse(last.source)
    asserts = [node for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert len(asserts) >= 3, f"{path.name}: the last code cell should assert what the guest did"


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_widgets_are_shown_with_a_text_summary(path):
    """nbval cannot compare a widget's view, only text: every cell that displays a vlab
    widget also prints its summary()."""
    nb = _read(path)
    for cell in nb.cells:
        if cell.cell_type == "code" and "display(" in cell.source:
            assert ".summary()" in cell.source, f"{path.name}: a widget shown without its summary"


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_labs_are_made_with_auto_so_every_lesson_runs_without_kvm(path):
    """A learner without /dev/kvm (a laptop, Binder) follows the same lessons on tcg: no code
    cell pins a Lab to kvm (a lesson comparing accelerators names them through a variable)."""
    pinned = re.compile(r"""Lab\([^)]*accel\s*=\s*["']kvm["']""")
    for n, cell in enumerate(c for c in _read(path).cells if c.cell_type == "code"):
        assert not pinned.search(cell.source), f"{path.name}: code cell {n + 1} pins accel='kvm'"


def test_the_index_links_every_lesson_and_the_dashboard():
    index = _read(NOTEBOOKS / "00-index.ipynb")
    targets = {m["target"] for cell in index.cells if cell.cell_type == "markdown"
               for m in LINK.finditer(cell.source)}
    wanted = {f"{stem}.ipynb" for stem in EXPECTED[1:]} | {"dashboard.ipynb"}
    assert wanted <= targets, f"00-index does not link {sorted(wanted - targets)}"


def test_the_sanitize_file_parses():
    import configparser
    config = configparser.ConfigParser(interpolation=None)
    config.read(NOTEBOOKS / "sanitize.cfg")
    assert config.sections()
    for section in config.sections():
        re.compile(config[section]["regex"])
        assert "replace" in config[section]
