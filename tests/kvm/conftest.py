"""Tests against the real /dev/kvm. Those that need it use the `kvm` fixture (or carry the
`kvm` marker) and are skipped, with `kvm_usable()`'s reason, where KVM cannot be used."""
from __future__ import annotations

import functools

import pytest

from vlab.kvm import Kvm, kvm_usable

from guestlib import Guest, real_mode_guest


_kvm_status = functools.cache(kvm_usable)


def require_kvm() -> None:
    """Skip the current test, with the reason, unless /dev/kvm can be used."""
    usable, why = _kvm_status()
    if not usable:
        pytest.skip(why)


def pytest_collection_modifyitems(items):
    """A test that uses the `kvm` fixture is a `kvm` test: `-m "not kvm"` deselects it."""
    for item in items:
        if "kvm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kvm)


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm"):
        require_kvm()


@pytest.fixture
def kvm():
    """An open /dev/kvm (tests using it are skipped where there is none)."""
    require_kvm()
    with Kvm() as handle:
        yield handle


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
