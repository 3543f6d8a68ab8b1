"""Why a vCPU cannot go on, in words: SHUTDOWN, FAIL_ENTRY and INTERNAL_ERROR explained.

KVM reports these three fatal exits with a number or two; a learner needs the story behind
them. The explanation uses what the exit carries, the vCPU's registers at that moment, the
instruction bytes at RIP (disassembled with Capstone in the CPU's current mode) and the KVM
backend, since what FAIL_ENTRY's code means depends on whether VMX or SVM produced it.
"""
from __future__ import annotations

import functools
from typing import Callable

from ..kvm.abi import InternalErrorSuberror
from ..kvm.exits import Exit, FailEntry, InternalError, Shutdown
from ..x86 import CR0_PE, CR0_PG, EFER_LMA, EFER_LME, MAX_INSN, MSR_EFER, code_bits

# VMX basic exit reasons of a failed VM entry (SDM Vol. 3C Appendix C); KVM reports them
# with bit 31 ("VM-entry failure") set.
_VMX_ENTRY_FAILURES = {
    33: "invalid guest state: a segment, control register, RFLAGS or other guest field "
        "failed the checks of SDM Vol. 3C 27.3.1 (\"Checks on the Guest State Area\")",
    34: "MSR loading: an entry of the VM-entry MSR-load area was refused",
    41: "a machine-check event during VM entry",
}
_VMX_ENTRY_FAILED = 1 << 31
# VM-instruction error numbers of VMLAUNCH/VMRESUME (SDM Vol. 3C 31.4, Table 31-1): KVM
# reports these when the instruction itself fails, before any guest state is loaded.
_VMX_INSTRUCTION_ERRORS = {
    4: "VMLAUNCH with a non-clear VMCS",
    5: "VMRESUME with a non-launched VMCS",
    6: "VMRESUME after VMXOFF",
    7: "VM entry with invalid control field(s)",
    8: "VM entry with invalid host-state field(s)",
    26: "VM entry with events blocked by MOV SS",
}
_SVM_EXIT_ERR = (1 << 64) - 1  # SVM_EXIT_ERR, -1: VMRUN found the VMCB inconsistent

_SUBERRORS = {
    InternalErrorSuberror.EMULATION: "KVM's instruction emulator could not emulate the "
                                     "instruction at RIP",
    InternalErrorSuberror.SIMUL_EX: "an exception arrived while another was being delivered, "
                                    "in a way KVM could not resolve",
    InternalErrorSuberror.DELIVERY_EV: "an unexpected VM exit interrupted the delivery of an "
                                       "event (interrupt or exception) to the guest",
    InternalErrorSuberror.UNEXPECTED_EXIT_REASON: "the hardware exited for a reason KVM does "
                                                  "not handle (data[0] is its code)",
}

# What the software accelerator (vlab.accel.tcg) means by the suberrors it reports.
_TCG_SUBERRORS = {
    InternalErrorSuberror.EMULATION: "the software CPU (Unicorn) could not execute the "
                                     "instruction at RIP",
    InternalErrorSuberror.DELIVERY_EV: "the software CPU could not deliver an exception or "
                                       "interrupt to the guest",
}


@functools.cache
def decoder(bits: int, detail: bool = False):
    """A Capstone x86 disassembler for 16-, 32- or 64-bit code (`detail`: with operands and
    flags)."""
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86,
                     {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits])
    md.detail = detail
    return md


def disassemble(code: bytes, address: int, bits: int) -> str:
    """The first instruction of `code` as `address: bytes  mnemonic operands`."""
    for insn in decoder(bits).disasm(code, address):
        return f"{insn.address:#x}: {insn.bytes.hex(' ')}  {insn.mnemonic} {insn.op_str}".rstrip()
    return f"{address:#x}: {code[:MAX_INSN].hex(' ') or '(no bytes)'}  (not a valid {bits}-bit instruction)"


