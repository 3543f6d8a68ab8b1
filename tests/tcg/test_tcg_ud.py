"""#UD: an undefined opcode (ud2) raises vector 6, which the CPU delivers to the guest's
handler. The same guests on KVM (where /dev/kvm can be used) and on tcg end the same way."""
from __future__ import annotations

import shutil

import pytest

from vlab.kvm.abi import InternalErrorSuberror
from vlab.kvm.exits import Hlt, InternalError, IoOut, Shutdown

from tcglib import make_guest

REAL_HANDLER = """
    mov word [6*4], handler
    mov word [6*4+2], 0
    mov sp, 0x7000
    ud2                         ; fault
    hlt
handler:
    mov al, 'U'
    out 0xE9, al
    pop bx                      ; IP pushed: the ud2's own
    pop cx                      ; CS
    pop dx                      ; FLAGS
    hlt
"""

# No handler installed: vector 6's IVT entry is what RAM holds there (zero: 0000:0000), and
# the guest puts code at 0000:0000 (over vectors 0 and 1) to show where the CPU went.
REAL_NO_HANDLER = """
    mov sp, 0x7000
    mov dword [0], 0xE9E65AB0   ; mov al, 'Z'; out 0xE9, al
    mov byte [4], 0xF4          ; hlt
    ud2
    hlt
"""

def gate_handler(mode):
    """A guest that installs an interrupt gate for #UD (an IDT of 7 gates: vectors 0-6),
    executes ud2, and whose handler writes "U" and pops the pushed RIP into RBX."""
    bits64 = mode == "long"
    gate, ax, bx = (16, "rax", "rbx") if bits64 else (8, "eax", "ebx")
    high = "shr rax, 16\n    mov [idt + 6*16 + 8], eax" if bits64 else ""
    return f"""
    mov {ax}, handler
    mov [idt + 6*{gate}], ax
    mov [idt + 6*{gate} + 2], cs
    mov word [idt + 6*{gate} + 4], 0x8E00   ; present, DPL 0, interrupt gate (IST 0)
    shr {ax}, 16
    mov [idt + 6*{gate} + 6], ax
    {high}
    lidt [idtr]
    ud2                                     ; fault
    hlt
handler:
    mov al, 'U'
    out 0xE9, al
    pop {bx}                                ; RIP pushed: the ud2's own
    hlt
idtr: dw 7*{gate} - 1
      {"dq" if bits64 else "dd"} idt
align 16
idt: times 7*{gate} db 0
"""


STOPS = (Hlt, Shutdown, InternalError)


def outcome(accelerator, mode, source):
    """Run until HLT, a shutdown or an internal error: that exit, the output, RBX/RCX/RDX,
    and the address of the line marked `; fault` if any."""
    g = make_guest(source, mode, accelerator=accelerator)
    try:
        out = b""
        for _ in range(100):
            exit = g.vcpu.run()
            if isinstance(exit, IoOut) and exit.port == 0xE9:
                out += exit.data
            if isinstance(exit, STOPS):
                break
        regs = g.vcpu.get_regs()
        fault = g.address_of("fault") if "; fault" in source else None
        return exit, out, (regs.rbx, regs.rcx, regs.rdx), fault
    finally:
        g.close()


@pytest.fixture(autouse=True)
def _nasm():
    if shutil.which("nasm") is None:
        pytest.skip("nasm is not installed")


def test_real_mode_ud2_runs_the_handler(guest):
    g = guest(REAL_HANDLER)
    assert isinstance(g.run(), IoOut) and g.output() == b"U"
    assert isinstance(g.run(), Hlt)
    regs = g.vcpu.get_regs()
    assert regs.rbx == g.address_of("fault")   # a fault: the frame points at the ud2
    assert regs.rcx == 0 and regs.rsp == 0x7000
    assert g.vcpu.get_stats_fd().read()["exception_injections"] == 1


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_ud2_without_an_idt_is_a_triple_fault(guest, mode):
    g = guest("ud2\nhlt", mode)  # setup_mode leaves an empty IDT
    assert isinstance(g.run(), Shutdown)


@pytest.mark.parametrize("mode, source", [
    ("real", REAL_HANDLER), ("real", REAL_NO_HANDLER),
    ("protected", "ud2\nhlt"), ("long", "ud2\nhlt")])
def test_kvm_and_tcg_end_ud2_alike(kvm_accelerator, mode, source):
    on_kvm = outcome(kvm_accelerator(), mode, source)
    on_tcg = outcome(None, mode, source)
    assert on_tcg == on_kvm
    exit, out, (rbx, _, _), fault = on_kvm
    if source is REAL_HANDLER:
        assert isinstance(exit, Hlt) and out == b"U" and rbx == fault
    elif source is REAL_NO_HANDLER:
        assert isinstance(exit, Hlt) and out == b"Z"
    else:
        assert isinstance(exit, Shutdown)


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_protected_and_long_mode_ud2_handler(kvm_accelerator, mode):
    """KVM delivers #UD through the IDT gate; tcg does not emulate gate delivery and stops
    with DELIVERY_EV naming the vector (see vlab.accel.tcg.exceptions)."""
    source = gate_handler(mode)
    exit, out, (rbx, _, _), fault = outcome(kvm_accelerator(), mode, source)
    assert isinstance(exit, Hlt) and out == b"U" and rbx == fault
    exit, out, _, _ = outcome(None, mode, source)
    assert isinstance(exit, InternalError) and out == b""
    assert exit.suberror == InternalErrorSuberror.DELIVERY_EV and exit.data == (6,)
