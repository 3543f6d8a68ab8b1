"""KVM_SET_GUEST_DEBUG on the tcg vCPU: single-step and hardware breakpoints."""
from __future__ import annotations

import pytest

from vlab.kvm.exits import Debug, Hlt, IoOut, MmioRead
from vlab.kvm.state import DebugRegs, Regs

DR6_BS = 0xFFFF4FF0

STEPS = """
    mov ax, 1       ; s1
    mov bx, 2       ; s2
    add ax, bx      ; s3
    out 0xE9, al    ; s4
    nop             ; s5
    hlt             ; s6
    nop             ; s7
"""


def test_single_step_reports_each_next_rip(guest):
    g = guest(STEPS)
    g.vcpu.set_guest_debug(True, single_step=True)
    exits = [g.run() for _ in range(8)]
    at = g.address_of
    assert exits[:3] == [Debug(1, at(s), DR6_BS, 0x400) for s in ("s2", "s3", "s4")]
    # an exit from a stepped instruction comes first, its Debug next
    assert isinstance(exits[3], IoOut) and exits[3].data == b"\x03"
    assert exits[4] == Debug(1, at("s5"), DR6_BS, 0x400)
    assert exits[5] == Debug(1, at("s6"), DR6_BS, 0x400)
    assert isinstance(exits[6], Hlt)
    assert exits[7] == Debug(1, at("s7"), DR6_BS, 0x400)
    assert g.vcpu.get_regs().rip == at("s7")


def test_single_step_reports_linear_addresses(guest):
    g = guest(STEPS)
    sregs = g.vcpu.get_sregs()
    g.vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(selector=0x700, base=0x7000)))
    g.vcpu.set_regs(Regs(rip=g.address_of("s1") - 0x7000, rflags=0x2))
    g.vcpu.set_guest_debug(True, single_step=True)
    assert g.run().pc == g.address_of("s2")
    assert g.vcpu.get_regs().rip == g.address_of("s2") - 0x7000


def test_single_step_over_an_mmio_load_steps_once_it_is_answered(guest):
    g = guest("""
        mov eax, [dword 0xD0000000]
        nop                 ; next
        hlt
    """)
    g.vcpu.set_guest_debug(True, single_step=True)
    exit = g.run()
    assert isinstance(exit, MmioRead)
    g.vcpu.complete_mmio_read(exit, b"\x01\x00\x00\x00")
    assert g.run() == Debug(1, g.address_of("next"), DR6_BS, 0x400)
    assert g.vcpu.get_regs().rax == 1


def test_breakpoint_stops_before_the_instruction_and_resumes(guest):
    g = guest(STEPS)
    g.vcpu.set_guest_debug(True, hw_breakpoints=(0x1234, g.address_of("s3")))
    exit = g.run()
    assert exit == Debug(1, g.address_of("s3"), 0xFFFF0FF0 | 1 << 1, 0x400 | 1 | 1 << 2)
    regs = g.vcpu.get_regs()
    assert (regs.rip, regs.rax, regs.rbx) == (g.address_of("s3"), 1, 2)
    # resuming at the breakpoint does not hit it again (RF): on to the end
    assert [type(e) for e in g.run_until(Hlt)] == [IoOut, Hlt]
    assert g.vcpu.get_regs().rax == 3


def test_breakpoint_in_a_loop_hits_every_time(guest):
    g = guest("""
        mov cx, 3
    again:
        dec cx          ; bp
        jnz again
        hlt
    """)
    g.vcpu.set_guest_debug(True, hw_breakpoints=(g.address_of("bp"),))
    counts = []
    while isinstance(exit := g.run(), Debug):
        counts.append(g.vcpu.get_regs().rcx)
    assert isinstance(exit, Hlt)
    assert counts == [3, 2, 1]


def test_moving_rip_off_a_breakpoint_forgets_the_resume_flag(guest):
    g = guest("""
        nop             ; first
    target:
        nop             ; bp
        hlt
    """)
    bp = g.address_of("bp")
    g.vcpu.set_guest_debug(True, hw_breakpoints=(bp,))
    assert g.run().pc == bp
    g.vcpu.set_regs(Regs(rip=g.address_of("first"), rflags=0x2))
    assert g.run().pc == bp  # reached anew, so it hits


def test_disabling_guest_debug_removes_breakpoints(guest):
    g = guest(STEPS)
    g.vcpu.set_guest_debug(True, single_step=True, hw_breakpoints=(g.address_of("s3"),))
    g.vcpu.set_guest_debug(False)
    assert [type(e) for e in g.run_until(Hlt)] == [IoOut, Hlt]


def test_at_most_four_breakpoints(guest):
    g = guest("hlt")
    with pytest.raises(ValueError, match="DR0-DR3"):
        g.vcpu.set_guest_debug(True, hw_breakpoints=(1, 2, 3, 4, 5))


def test_debug_registers_round_trip(guest):
    g = guest("hlt")
    assert g.vcpu.get_debugregs() == DebugRegs((0, 0, 0, 0), 0xFFFF0FF0, 0x400)
    regs = DebugRegs((0x1000, 0x2000, 0x3000, 0x4000), 0xFFFF0FF1, 0x401)
    g.vcpu.set_debugregs(regs)
    assert g.vcpu.get_debugregs() == regs
