"""Exercise 2: protected mode, then long mode, set up by the VMM (kvm_arch_put_registers).

The student writes `protected_mode(sregs, memory)` and `long_mode(sregs, memory)`: each
writes a GDT (and, for long mode, identity-mapped page tables) into guest memory and
returns the special registers that use them. The check loads them with KVM_SET_SREGS and
runs a 32-bit and a 64-bit guest; when one does not get to its HLT, the feedback says what
KVM returned and which bit of the student's state caused it, from the same checks KVM
makes (`vlab.kvm.sregs_check`), the GDT read back from guest memory, and a walk of the
page tables.
"""
from __future__ import annotations

import inspect
import struct

from ..kvm.errors import KvmError
from ..kvm.sregs_check import SregsError, check_sregs, set_sregs_problems
from ..kvm.state import Regs, Sregs
from ..machine.assembler import assemble
from ..machine.cpu_modes import decode_descriptor
from ..machine.explain import explain
from ..x86 import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, code_bits
from .feedback import CheckFailed, call, passed
from .guest import CODE_GPA, STACK_TOP, GuestVm, describe_end

EXERCISE = "protected mode, then long mode"
RESULT_GPA = 0x400
PORT = 0xE9
# What each mode's guest stores at RESULT_GPA and prints, and the code that does it.
GUESTS = {
    32: (0x12345678, b"32", f"""\
bits 32
org {CODE_GPA:#x}
    mov eax, 0x12345678
    push eax                  ; the stack: SS
    pop ebx
    mov [{RESULT_GPA:#x}], ebx      ; data: DS
    mov dx, {PORT:#x}
    mov al, '3'
    out dx, al
    mov al, '2'
    out dx, al
    hlt
"""),
    64: (0x1122334455667788, b"64", f"""\
bits 64
org {CODE_GPA:#x}
    mov rax, 0x1122334455667788   ; a 64-bit immediate: only 64-bit code decodes it so
    push rax
    pop rbx
    mov [{RESULT_GPA:#x}], rbx
    mov dx, {PORT:#x}
    mov al, '6'
    out dx, al
    mov al, '4'
    out dx, al
    hlt
"""),
}
# vlab's own answers: using them would skip the exercise.
_SHORTCUTS = ("setup_mode", "build_gdt", "gdt_segments", "setup_cpu")
_FIELDS = ("base", "limit", "type", "s", "dpl", "present", "db", "l", "g")


def gdt_problems(sregs: Sregs, read) -> list[str]:
    """Where the segment caches loaded with KVM_SET_SREGS disagree with the GDT they name:
    the CPU reloads from the GDT at the next far jump, IRET or interrupt."""
    out = []
    for name in ("cs", "ds", "ss"):
        seg = getattr(sregs, name)
        index = seg.selector & ~7
        if seg.selector & 4:
            out.append(f"{name.upper()}.selector {seg.selector:#x} has TI=1 (the LDT): use a "
                       f"GDT selector (bit 2 clear).")
            continue
        if index == 0 or index + 7 > sregs.gdt.limit:
            out.append(f"{name.upper()}.selector {seg.selector:#x} is "
                       + ("the null selector" if index == 0 else
                          f"past your GDT's limit {sregs.gdt.limit:#x}")
                       + ": give it the index of its descriptor (8, 16, ...).")
            continue
        try:
            raw = read(sregs.gdt.base + index, 8)
        except ValueError:
            out.append(f"the GDT at {sregs.gdt.base:#x} is outside guest RAM.")
            return out
        entry = decode_descriptor(raw, seg.selector)
        if entry.l and entry.db:
            out.append(f"your GDT's descriptor {index:#x} has L=1 and D=1, a combination "
                       f"reserved in long mode: 64-bit code has L=1, D=0.")
        differ = [f"{f}={getattr(entry, f):#x} (loaded {getattr(seg, f):#x})"
                  for f in _FIELDS if f != "type" and getattr(entry, f) != getattr(seg, f)]
        if (entry.type | 1) != (seg.type | 1):   # the accessed bit the CPU sets itself
            differ.append(f"type={entry.type} (loaded {seg.type})")
        if differ:
            out.append(f"{name.upper()} ({seg.selector:#x}) differs from your GDT's "
                       f"descriptor at {sregs.gdt.base + index:#x}: " + ", ".join(differ)
                       + "; the CPU reloads it from the GDT at the next far jump or IRET.")
    return out


def page_walk(cr3: int, address: int, read) -> str | None:
    """Why 4-level paging does not map `address` to itself ("not mapped: ..." or "mapped to
    ..."), or None if it does."""
    table = cr3 & ~0xFFF
    for level, shift in (("PML4", 39), ("PDPT", 30), ("page directory", 21), ("page table", 12)):
        index = address >> shift & 0x1FF
        slot = table + index * 8
        try:
            entry = struct.unpack("<Q", read(slot, 8))[0]
        except ValueError:
            return f"not mapped: the {level} at {table:#x} is outside guest RAM."
        if not entry & 1:
            return f"not mapped: {level} entry {index} at {slot:#x} is {entry:#x} (P=0)."
        frame = entry & 0x000F_FFFF_FFFF_F000
        if shift in (30, 21) and entry & 0x80 or shift == 12:   # a 1 GiB, 2 MiB or 4 KiB page
            mapped = (frame & ~((1 << shift) - 1)) | address & ((1 << shift) - 1)
            if mapped != address:
                return (f"mapped to {mapped:#x}, not to itself: {level} entry {index} at "
                        f"{slot:#x} is {entry:#x}.")
            return None
        table = frame
    return None