def explain_shutdown(regs, sregs, backend=None) -> str:
    lines = ["SHUTDOWN: a triple fault. An exception was raised, delivering it raised another "
             "(a double fault), and delivering the double fault failed too, so the CPU shut "
             "down. Likely causes:"]
    # SVM's VMCB is undefined after a shutdown: KVM resets the vCPU, so its registers no
    # longer say where or in which mode it faulted.
    reset = backend is not None and backend.triple_fault_state == "reset"
    if reset:
        lines.append("  - no usable IDT (none loaded, IDTR limit 0, or an IDT entry pointing at "
                     "a bad handler)")
    elif sregs.idt.limit == 0 and sregs.cr0 & CR0_PE:
        lines.append(f"  - no IDT (IDTR limit 0): any exception at all escalates to a triple "
                     f"fault; look at the instruction at RIP {regs.rip:#x}")
    else:
        lines.append("  - no usable IDT, or an IDT entry pointing at a bad handler")
    lines.append("  - a bad GDT or selector: a far jump, segment load or IRET to a descriptor "
                 "that is missing or of the wrong type")
    if reset:
        lines.append("  - a page fault, if paging was on")
        lines.append(f"  - which one the registers cannot tell: this KVM backend "
                     f"({backend.module}) reinitialises the vCPU at a triple fault, so they "
                     f"read as at reset (RIP {regs.rip:#x}), not as where it faulted; step up "
                     f"to the fault to see that state")
    elif sregs.cr0 & CR0_PG:
        lines.append(f"  - a page fault: RIP, the stack or the data touched is not mapped by "
                     f"the page tables at CR3 {sregs.cr3:#x} (CR2, the last faulting address, "
                     f"is {sregs.cr2:#x})")
    else:
        lines.append("  - a page fault, once paging is on (CR0.PG is off here)")
    # kvm_pvm reports CR0.PG clear after such a fault: page tables in CR3 are the trace left.
    if (backend is not None and not backend.runs_32bit_paging and not sregs.efer & EFER_LMA
            and (sregs.cr0 & CR0_PG or sregs.cr3)):
        lines.append(f"  - this KVM backend ({backend.module}) cannot run 32-bit paging at "
                     "all: a guest started with CR0.PG outside long mode triple-faults at its "
                     "first instruction")
    return "\n".join(lines)


WRMSR = b"\x0f\x30"


