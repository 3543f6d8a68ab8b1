"""Port-I/O exits per second on the tcg accelerator, against raw Unicorn with a minimal hook.

    python benchmarks/bench_tcg.py [--rounds N] [--exits N] [--check]

The yardstick is the least Python can do per `out` on Unicorn: one engine, one UC_HOOK_INSN
callback that counts, and a single `emu_start` that runs the whole guest. The target applies
to the Machine's VcpuRunner, which dispatches each `out` inside emulation (as QEMU's TCG
does) to the debug-console device and records it in the ExitLog with RIP, its time and the
vCPU's counters: in C where vlab was built with a compiler (_runloop.c's InlinePortIo,
called by the C hooks), else in `VcpuRunner._on_port_io`, shown as "runner.py" (the same
runner with the compiled handling left out). Shown beside them: the tcg vCPU with a handler
that only counts, given by `dispatch_port_io` (the engine's hooks and a Python call), and
`vcpu.run()` returning each exit as KVM_RUN does, which stops the engine in its hook and
starts it again for every `out`.
Contenders run in alternating rounds on the same guest; `--check` exits with status 1 when
the runner is below the target ratio.
"""
from __future__ import annotations

import sys
import time

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_16, Uc
from unicorn import x86_const as x86

from reference import (LOAD_ADDR, MEM_SIZE, Run, compare, exit_rate_arguments, interleave,
                       print_table)
from vlab.accel import select
from vlab.kvm import Hlt, IoOut
from vlab.machine.assembler import assemble
from vlab.machine.board import Machine

TARGET = 0.3

OUT_LOOP = """\
    mov ecx, {count}
.l: out 0xe9, al
    dec ecx
    jnz .l
    hlt
"""


def run_raw_unicorn(code: bytes) -> Run:
    """A 16-bit engine over 1 MiB, code at LOAD_ADDR, a counting OUT hook, one emu_start
    (Unicorn stops by itself at HLT)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_16)
    uc.mem_map(0, MEM_SIZE)
    uc.mem_write(LOAD_ADDR, code)
    count = [0]

    def on_out(uc, port, size, value, user_data):
        count[0] += 1

    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
    start = time.perf_counter()
    uc.emu_start(LOAD_ADDR, MEM_SIZE)
    seconds = time.perf_counter() - start
    if uc.mem_read(uc.reg_read(x86.UC_X86_REG_IP) - 1, 1) != b"\xf4":
        raise RuntimeError("raw Unicorn did not stop at the guest's HLT")
    return Run(count[0], seconds)


def build_machine(code: bytes) -> Machine:
    """A tcg board with 1 MiB of RAM and the standard devices, vCPU 0 in real mode at LOAD_ADDR."""
    accel = select("tcg")
    machine = Machine(accel, accel.create_vm(), ram_size=MEM_SIZE)
    machine.init_memory()
    machine.add_standard_devices()
    machine.memory.write(LOAD_ADDR, code)
    vcpu = machine.vm.create_vcpu(0)
    machine.setup_cpu(vcpu, "real", LOAD_ADDR)
    machine.add_vcpu(vcpu)
    return machine


def run_inline(code: bytes) -> Run:
    """The vCPU with port I/O handled in emulation by a handler that counts, as the raw hook."""
    machine = build_machine(code)
    try:
        vcpu, count = machine.runners[0].vcpu, [0]

        def on_port_io(exit) -> bool:
            count[0] += 1
            return False

        vcpu.dispatch_port_io(on_port_io)
        start = time.perf_counter()
        last = vcpu.run()
        seconds = time.perf_counter() - start
        if last.__class__ is not Hlt:
            raise RuntimeError(f"the inline tcg run ended on {last.describe()}, not HLT")
        return Run(count[0], seconds)
    finally:
        machine.close()


def run_vcpu(code: bytes) -> Run:
    """The KVM_RUN-style loop: `vcpu.run()` until HLT, one `IoOut` per call."""
    machine = build_machine(code)
    try:
        run, exits = machine.runners[0].vcpu.run, 0
        start = time.perf_counter()
        while (last := run()).__class__ is IoOut:
            exits += 1
        seconds = time.perf_counter() - start
        if last.__class__ is not Hlt:
            raise RuntimeError(f"the tcg loop ended on {last.describe()}, not HLT")
        return Run(exits, seconds)
    finally:
        machine.close()


def run_runner(code: bytes, compiled: bool = True) -> Run:
    """The Machine's VcpuRunner: every exit dispatched to the device and logged; with
    `compiled` False, by `_on_port_io` alone."""
    machine = build_machine(code)
    try:
        runner = machine.runners[0]
        if not compiled:
            runner._inline_port_io = lambda: None
        result = runner.run()
        if not isinstance(result.last_exit, Hlt):
            raise RuntimeError(f"the guest stopped on {result.stop_reason}, not HLT")
        return Run(machine.log.histogram()["IO out"], result.seconds)
    finally:
        machine.close()


def main() -> int:
    args = exit_rate_arguments(__doc__.splitlines()[0], TARGET)

    code = assemble(OUT_LOOP.format(count=args.exits), bits=16, org=LOAD_ADDR).code
    results = interleave({"unicorn": lambda: run_raw_unicorn(code),
                          "inline": lambda: run_inline(code),
                          "vcpu.run": lambda: run_vcpu(code),
                          "runner": lambda: run_runner(code),
                          "runner.py": lambda: run_runner(code, compiled=False)},
                         args.rounds, expected_exits=args.exits)
    print(f"{args.exits:,} port-I/O exits per run, {args.rounds} interleaved rounds (exits/s)")
    print_table(results, reference="unicorn")
    for name in ("inline", "vcpu.run", "runner", "runner.py"):
        c = compare(results, name, "unicorn")
        print(f"tcg {name} against raw Unicorn: "
              f"{c.summary(TARGET if name == 'runner' else None)}")
    runner = compare(results, "runner", "unicorn")
    return 1 if args.check and runner.ratio_of_medians < TARGET else 0

if __name__ == "__main__":
    sys.exit(main())
