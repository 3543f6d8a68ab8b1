"""Stopping a running tcg vCPU: kick, immediate_exit, time limits, signals, close."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from vlab.kvm.exits import Hlt, Interrupted, IoOut, MmioRead
from vlab.kvm.state import CpuidEntry

SPIN = """
spin:
    cmp byte [0x500], 0     ; spin
    je spin
    mov al, 7
    out 0xE9, al
    hlt
"""


def test_kick_from_another_thread_stops_a_spinning_guest_which_resumes(guest):
    g = guest(SPIN)
    timer = threading.Timer(0.1, g.vcpu.kick)
    started = time.monotonic()
    timer.start()
    assert isinstance(g.run(), Interrupted)
    assert time.monotonic() - started > 0.09  # stopped by the kick, not before it
    assert g.vcpu.immediate_exit is False
    rip = g.vcpu.get_regs().rip
    assert g.address_of("spin") <= rip < g.address_of("spin") + 8  # still in the loop
    g.memory.write_u8(0x500, 1)
    assert [type(e) for e in g.run_until(Hlt)] == [IoOut, Hlt]
    assert g.output() == b"\x07"
    assert g.vcpu.get_stats_fd().read()["signal_exits"] == 1


def test_kick_before_run_makes_the_next_run_return_at_once(guest):
    g = guest("hlt")
    g.vcpu.kick()
    assert isinstance(g.run(), Interrupted)
    assert g.vcpu.get_regs().rip == g.assembly.org  # nothing ran
    assert isinstance(g.run(), Hlt)


def test_a_kicked_run_first_completes_the_mmio_load_it_was_answered(guest):
    """As KVM completes the last exit's I/O (complete_userspace_io) before it honours
    immediate_exit, so a stepping debugger can finish an MMIO load and stop right after."""
    g = guest("mov ecx, [0xD0000000]\nhlt", mode="protected")
    exit = g.run()
    assert isinstance(exit, MmioRead) and g.vcpu.get_regs().rip == 0x8000
    g.vcpu.complete_mmio_read(exit, b"\x78\x56\x34\x12")
    g.vcpu.kick()
    assert isinstance(g.run(), Interrupted)
    regs = g.vcpu.get_regs()
    assert regs.rcx == 0x12345678 and regs.rip == 0x8006
    assert isinstance(g.run(), Hlt)


def test_immediate_exit_is_cleared_by_the_run_it_stops(guest):
    g = guest("hlt")
    g.vcpu.immediate_exit = True
    assert isinstance(g.run(), Interrupted)
    assert g.vcpu.immediate_exit is False
    assert isinstance(g.run(), Hlt)


def test_time_limit_returns_interrupted_from_a_runaway_guest(guest):
    g = guest("jmp $")
    g.vcpu.time_limit = 0.2
    started = time.monotonic()
    assert isinstance(g.run(), Interrupted)
    assert time.monotonic() - started >= 0.2  # ran its time limit, not less
    assert g.vcpu.get_regs().rip == g.assembly.org


def test_a_signal_reaches_python_while_a_guest_spins(guest):
    """Time slices return to Python, so the main thread's handler runs (the notebook's stop
    button raises KeyboardInterrupt this way); the guest can be resumed after."""
    g = guest(SPIN)

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        with pytest.raises(Stop):
            g.run()
        assert time.monotonic() - started >= 0.2  # the alarm's, not an earlier return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    g.memory.write_u8(0x500, 1)
    assert [type(e) for e in g.run_until(Hlt)] == [IoOut, Hlt]


def test_an_exception_in_a_hook_propagates_out_of_run(guest):
    """Unicorn cannot carry a Python exception through its C frames: the hook stores it,
    stops emulation, and run() raises it."""
    g = guest("cpuid\nhlt")
    g.vcpu.set_cpuid2([CpuidEntry(0, eax="not a number")])
    with pytest.raises(TypeError):
        g.run()


def test_closed_vcpu_refuses_to_run(guest):
    g = guest("hlt")
    g.vcpu.close()
    assert g.vcpu.closed
    with pytest.raises(ValueError, match="vCPU 0 is closed"):
        g.vcpu.run()
    g.vcpu.kick()  # harmless
    assert g.vm.vcpus == []
