"""The course around the exercises holds together: every lesson states its objectives,
prerequisites and time and ends with a recap and "explain why" questions; every exercise is
practised from a lesson and listed in the index and the syllabus; every link resolves.
Read as JSON and text: no kernel, no /dev/kvm."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
LESSONS = sorted((REPO / "notebooks").glob("[0-9][0-9]-*.ipynb"))
EXERCISES = sorted((REPO / "exercises" / "source").glob("*/*.ipynb"))
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)\)")


def _cell(path: Path, cell_id: str):
    nb = nbformat.read(path, as_version=4)
    return next((c for c in nb.cells if c.get("id") == cell_id), None)


def _links_resolve(source: str, base: Path) -> list[str]:
    return [m["target"] for m in LINK.finditer(source)
            if not m["target"].startswith("http") and not (base / m["target"]).exists()]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_lesson_opens_with_objectives_and_closes_with_a_recap(path):
    nb = nbformat.read(path, as_version=4)
    ids = [c.get("id") for c in nb.cells]
    assert "lesson-objectives" in ids and "lesson-recap" in ids, (
        f"{path.name}: add its learning objectives (after the title) and recap (before the "
        f"closing navigation) as the other lessons have them")
    top, bottom = _cell(path, "lesson-objectives"), _cell(path, "lesson-recap")
    assert ids.index("lesson-objectives") <= 3 and ids.index("lesson-recap") == len(ids) - 2
    assert all(word in top.source for word in ("Learning objectives", "Prerequisites", "Time"))
    assert re.search(r"about \d+ minutes", top.source)
    assert "Recap" in bottom.source and "Explain why" in bottom.source
    assert re.search(r"^1\. .*\?$", bottom.source, re.MULTILINE), "questions, numbered"
    for cell in (top, bottom):
        assert _links_resolve(cell.source, path.parent) == []


def test_every_exercise_is_practised_from_a_lesson_and_listed_in_the_index_and_syllabus():
    practised = "".join(_cell(p, "lesson-recap").source for p in LESSONS
                        if _cell(p, "lesson-recap") is not None)
    index = _cell(REPO / "notebooks" / "00-index.ipynb", "course-exercises").source
    syllabus = (REPO / "SYLLABUS.md").read_text()
    assert EXERCISES
    for exercise in EXERCISES:
        target = exercise.relative_to(REPO).as_posix()
        assert f"../{target}" in practised and f"../{target}" in index and target in syllabus


def test_the_syllabus_links_resolve_and_its_points_add_up():
    syllabus = (REPO / "SYLLABUS.md").read_text()
    assert _links_resolve(syllabus, REPO) == []
    points = 0
    for path in EXERCISES:
        nb = nbformat.read(path, as_version=4)
        points += sum(c.metadata["nbgrader"].get("points", 0) for c in nb.cells
                      if c.metadata["nbgrader"].get("grade"))
    assert f"{points} points in all" in syllabus
