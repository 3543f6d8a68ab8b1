"""The tcg tier: real guests on the software accelerator (Unicorn); needs nasm."""
from __future__ import annotations

import shutil

import pytest

from tcglib import Guest, make_guest


@pytest.fixture
def guest():
    """`guest(source, mode=..., ...)`: see tcglib.make_guest; closed after the test."""
    if shutil.which("nasm") is None:
        pytest.skip("nasm is not installed")
    made: list[Guest] = []

    def make(source: str, *args, **kwargs) -> Guest:
        made.append(make_guest(source, *args, **kwargs))
        return made[-1]

    yield make
    for g in made:
        g.close()
