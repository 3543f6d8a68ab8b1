"""Fixtures shared by every tier."""
from __future__ import annotations

import pytest

from vlab import Lab


@pytest.fixture
def make_lab():
    """`make_lab(accel="kvm", **options)`: Labs that are closed after the test."""
    labs: list[Lab] = []

    def make(accel: str = "kvm", **options) -> Lab:
        labs.append(Lab(accel=accel, **options))
        return labs[-1]

    yield make
    for lab in labs:
        lab.close()