def paging_problems(cr3: int, addresses, read) -> list[str]:
    """`page_walk` for each address, the addresses that fail alike in one sentence."""
    failing: dict[str, list[int]] = {}
    for address in addresses:
        why = page_walk(cr3, address, read)
        if why:
            failing.setdefault(why, []).append(address)
    return [", ".join(f"{a:#x}" for a in where) + f" {'is' if len(where) == 1 else 'are'} {why}"
            for why, where in failing.items()]


def _mode_problems(bits: int, sregs: Sregs, backend) -> list[str]:
    """What keeps `sregs` from being the mode the guest is written for."""
    out = []
    if not sregs.cr0 & CR0_PE:
        out.append("CR0.PE is clear: the CPU is still in real mode; set CR0.PE.")
    if bits == 32 and sregs.cr0 & CR0_PG and not backend.runs_32bit_paging:
        out.append(f"CR0.PG is set: this exercise's protected mode has paging off, and this "
                   f"KVM backend ({backend.label}) cannot run 32-bit paging at all.")
    if bits == 64:
        for bit, name, why in ((sregs.efer & EFER_LME, "EFER.LME", "long mode enable"),
                               (sregs.efer & EFER_LMA, "EFER.LMA", "long mode active"),
                               (sregs.cr0 & CR0_PG, "CR0.PG", "long mode runs paged"),
                               (sregs.cr4 & CR4_PAE, "CR4.PAE", "4-level tables are PAE's")):
            if not bit:
                out.append(f"{name} is clear ({why}): set it.")
    actual = code_bits(sregs)
    if actual != bits and not out:
        out.append(f"CS makes this {actual}-bit code (CS.l={sregs.cs.l}, CS.db={sregs.cs.db}): "
                   + ("64-bit code needs CS.l=1, CS.db=0." if bits == 64 else
                      "32-bit code needs CS.db=1, CS.l=0."))
    return out


def _run(bits: int, function) -> list[str]:
    """Set up `function`'s mode, run the mode's guest; the problems found, or facts."""
    value, printed, source = GUESTS[bits]
    with GuestVm() as guest:
        sregs = call(EXERCISE, function, guest.vcpu.get_sregs(), guest.memory)
        name = function.__name__
        if not isinstance(sregs, Sregs):
            raise CheckFailed(EXERCISE, [f"`{name}` returned {type(sregs).__name__}, not the "
                                         f"Sregs to load (sregs.replace(...))."])
        problems = (_mode_problems(bits, sregs, guest.backend)
                    + gdt_problems(sregs, guest.read_physical))
        if bits == 64:
            problems += paging_problems(sregs.cr3, (CODE_GPA, STACK_TOP - 8, RESULT_GPA),
                                        guest.read_physical)
        try:
            guest.vcpu.set_sregs(sregs)
        except (KvmError, SregsError):
            refused = set_sregs_problems(sregs) or ["(no reason vlab knows of)"]
            raise CheckFailed(EXERCISE, [f"{name}: KVM_SET_SREGS refused your special "
                                         f"registers (EINVAL):"] + refused + problems) from None
        guest.memory.write(CODE_GPA, assemble(source).code)
        guest.vcpu.set_regs(Regs(rip=CODE_GPA, rsp=STACK_TOP, rflags=0x2))
        outcome = guest.run()
        stored = int.from_bytes(guest.memory.read(RESULT_GPA, bits // 8), "little")
        ran = outcome.halted and outcome.output.get(PORT) == printed and stored == value
        if ran and not problems:
            return [f"{name}: the {bits}-bit guest ran to HLT, stored {value:#x} and printed "
                    f"{printed.decode()!r}"]
        head = f"{name}: the {bits}-bit guest ended with {describe_end(outcome)}"
        if ran:
            head = f"{name}: the {bits}-bit guest ran, but the state has a flaw the CPU meets later"
        elif outcome.halted:
            head += (f" but printed {outcome.output.get(PORT, b'')!r} and stored {stored:#x} "
                     f"(expected {printed!r}, {value:#x})")
        lines = [head] + problems + [p for p in check_sregs(sregs) if p not in problems]
        words = explain(outcome.last, guest.vcpu, guest.read_physical, guest.backend) \
            if outcome.last is not None else None
        if words:
            lines += words.splitlines()
        raise CheckFailed(EXERCISE, lines)


def _no_shortcut(function) -> None:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        source = ""
    used = [name for name in _SHORTCUTS if name in source]
    if used:
        raise CheckFailed(EXERCISE, [f"`{function.__name__}` calls {', '.join(used)}: that is "
                                     f"vlab's own answer; write the descriptors and tables "
                                     f"yourself (encode_descriptor is allowed)."])


def check_protected_mode(protected_mode) -> None:
    """Run a 32-bit guest on the student's protected mode, on KVM (tcg without it)."""
    _no_shortcut(protected_mode)
    passed(EXERCISE, _run(32, protected_mode))


def check_long_mode(long_mode) -> None:
    """Run a 64-bit guest on the student's long mode, on KVM (tcg without it)."""
    _no_shortcut(long_mode)
    passed(EXERCISE, _run(64, long_mode))