def lme_refused(vcpu, read_physical) -> str | None:
    """Why a vCPU on a CPU model without lm triple-faulted, if it did so at a WRMSR that
    sets EFER.LME: KVM refused the write with #GP, which escalated. None otherwise."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    try:
        code = read_physical(sregs.cs.base + regs.rip, len(WRMSR))
    except ValueError:
        return None
    if code != WRMSR or regs.rcx & 0xFFFFFFFF != MSR_EFER or not regs.rax & EFER_LME:
        return None
    return (f"the guest's WRMSR at {regs.rip:#x} sets EFER.LME, but this CPU model has no lm "
            f"(CPUID 0x80000001 EDX bit 29 is clear): KVM refused the write with #GP "
            f"(kvm_valid_efer, arch/x86/kvm/x86.c), so the guest cannot enter long mode; "
            f"with no usable IDT the #GP became this triple fault")


def explain_fail_entry(exit: FailEntry, backend=None) -> str:
    code = exit.hardware_entry_failure_reason
    head = f"FAIL_ENTRY: the CPU refused to enter the guest (hardware reason {code:#x}, cpu {exit.cpu})."
    hardware = backend.hardware if backend is not None else "unknown"
    if hardware == "VMX":
        if code & _VMX_ENTRY_FAILED:
            basic = code & 0xFFFF
            why = _VMX_ENTRY_FAILURES.get(basic, f"VM-entry failure with basic exit reason {basic}")
            return f"{head}\nIntel VMX: VM-entry failure due to {why}."
        why = _VMX_INSTRUCTION_ERRORS.get(code, f"VM-instruction error {code}")
        return f"{head}\nIntel VMX: VMLAUNCH/VMRESUME failed: {why} (SDM Vol. 3C 31.4)."
    if hardware == "SVM":
        if code == _SVM_EXIT_ERR:
            return (f"{head}\nAMD SVM: VMRUN returned SVM_EXIT_ERR (-1): the VMCB's guest state "
                    "failed a consistency check (AMD APM Vol. 2 15.5.1, e.g. EFER.LME with "
                    "CR0.PG but no CR4.PAE, or CS.L and CS.D both set).")
        return f"{head}\nAMD SVM: exit code {code:#x}."
    module = backend.module if backend is not None and backend.module else "unknown"
    return (f"{head}\nThe KVM backend here is {module}, not VMX or SVM: the meaning of this "
            "code is backend specific. Check the special registers (vlab.kvm.sregs_check."
            "check_sregs) for the inconsistent bit.")


def explain_internal_error(exit: InternalError, regs, sregs, code: bytes, backend=None) -> str:
    software = backend is not None and backend.kind == "tcg"
    words = (_TCG_SUBERRORS if software else _SUBERRORS).get(exit.suberror)
    lines = [f"INTERNAL_ERROR {exit.suberror_name}: "
             + (words or "the vCPU stopped for a reason it could not handle") + "."]
    if exit.data:
        lines.append("data: " + " ".join(f"{word:#x}" for word in exit.data))
    bits = code_bits(sregs)
    source = f"reported by {'the software CPU' if software else 'KVM'}" if exit.insn_bytes \
        else "read from guest memory"
    if code:
        lines.append(f"instruction at RIP ({bits}-bit code, bytes {source}): "
                     + disassemble(code, regs.rip, bits))
    if exit.suberror == InternalErrorSuberror.EMULATION and not code:
        lines.append("No instruction bytes can be read at RIP: code runs from RAM or ROM only, "
                     "and this address is outside them (an MMIO hole, or nothing at all).")
    elif software:
        lines += _software_detail(exit, sregs)
    elif exit.suberror == InternalErrorSuberror.EMULATION and backend is not None \
            and backend.emulates_kernel_mode:
        lines.append(f"On this backend ({backend.module}) every kernel-mode (CPL0) instruction "
                     "goes through KVM's emulator, which lacks some instructions (cmpxchg16b, "
                     "xrstor, int3, ...); the same code can run at CPL3.")
    return "\n".join(lines)


def _software_detail(exit: InternalError, sregs) -> list[str]:
    """What the software accelerator's INTERNAL_ERROR means (see vlab.accel.tcg)."""
    if exit.suberror == InternalErrorSuberror.EMULATION:
        return ["Unicorn stopped at this instruction without raising a guest exception (an "
                "undefined opcode raises #UD, vector 6, delivered to the guest as on a CPU)."]
    if exit.suberror != InternalErrorSuberror.DELIVERY_EV or not exit.data:
        return []
    vector = exit.data[0]
    if len(exit.data) == 1:
        return [f"Vector {vector} is covered by the IDT, but the software CPU does not "
                f"deliver exceptions through a protected- or long-mode IDT (gate descriptors, "
                f"privilege and stack switches are not emulated)."]
    address = exit.data[1]
    idt = sregs.idt
    where = ("its entry in the interrupt vector table (IDTR base + 4 * vector)"
             if idt.base <= address <= idt.base + idt.limit else
             "the stack, where FLAGS, CS and IP are pushed (SS.base + SP)")
    return [f"Delivering vector {vector} in real mode needs {where} at {address:#x}, which is "
            f"outside RAM (a hole, ROM or nothing): nothing was pushed. Recent KVM stops the "
            f"same way where the CPU's own delivery touches MMIO (kvm_prepare_event_vectoring_"
            f"exit); where KVM's emulator delivers it, the frame goes to the hole as MMIO "
            f"writes, or the delivery is retried without end and only a stop ends the run."]


def explain(exit: Exit, vcpu, read_code: Callable[[int, int], bytes] | None = None,
            backend=None) -> str | None:
    """Words for a fatal exit, or None for an exit that needs none."""
    cls = exit.__class__
    if cls is FailEntry:
        return explain_fail_entry(exit, backend)
    if cls is not Shutdown and cls is not InternalError:
        return None
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    if cls is Shutdown:
        return explain_shutdown(regs, sregs, backend)
    code = exit.insn_bytes
    if not code and read_code is not None:
        try:
            code = read_code(sregs.cs.base + regs.rip, MAX_INSN)
        except (ValueError, IndexError):
            code = b""
    return explain_internal_error(exit, regs, sregs, code, backend)
