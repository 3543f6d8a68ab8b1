"""Exercise 4: a read-only memory slot (KVM_MEM_READONLY), as QEMU maps the BIOS.

The student's `run_with_rom(accel, code, rom)` maps RAM holding `code` at CODE_GPA and
`rom` read-only at ROM_GPA, runs the guest to HLT and returns what it printed and the
MMIO writes it made. The guest reads the ROM (plain memory reads: no exit), writes one
byte into it (KVM cannot let it land, so the store exits to userspace as
KVM_EXIT_MMIO, which a ROM drops), and reads the byte back, unchanged.
"""
from __future__ import annotations

from ..kvm.exits import Hlt, MmioRead, MmioWrite
from ..machine.assembler import assemble
from .feedback import CheckFailed, NotWritten, call, passed
from .run_loop import CODE_GPA, PORT, start_problems, where_it_stopped
from .watch import WatchedAccel

EXERCISE = "read-only ROM slot"
ROM_GPA = 0xF0000
ROM = b"OK".ljust(0x10, b"\0") + b"!"
STORE_OFFSET, STORE_VALUE = 0x10, 0x55
GUEST = f"""\
bits 16
org {CODE_GPA:#x}
    mov ax, {ROM_GPA >> 4:#x}
    mov es, ax
    mov al, [es:0]             ; reads from the ROM are memory reads: no exit
    out {PORT:#x}, al
    mov al, [es:1]
    out {PORT:#x}, al
    mov byte [es:{STORE_OFFSET:#x}], {STORE_VALUE:#x}   ; a store into the ROM
    mov al, [es:{STORE_OFFSET:#x}]
    out {PORT:#x}, al          ; the ROM's byte, unchanged if the store was dropped
    hlt
"""
EXPECTED = ROM[:2] + ROM[STORE_OFFSET:STORE_OFFSET + 1]


def _state_problems(accel) -> list[str]:
    """What the VM the student's code made lacks: RAM, a read-only ROM, a vCPU, its start."""
    if not accel.vms or not accel.vms[-1].vcpus:
        return ["`run_with_rom` made no VM with a vCPU: accel.create_vm(), vm.create_vcpu(0)."]
    vm = accel.vms[-1]
    vcpu = vm.vcpus[-1]
    rom = vm.region_at(ROM_GPA)
    store = ROM_GPA + STORE_OFFSET
    problems = start_problems(vcpu)
    if vm.region_at(CODE_GPA) is None:
        problems.append(f"no RAM is mapped at {CODE_GPA:#x}, where the code goes.")
    if rom is None:
        reads = [e for e in vcpu.exits if e.__class__ is MmioRead and e.address >= ROM_GPA]
        problems.append(f"nothing is mapped at {ROM_GPA:#x}"
                        + (f": the guest's read of {reads[0].address:#x} exited as an MMIO "
                           f"read" if reads else "")
                        + ". Map the ROM as memory: add_rom in a GuestMemory, then "
                          "vm.map_memory (KVM_SET_USER_MEMORY_REGION, flag KVM_MEM_READONLY).")
    elif not rom.readonly:
        now = vm.read_physical(store, 1)[0]
        problems.append(f"the slot at {ROM_GPA:#x} is writable ({rom.kind}, no "
                        f"KVM_MEM_READONLY): the guest's store to {store:#x} "
                        + (f"landed (the byte is now {now:#x}) " if now == STORE_VALUE else "")
                        + "without an exit. Add it with add_rom, whose region maps read-only.")
    elif vm.read_physical(ROM_GPA, len(ROM)) != ROM:
        problems.append(f"the ROM at {ROM_GPA:#x} does not hold `rom`: pass it to add_rom.")
    return problems


def check_rom(run_with_rom) -> None:
    """Run the student's `run_with_rom(accel, code, rom)` and judge the ROM and its exits."""
    with WatchedAccel(EXERCISE) as accel:
        try:
            result = call(EXERCISE, run_with_rom, accel, assemble(GUEST).code, ROM)
        except NotWritten:
            raise
        except CheckFailed as failed:
            raise CheckFailed(EXERCISE, failed.problems + _state_problems(accel)) from None
        problems = _state_problems(accel)
        if problems:
            raise CheckFailed(EXERCISE, problems)
        vm = accel.vms[-1]
        vcpu = vm.vcpus[-1]
        store = ROM_GPA + STORE_OFFSET
        if not vcpu.exits or vcpu.exits[-1].__class__ is not Hlt:
            raise CheckFailed(EXERCISE, where_it_stopped(vm, vcpu))
        writes = [e for e in vcpu.exits if e.__class__ is MmioWrite]
        if not (isinstance(result, tuple) and len(result) == 2):
            raise CheckFailed(EXERCISE, [f"`run_with_rom` returned {result!r}: return "
                                         f"(printed bytes, list of MmioWrite exits)."])
        printed, returned = result
        if not isinstance(printed, (bytes, bytearray)) or bytes(printed) != EXPECTED:
            problems.append(f"you returned {printed!r} as printed; the guest wrote "
                            f"{EXPECTED!r} to port {PORT:#x}.")
        if not isinstance(returned, (list, tuple)) or list(returned) != writes:
            problems.append(f"you returned the MMIO writes {list(returned)!r}; the guest's were "
                            f"{writes!r}: keep each MmioWrite exit your loop sees.")
        if problems:
            raise CheckFailed(EXERCISE, problems)
        passed(EXERCISE, [
            f"on {accel.backend.label}: the guest read {EXPECTED[:2]!r} from the ROM without "
            f"an exit",
            f"its store of {STORE_VALUE:#x} to {store:#x} exited as "
            + ", ".join(e.describe() for e in writes)
            + f"; the ROM byte stayed {ROM[STORE_OFFSET:STORE_OFFSET + 1]!r}"])
