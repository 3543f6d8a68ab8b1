"""Exercise 1: a minimal VMM, from an empty accelerator to a guest that halts (kvm_cpu_exec).

The student's `run_guest(accel, code)` makes a VM, maps RAM holding `code` at CODE_GPA,
makes a vCPU, starts it there in real mode, and runs it until HLT, returning what the guest
wrote to the debug console port. The guest writes one byte with OUT, two with `out dx, ax`
(two bytes in one exit) and the rest with `rep outsb`, which KVM may hand over in one exit
(VMX, SVM: `count` > 1) or one per byte (kvm_pvm and tcg emulate it), so only a loop that
takes `exit.data`, all of it, works everywhere.
"""
from __future__ import annotations

from ..kvm.exits import FailEntry, Hlt, InternalError, IoOut, Shutdown
from ..machine.assembler import assemble
from ..machine.explain import explain
from .feedback import CheckFailed, NotWritten, call, passed
from .watch import WatchedAccel

EXERCISE = "KVM_RUN loop"
CODE_GPA = 0x1000
PORT = 0xE9
MESSAGE = b"Hello from KVM_RUN\n"
GUEST = f"""\
bits 16
org {CODE_GPA:#x}
    mov al, '{MESSAGE[:1].decode()}'
    out {PORT:#x}, al            ; one byte: one exit, IoOut(count=1)
    mov dx, {PORT:#x}
    mov ax, '{MESSAGE[1:3].decode()}'
    out dx, ax                   ; two bytes at once: IoOut(size=2)
    mov si, rest
    mov cx, rest_len
    rep outsb                    ; a string: IoOut with count = the bytes KVM batched
    hlt
rest: db "{MESSAGE[3:-1].decode()}", 10
rest_len equ $ - rest
"""


def guest_code() -> bytes:
    return assemble(GUEST).code


def start_problems(vcpu) -> list[str]:
    """Where the vCPU was set to start, if not at the code: real mode fetches at CS.base + RIP."""
    if vcpu.regs_set is None:
        return [f"RIP was never set: set_regs with rip={CODE_GPA:#x} (KVM_SET_REGS)."]
    base = (vcpu.sregs_set or vcpu.reset_sregs).cs.base
    rip = vcpu.regs_set.rip
    if base + rip == CODE_GPA:
        return []
    reset = " (the reset vector's segment: a fresh vCPU's CS)" if vcpu.sregs_set is None else ""
    return [f"the vCPU starts at CS.base {base:#x}{reset} + RIP {rip:#x} = {base + rip:#x}, "
            f"not at {CODE_GPA:#x} where the code is: in real mode the CPU fetches from "
            f"CS.base + RIP, so set CS.base = 0 and CS.selector = 0 (get_sregs, then "
            f"set_sregs) and RIP = {CODE_GPA:#x}."]


def where_it_stopped(vm, vcpu) -> list[str]:
    """Why the guest did not reach its HLT, from the last exit the student's loop saw."""
    exits = vcpu.exits
    if not exits:
        return ["your function never called vcpu.run(): nothing ran (KVM_RUN is the guest "
                "running)."]
    last = exits[-1]
    if last.__class__ in (Shutdown, InternalError, FailEntry):
        words = explain(last, vcpu, vm.read_physical, vm.backend)
        return [f"KVM_RUN returned KVM_EXIT_{last.name}:"] + words.splitlines()
    return [f"your loop returned after {len(exits)} exits, the last {last.describe()}: the "
            f"guest had not halted yet; call run() again after each exit you handled, until "
            f"it returns Hlt."]


def _state_problems(accel, code: bytes) -> list[str]:
    """What the VM the student's code made lacks: memory with the code, a vCPU, its start."""
    if not accel.vms:
        return ["`run_guest` made no VM: start with `vm = accel.create_vm()` (KVM_CREATE_VM)."]
    vm = accel.vms[-1]
    problems = []
    region = vm.region_at(CODE_GPA)
    if region is None:
        problems.append(f"no memory is mapped at {CODE_GPA:#x}: add RAM there to a "
                        f"GuestMemory and give it to vm.map_memory(region) "
                        f"(KVM_SET_USER_MEMORY_REGION).")
    elif vm.read_physical(CODE_GPA, len(code)) != code:
        problems.append(f"the RAM at {CODE_GPA:#x} does not hold the guest's code: write "
                        f"`code` there (memory.write({CODE_GPA:#x}, code)) before running.")
    if not vm.vcpus:
        problems.append("no vCPU was made: vm.create_vcpu(0) (KVM_CREATE_VCPU).")
    return problems or start_problems(vm.vcpus[-1])


def check_run_loop(run_guest) -> None:
    """Run the student's `run_guest(accel, code)` on KVM (tcg without it) and judge it."""
    code = guest_code()
    with WatchedAccel(EXERCISE) as accel:
        try:
            output = call(EXERCISE, run_guest, accel, code)
        except NotWritten:
            raise
        except CheckFailed as failed:
            raise CheckFailed(EXERCISE, failed.problems + _state_problems(accel, code)) from None
        problems = _state_problems(accel, code)
        if problems:
            raise CheckFailed(EXERCISE, problems)
        vm = accel.vms[-1]
        vcpu = vm.vcpus[-1]
        halted = bool(vcpu.exits) and vcpu.exits[-1].__class__ is Hlt
        if not halted:
            raise CheckFailed(EXERCISE, where_it_stopped(vm, vcpu))
        outs = [e for e in vcpu.exits if e.__class__ is IoOut and e.port == PORT]
        seen = b"".join(e.data for e in outs)
        if not isinstance(output, (bytes, bytearray)) or bytes(output) != MESSAGE:
            detail = (f"`run_guest` returned {output!r}; the guest wrote {seen!r} to port "
                      f"{PORT:#x} in {len(outs)} exits")
            if not isinstance(output, (bytes, bytearray)):
                detail += ": return those bytes (collect each IoOut's data)."
            else:
                sizes = ", ".join(sorted({f"size {e.size} x count {e.count}" for e in outs
                                          if e.size * e.count > 1}))
                detail += (f"; some exits carry several bytes ({sizes}): append exit.data, "
                           f"all size * count bytes of it, not one value.")
            raise CheckFailed(EXERCISE, [detail])
        passed(EXERCISE, [
            f"on {accel.backend.label}: the guest ran from {CODE_GPA:#x} to its HLT in "
            f"{len(vcpu.exits)} exits",
            f"port {PORT:#x} got {seen!r} in {len(outs)} IoOut exits "
            f"(counts {sorted({e.count for e in outs})})"])
