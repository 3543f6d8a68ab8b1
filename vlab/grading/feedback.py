"""A check's verdict in words: what the student's code did, against KVM, and what to change.

A failed check raises `CheckFailed`, an AssertionError (so nbgrader's autograder scores the
test cell 0) that IPython shows as its feedback lines alone: `_render_traceback_` replaces
the traceback, which would point into the checker rather than at the student's mistake.
Whatever the student's own code raises is caught by `call` and turned into such feedback,
naming the line of their cell it came from.
"""
from __future__ import annotations

import traceback
from dataclasses import FrozenInstanceError
from pathlib import Path

from ..kvm.errors import KvmError
from ..kvm.sregs_check import SregsError

_PACKAGE = str(Path(__file__).resolve().parent.parent)


class CheckFailed(AssertionError):
    """The check found `problems`, each a sentence saying what happened and what to do."""

    def __init__(self, exercise: str, problems: list[str]):
        self.exercise = exercise
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        # a problem's own indented lines (an explanation's list) continue the one before
        return [f"✗ {self.exercise}: not yet"] + [f"    {p.strip()}" if p.startswith(" ")
                                                   else f"  - {p}" for p in self.problems]

    def _render_traceback_(self) -> list[str]:
        return self.lines()


class NotWritten(CheckFailed):
    """The student's function still raises the stub's NotImplementedError."""


def passed(exercise: str, facts: list[str]) -> None:
    """Print what the check verified."""
    print(f"✓ {exercise}")
    for fact in facts:
        print(f"  - {fact}")


def _student_line(error: BaseException, filename: str | None = None) -> str:
    """Where in the student's code the error was raised, as ` (line N of your cell: code)`:
    the last frame in the file of the student's function, else the last outside vlab."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(_PACKAGE)]
    own = [f for f in frames if f.filename == filename]
    frame = (own or [f for f in frames if f.line] or [None])[-1]
    if frame is None:
        return ""
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (line {frame.lineno} of your cell{code})"


def _stub(error: NotImplementedError, default: str) -> str:
    """The student's function that raised the stub's NotImplementedError (a helper of theirs,
    or the function the check called)."""
    codes = [frame.f_code for frame, _ in traceback.walk_tb(error.__traceback__)
             if not frame.f_code.co_filename.startswith(_PACKAGE)]
    if not codes or codes[-1].co_name == "<module>":
        return default
    qualname = getattr(codes[-1], "co_qualname", codes[-1].co_name)   # Python 3.11+
    return qualname.rsplit("<locals>.", 1)[-1]


def call(exercise: str, function, *args):
    """`function(*args)`, with whatever it raises turned into `CheckFailed`."""
    name = getattr(function, "__name__", repr(function))
    code = getattr(function, "__code__", None) or getattr(function.__init__, "__code__", None)
    where = code.co_filename if code is not None else None
    try:
        return function(*args)
    except NotImplementedError as error:
        raise NotWritten(exercise, [f"`{_stub(error, name)}` is not written yet: replace "
                                    f"`raise NotImplementedError()` with your code."]) from None
    except SregsError as error:
        raise CheckFailed(exercise, [f"`{name}` stopped{_student_line(error, where)}: the "
                                     f"special registers would be refused:"]
                          + error.problems) from None
    except KvmError as error:
        raise CheckFailed(exercise, [f"`{name}` stopped{_student_line(error, where)}: "
                                     f"{error}"]) from None
    except CheckFailed:
        raise
    except Exception as error:  # noqa: BLE001 - any mistake in student code becomes feedback
        hint = (" Register and CPUID values are frozen dataclasses: make a changed copy with "
                "value.replace(field=...)." if isinstance(error, FrozenInstanceError) else "")
        raise CheckFailed(exercise, [f"`{name}` raised {type(error).__name__}: {error}"
                                     f"{_student_line(error, where)}.{hint}"]) from None
