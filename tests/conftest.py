"""Fixtures shared by every tier. A test that needs /dev/kvm uses the `kvm` fixture (or
carries the `kvm` marker) and is skipped, with `kvm_usable()`'s reason, where KVM cannot be
used."""
from __future__ import annotations

import functools

import pytest

from vlab import Lab
from vlab.kvm import Kvm, kvm_usable

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
def make_lab():
    """`make_lab(accel="kvm", **options)`: Labs that are closed after the test."""
    labs: list[Lab] = []

    def make(accel: str = "kvm", **options) -> Lab:
        labs.append(Lab(accel=accel, **options))
        return labs[-1]

    yield make
    for lab in labs:
        lab.close()
