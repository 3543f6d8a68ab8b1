"""Guest exceptions: what happens when the guest faults or executes INT n.

Unicorn never delivers an exception through the guest's IDT: it calls the UC_HOOK_INTR hook
with the vector (RIP at a faulting instruction, or after a trap or INT n) and, without the
hook, stops; an undefined opcode (#UD) stops it with UC_ERR_INSN_INVALID instead, and the
vCPU delivers `UD_VECTOR` here like any other vector. A CPU (and KVM, which lets the CPU do it) looks the vector up in the IDT; if the
IDT is too short the lookup itself faults, a second fault is a double fault, a third a
triple fault: the CPU shuts down (KVM_EXIT_SHUTDOWN). So:

- a vector the IDT (IDTR.limit) does not cover ends in `Shutdown`, as it would on KVM;
- in real mode the vCPU delivers it through the interrupt vector table itself, as the CPU
  does (push FLAGS, CS, IP; clear IF, TF, AC; jump to the vector's CS:IP). A vector-table
  entry or a stack outside RAM (MMIO, ROM for the stack, nothing at all) ends in
  `InternalError(DELIVERY_EV, data=(vector, address))`, as recent KVM ends a delivery by the
  CPU that touches MMIO (kvm_prepare_event_vectoring_exit); nothing is written. (Where KVM's
  emulator delivers it, kvm_pvm here and SVM without nested paging, the frame went to the
  hole as MMIO writes, and a vector table in a hole was read again without end.)
- in protected and long mode, with a vector the IDT covers, tcg gives up with an
  `InternalError` (KVM_INTERNAL_ERROR_DELIVERY_EV, data = (vector,)): gate descriptors,
  privilege and stack switches, error codes are not emulated here.
"""
from __future__ import annotations

import struct

from unicorn import x86_const as x86

from ...kvm.abi import InternalErrorSuberror
from ...kvm.exits import Exit, InternalError, Shutdown
from ...x86 import CR0_PE, EFER_LMA, RFLAGS_AC, RFLAGS_IF, RFLAGS_TF
from .cpustate import read_sregs, write_sregs

UD_VECTOR = 6  # #UD, invalid opcode


def deliver(engine, vector: int, shadow) -> Exit | None:
    """Deliver exception `vector`; None if the guest's handler now runs, else the exit."""
    sregs = read_sregs(engine.uc, shadow)
    entry = 4 if not sregs.cr0 & CR0_PE else 16 if sregs.efer & EFER_LMA else 8
    if (vector + 1) * entry - 1 > sregs.idt.limit:
        return Shutdown()
    if sregs.cr0 & CR0_PE:
        return InternalError(InternalErrorSuberror.DELIVERY_EV, (vector,))
    entry_address = (sregs.idt.base + 4 * vector) & 0xFFFFFFFF
    rflags = engine.read(x86.UC_X86_REG_RFLAGS)
    sp = engine.read(x86.UC_X86_REG_RSP)
    frame = []   # (linear address, word) of FLAGS, CS, IP, pushed in that order
    for word in (rflags, sregs.cs.selector, engine.rip()):
        sp = (sp & ~0xFFFF) | ((sp - 2) & 0xFFFF)
        frame.append(((sregs.ss.base + (sp & 0xFFFF)) & 0xFFFFFFFF, word & 0xFFFF))
    outside = [address for address, size, write in
               [(entry_address, 4, False)] + [(address, 2, True) for address, _ in frame]
               if not engine.backs(address, size, write)]
    if outside:
        return InternalError(InternalErrorSuberror.DELIVERY_EV, (vector, outside[0]))
    ip, cs = struct.unpack("<HH", engine.read_linear(entry_address, 4))
    for address, word in frame:
        engine.write_linear(address, struct.pack("<H", word))
    engine.write(x86.UC_X86_REG_RSP, sp)
    engine.write(x86.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC))
    write_sregs(engine.uc, sregs.replace(cs=sregs.cs.replace(selector=cs, base=cs << 4)))
    engine.write(x86.UC_X86_REG_RIP, ip)
    return None
