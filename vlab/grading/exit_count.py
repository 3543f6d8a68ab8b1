"""Exercise 6: which exits reach userspace, predicted and then counted (kvm_cpu_exec's switch).

Most of what a guest does never leaves the kernel: memory in a slot is mapped by the
hardware's second-level page tables, CPUID is answered by KVM itself. Only what KVM cannot
finish comes back from KVM_RUN: port I/O and MMIO to devices that live in userspace, and
HLT when there is no in-kernel irqchip to wait in. The student predicts the exits of GUEST
by kind (`predict_exits`), then writes the loop that counts them (`count_exits`); the
check runs both against KVM (tcg without it) and explains each instruction where the
prediction was wrong.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..machine.assembler import assemble
from .feedback import CheckFailed, call, passed
from .guest import GuestVm, describe_end

EXERCISE = "exits that reach userspace"
RAM_SIZE = 0x10000           # 64 KiB: 0x20000 has no memory slot
GUEST = """\
bits 16
org 0x8000
    mov cx, 3
again:
    mov al, '*'
    out 0xe9, al               ; (1) the debug console, a device of the VMM
    loop again
    xor eax, eax
    cpuid                      ; (2)
    mov [0x600], eax           ; (3) RAM, in a memory slot
    in al, 0x60                ; (4) the keyboard controller, a device of the VMM
    mov bx, 0x2000
    mov es, bx
    mov byte [es:0], 1         ; (5) 0x20000: no memory slot
    mov al, [es:0]             ; (6)
    hlt                        ; (7) no in-kernel irqchip to wait in
"""
# Why each marked instruction does or does not reach userspace, by the exit it gives.
WHY = {
    "IO": ["(1) out 0xe9 x3: no device in KVM claims the port, so each OUT exits with "
           "KVM_EXIT_IO for the VMM's debug console", "(4) in al, 0x60: the same for an IN; "
           "the VMM answers it before the next KVM_RUN"],
    "MMIO": ["(5) the store to 0x20000 and (6) the load from it: no memory slot backs that "
             "address, so the access faults in the second-level page tables and KVM hands it "
             "to userspace as KVM_EXIT_MMIO (one each)"],
    "HLT": ["(7) hlt: without an in-kernel irqchip KVM cannot wait for an interrupt itself, "
            "so it returns KVM_EXIT_HLT"],
    None: ["(2) cpuid: KVM answers it inside the kernel from the vCPU's table "
           "(kvm_emulate_cpuid): no exit reaches userspace", "(3) the store to 0x600: RAM in "
           "a memory slot, mapped to host memory: the hardware (or KVM's emulator) writes it "
           "with no exit at all"],
}


def _clean(counts, name: str) -> dict[str, int]:
    if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
        raise CheckFailed(EXERCISE, [f"`{name}` returned {counts!r}: return a dict from exit "
                                     f"name (exit.name: 'IO', 'MMIO', 'HLT') to a count."])
    return {str(k).upper().removeprefix("KVM_EXIT_"): v for k, v in counts.items() if v}


@dataclass
class Run:
    """What GUEST did on this machine: its userspace exits by name, the accelerator, and
    (on KVM) the vCPU's own counters over the run."""
    exits: dict[str, int]
    accel: object
    counters: dict[str, int]

    def kernel_side(self) -> str:
        """What KVM's counters say happened without reaching userspace."""
        backend, total = self.accel.backend, self.counters.get("exits")
        if total is None:
            return "no kernel here: the software CPU answered CPUID and wrote RAM itself"
        if backend.emulates_kernel_mode:
            return (f"KVM's counters: {total} exits, the userspace ones; on {backend.label} the "
                    f"guest's CPL0 code runs in KVM's emulator ({self.counters['insn_emulation']} "
                    f"instructions, CPUID among them), so CPUID needs no exit of its own")
        userspace = sum(self.exits.values())
        return (f"KVM's counter `exits` counted {total}: {total - userspace} more ended inside "
                f"the kernel (the CPUID's among them) and never reached the VMM")


def _actual(code: bytes) -> Run:
    """Run GUEST to its HLT."""
    with GuestVm(ram_size=RAM_SIZE) as guest:
        guest.start_real_mode(code)
        stats = guest.vcpu.get_stats_fd() if guest.accel.capabilities.kernel else None
        before = stats.read() if stats else {}
        outcome = guest.run()
        after = stats.read() if stats else {}
    if not outcome.halted:
        raise CheckFailed(EXERCISE, [f"the exercise's guest did not halt: {describe_end(outcome)}"])
    counters = {k: after[k] - before[k] for k in ("exits", "insn_emulation") if k in after}
    return Run(dict(Counter(e.name for e in outcome.exits)), guest.accel, counters)


def check_count_exits(count_exits) -> None:
    """The student's loop counts what the guest's exits really are."""
    code = assemble(GUEST).code
    run = _actual(code)
    actual = run.exits
    with GuestVm(ram_size=RAM_SIZE) as guest:
        guest.start_real_mode(code)
        counted = _clean(call(EXERCISE, count_exits, guest.vcpu), "count_exits")
    if counted != actual:
        raise CheckFailed(EXERCISE, [
            f"count_exits counted {counted}, but the guest's exits were {actual}: call run() "
            f"until Hlt, count every exit by exit.name, HLT included, and answer each IoIn "
            f"(complete_io_in) and MmioRead (complete_mmio_read) before the next run()."])
    passed(EXERCISE, [f"on {run.accel.backend.label}: counted {actual}"])


def check_prediction(predict_exits) -> None:
    """The student's prediction against the exits the guest makes; why, where it differs."""
    prediction = _clean(call(EXERCISE, predict_exits), "predict_exits")
    run = _actual(assemble(GUEST).code)
    actual, accel = run.exits, run.accel
    wrong = sorted(k for k in set(actual) | set(prediction) if actual.get(k) != prediction.get(k))
    if wrong:
        problems = [f"you predicted {prediction}; on {accel.backend.label} the guest made "
                    f"{actual}. Where the prediction went wrong:"]
        for kind in wrong:
            for line in WHY.get(kind, [f"nothing in the guest gives a {kind} exit"]):
                problems.append(f"  {kind}: {line}")
        problems.append("  and no exit at all: " + "; ".join(WHY[None]))
        problems.append(f"  ({run.kernel_side()})")
        raise CheckFailed(EXERCISE, problems)
    passed(EXERCISE, [f"on {accel.backend.label}: predicted {actual}, as it ran",
                      run.kernel_side()])
