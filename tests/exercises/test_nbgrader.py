"""The teacher's workflow, for real: nbgrader generates the student versions from the
solution notebooks and autogrades both. The solutions get every automatic point; the
generated versions, run as a student gets them, get none, and each of their test cells shows
the check's feedback, not a traceback. The checks run on this machine's KVM (tcg without it).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbgrader", reason="nbgrader comes with the course and test extras")
from nbgrader.api import Gradebook  # noqa: E402
from nbgrader.apps import NbGraderAPI  # noqa: E402
from nbgrader.coursedir import CourseDirectory  # noqa: E402

COURSE = Path(__file__).resolve().parents[2] / "exercises"
EXERCISES = sorted(p.name for p in (COURSE / "source").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A copy of the course, generated, with the solutions and the student versions
    submitted by two students and autograded."""
    root = tmp_path_factory.mktemp("course")
    shutil.copy(COURSE / "nbgrader_config.py", root)
    shutil.copytree(COURSE / "source", root / "source")
    # nbgrader runs `alembic` by name, from the environment it is installed in
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    cwd = os.getcwd()
    os.chdir(root)   # nbgrader reads nbgrader_config.py from the working directory
    try:
        api = NbGraderAPI(coursedir=CourseDirectory(root=str(root)))
        for exercise in EXERCISES:
            result = api.generate_assignment(exercise)
            assert result["success"], result["log"]
            shutil.copytree(root / "source" / exercise, root / "submitted" / "teacher" / exercise)
            shutil.copytree(root / "release" / exercise, root / "submitted" / "student" / exercise)
            for student in ("teacher", "student"):
                result = api.autograde(exercise, student)
                assert result["success"], result["log"]
    finally:
        os.chdir(cwd)
        os.environ["PATH"] = path
    return root


def _grades(root: Path, exercise: str, student: str) -> dict[str, tuple[float | None, float]]:
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gradebook:
        submission = gradebook.find_submission(exercise, student)
        return {grade.name: (grade.auto_score, grade.max_score)
                for notebook in submission.notebooks for grade in notebook.grades
                if grade.cell.cell_type == "code"}


def _test_cells(root: Path, exercise: str, student: str):
    (path,) = (root / "autograded" / student / exercise).glob("*.ipynb")
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and c.metadata["nbgrader"].get("grade")]


@pytest.mark.parametrize("exercise", EXERCISES)
def test_the_solution_gets_every_automatic_point(graded, exercise):
    grades = _grades(graded, exercise, "teacher")
    assert grades and all(score == maximum > 0 for score, maximum in grades.values()), grades
    for cell in _test_cells(graded, exercise, "teacher"):
        assert "✓" in "".join(o.get("text", "") for o in cell.outputs)


@pytest.mark.parametrize("exercise", EXERCISES)
def test_the_student_version_fails_every_check_with_feedback(graded, exercise):
    released = nbformat.read(next((graded / "release" / exercise).glob("*.ipynb")), as_version=4)
    source = "".join(c.source for c in released.cells)
    assert "### BEGIN SOLUTION" not in source and "raise NotImplementedError()" in source
    assert all(score == 0 for score, _ in _grades(graded, exercise, "student").values())
    for cell in _test_cells(graded, exercise, "student"):
        (error,) = [o for o in cell.outputs if o.output_type == "error"]
        assert error.ename == "NotWritten"   # a CheckFailed: the stub still raises
        assert error.traceback[0].startswith("✗ ") and "is not written yet" in error.traceback[1]
        assert not any("Traceback" in line or 'File "' in line for line in error.traceback)
