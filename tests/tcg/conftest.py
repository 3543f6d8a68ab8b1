"""The tcg tier: real guests on the software accelerator (Unicorn); needs nasm."""
from __future__ import annotations

import functools
import shutil

import pytest

from vlab.accel.kvm import KvmAccelerator
from vlab.kvm import kvm_usable

from tcglib import Guest, make_guest

_kvm = functools.cache(kvm_usable)


@pytest.fixture
def kvm_accelerator():
    """The KVM accelerator class, for the same guest on KVM; skips where /dev/kvm is unusable."""
    usable, why = _kvm()
    if not usable:
        pytest.skip(why)
    return KvmAccelerator


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
