"""Tests against the real /dev/kvm (see the `kvm` fixture in tests/conftest.py)."""
from __future__ import annotations

import pytest

from guestlib import Guest, real_mode_guest
from vlab.kvm import detect_backend, vcpu as vcpu_module


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


@pytest.fixture
def hardware_breakpoints():
    """Skips the test where DR0-DR3 breakpoints never fire: an emulation artifact the
    backend names (KVM on SVM that QEMU's TCG emulates), not KVM's behaviour."""
    backend = detect_backend()
    if not backend.hardware_breakpoints:
        pytest.skip(next(c for c in backend.caveats if "breakpoints" in c))


@pytest.fixture(params=["compiled", "python"])
def exit_path(request, monkeypatch):
    """Runs the test through each way VcpuFd.run() can decode an exit: the C module
    (vlab/kvm/_exitpath.c, where it was built) and Python's `decode`."""
    if request.param == "python":
        monkeypatch.setattr(vcpu_module, "_exitpath", None)
    elif vcpu_module._exitpath is None:
        pytest.skip("vlab.kvm._exitpath is not built here (tests/unit/test_exits.py says why)")
    return request.param
