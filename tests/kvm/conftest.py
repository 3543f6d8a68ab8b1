"""Tests against the real /dev/kvm (see the `kvm` fixture in tests/conftest.py)."""
from __future__ import annotations

import pytest

from guestlib import Guest, real_mode_guest


@pytest.fixture
def make_guest(kvm):
    """`make_guest(source, ...)`: a real-mode guest (see guestlib), closed after the test."""
    guests: list[Guest] = []

    def make(source: str, **kwargs) -> Guest:
        guests.append(real_mode_guest(kvm, source, **kwargs))
        return guests[-1]

    yield make
    for guest in guests:
        guest.close()
