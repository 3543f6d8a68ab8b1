"""Userspace exits per second through the whole machine: Machine + VcpuRunner, with the
standard devices and the full exit trace, against the C reference loop.

    python benchmarks/bench_runloop.py [--rounds N] [--exits N] [--check]

The guest writes to the debug console (port 0xE9) in a loop, so every exit is decoded,
handled by the debug console, recorded in the ExitLog with its RIP and its KVM_RUN time, and
(unless switched off) with KVM's in-kernel counters read from the stats fd. The same guest
runs under exit_loop.c, in alternating rounds. "traced" is `run()` as installed: the compiled
loop (vlab/machine/_runloop.c) where setup.py built it; "Python loop" is the same run through
`VcpuRunner._run_python`, the loop a learner reads; "Lab first run" is `lab.run()` right
after a Lab's bring-up: the kvm_cpu_exec stage, which records the run's first ioctls and
counts the rest, the loop going on compiled once the record is full. A breakdown then says
where the Python
loop's per-exit time goes, part by part; "Python floor" bounds what any Python loop keeping
that trace could reach. `--check` exits with status 1 when the traced loop is below the target.
"""
from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from reference import (LOAD_ADDR, MEM_SIZE, Run, assemble, build_c_reference, compare,
                       exit_rate_arguments,
                       interleave, print_table, run_c_reference)
from vlab.accel import select
from vlab.lab import Lab
from vlab.kvm import Hlt, IoOut
from vlab.machine import runloop
from vlab.machine.board import Machine
from vlab.machine.exitlog import ExitLog, ExitRecord
from vlab.machine.dispatch import handle_exit
from vlab.machine.runloop import VcpuRunner

TARGET = 0.9

DEBUGCON_BODY = """\
    mov ecx, {count}
.l: out 0xe9, al
    dec ecx
    jnz .l
    hlt
"""
DEBUGCON_LOOP = "bits 16\norg {load:#x}\n" + DEBUGCON_BODY


def build_machine(guest: bytes, kernel_counters: bool = True,
                  keep: int | None = None) -> tuple[Machine, VcpuRunner]:
    """A fresh board as exit_loop.c builds its VM: 1 MiB of RAM at 0, real mode at LOAD_ADDR.
    `keep` bounds the records the ExitLog holds (its default otherwise)."""
    accel = select("kvm")
    machine = Machine(accel, accel.create_vm(), ram_size=MEM_SIZE)
    machine.init_memory()
    machine.add_standard_devices()
    if keep is not None:
        machine.log = ExitLog(keep=keep)
    vcpu = machine.vm.create_vcpu(0)
    runner = VcpuRunner(vcpu, machine.pio, machine.mmio, read_code=machine.read_physical,
                        log=machine.log, kernel_counters=kernel_counters, backend=machine.backend)
    machine.runners.append(runner)
    machine.memory.write(LOAD_ADDR, guest)
    machine.setup_cpu(vcpu, "real", LOAD_ADDR)
    return machine, runner


def run_machine(guest: bytes, kernel_counters: bool = True, loop: str | None = None) -> Run:
    """One round: only `runner.run()` is timed, as exit_loop.c times only its loop. `loop`
    "python" runs the Python loop even where the compiled one is built."""
    machine, runner = build_machine(guest, kernel_counters)
    installed = runloop._runloop
    if loop == "python":
        runloop._runloop = None
    try:
        result = runner.run()
        if not isinstance(result.last_exit, Hlt):
            raise RuntimeError(f"the guest stopped on {result.stop_reason}, not HLT")
        return Run(machine.log.histogram()["IO out"], result.seconds)
    finally:
        runloop._runloop = installed
        machine.close()
        machine.accel.close()


def run_lab_first(count: int) -> Run:
    """A Lab brought up with the same guest and RAM; only its first `run()` is timed (the
    kvm_cpu_exec stage, with the states its record shows before and after)."""
    with Lab(accel="kvm", memory=MEM_SIZE) as lab:
        lab.load_assembly(DEBUGCON_BODY.format(count=count), org=LOAD_ADDR)
        lab.bring_up()
        start = time.perf_counter()
        result = lab.run()
        seconds = time.perf_counter() - start
        if not isinstance(result.last_exit, Hlt):
            raise RuntimeError(f"the guest stopped on {result.stop_reason}, not HLT")
        return Run(lab.exits().histogram()["IO out"], seconds)


def run_bare(guest: bytes) -> Run:
    """`vcpu.run()` alone on the same board: the ioctl and the decoding, nothing else."""
    machine, runner = build_machine(guest, kernel_counters=False)
    try:
        run, exits = runner.vcpu.run, 0
        start = time.perf_counter()
        while run().__class__ is IoOut:
            exits += 1
        return Run(exits, time.perf_counter() - start)
    finally:
        machine.close()
        machine.accel.close()


def run_floor(guest: bytes) -> Run:
    """The least a Python loop can do and still keep the trace the issue asks for: per exit,
    `vcpu.run()`, one call of a one-line device, and one tuple of (exit, RIP, KVM_RUN time,
    kernel counters) appended to a list; no bus, no records, no stop conditions, the garbage
    collector off. Whatever vlab's loop does, it cannot beat this one."""
    machine, runner = build_machine(guest)
    written = bytearray()

    class Device:
        def write(self, offset: int, value: int, size: int) -> None:
            written.append(value & 0xFF)

    devices, trace = {0xE9: Device()}, []
    run, vcpu, counters, clock = runner.vcpu.run, runner.vcpu, runner._counters, time.perf_counter
    gc.disable()
    try:
        start = time.perf_counter()
        while True:
            entered = clock()
            exit = run()
            took = clock() - entered
            if exit.__class__ is not IoOut:
                break
            devices[exit.port].write(0, exit.data[0], exit.size)
            trace.append((exit, vcpu.synced_rip, took, counters()))
        return Run(len(trace), time.perf_counter() - start)
    finally:
        gc.enable()
        machine.close()
        machine.accel.close()


def ns_per_call(fn, n: int = 100_000) -> float:
    """Median over 5 batches of `n` calls, in nanoseconds per call; the garbage collector is
    off meanwhile, its share being measured on its own."""
    batches = []
    gc.disable()
    try:
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            batches.append((time.perf_counter_ns() - start) / n)
    finally:
        gc.enable()
    return statistics.median(batches)


def breakdown(guest: bytes, results: dict[str, list[Run]]) -> None:
    """What one exit of the Python loop costs, part by part, measured outside KVM_RUN where
    possible."""
    machine, runner = build_machine(guest, kernel_counters=True)
    try:
        exit = IoOut(0xE9, 1, 1, b"\0")
        pio, mmio, log, vcpu = machine.pio, machine.mmio, machine.log, runner.vcpu
        counters = runner._counters
        before = counters()
        clock = time.perf_counter
        parts = {
            "2 x time.perf_counter": ns_per_call(lambda: (clock(), clock())),
            "handle_exit -> bus -> debugcon -> console": ns_per_call(
                lambda: handle_exit(exit, pio, mmio)),
            "synced_rip (kvm_run.s.regs.rip)": ns_per_call(lambda: vcpu.synced_rip),
            "ExitRecord + ExitLog.append": ns_per_call(lambda: log.append(
                ExitRecord(0, exit, 0x1003, "debugcon", True, 1e-6, before, before))),
            "stats fd: pread + unpack of the chosen counters": ns_per_call(counters),
        }
    finally:
        machine.close()
        machine.accel.close()

    def per_exit(name: str) -> float:
        return 1e9 / statistics.median(run.rate for run in results[name])

    bare, full = per_exit("bare run()"), per_exit("Python loop")
    print("\nwhere an exit of the Python loop goes (ns per exit; medians):")
    print(f"  {'C reference loop (whole exit)':<52} {per_exit('C'):8.0f}")
    print(f"  {'vcpu.run(): KVM_RUN + decode, bare loop':<52} {bare:8.0f}")
    for name, ns in parts.items():
        print(f"  {'+ ' + name:<52} {ns:8.0f}")
    accounted = bare + sum(parts.values())
    print(f"  {'= sum of the parts':<52} {accounted:8.0f}")
    print(f"  {'Python loop measured':<52} {full:8.0f}  "
          f"(loop control and the rest: {full - accounted:.0f})")
    print(f"  {'traced run() measured (the loop installed)':<52} {per_exit('traced'):8.0f}  "
          f"(without the stats fd: {per_exit('no counters'):.0f})")


def main() -> int:
    args = exit_rate_arguments(__doc__.splitlines()[0], TARGET)

    with tempfile.TemporaryDirectory() as tmp:
        guest = assemble(DEBUGCON_LOOP.format(load=LOAD_ADDR, count=args.exits), Path(tmp))
        c_binary = build_c_reference()
        code = guest.read_bytes()
        results = interleave({"C": partial(run_c_reference, c_binary, guest),
                              "traced": partial(run_machine, code),
                              "Python loop": partial(run_machine, code, loop="python"),
                              "Lab first run": partial(run_lab_first, args.exits),
                              "no counters": partial(run_machine, code, False),
                              "bare run()": partial(run_bare, code),
                              "Python floor": partial(run_floor, code)},
                             args.rounds, expected_exits=args.exits)
    print(f"{args.exits:,} debug-console exits per run, {args.rounds} interleaved rounds (exits/s)")
    loop = "compiled" if runloop._runloop is not None else "Python: _runloop is not built"
    print(f"traced: Machine + VcpuRunner ({loop} loop), devices, ExitLog records and KVM's "
          "counters per exit; Python loop: the same through VcpuRunner._run_python; no "
          "counters: traced without the stats fd; Lab first run: lab.run() after bring_up(), "
          "the kvm_cpu_exec stage recording its ioctls; bare run(): vcpu.run() alone; Python "
          "floor: the least a Python loop can do with the same trace (see run_floor)")
    print_table(results, reference="C")
    breakdown(code, results)
    c = compare(results, "traced", "C")
    ratios = ", ".join(f"{name}: {compare(results, name, 'C').ratio_of_medians:.2f}"
                       for name in results if name not in ("C", "traced"))
    print(f"\ntraced run loop: {c.median_rate:,.0f} exits/s, C reference: "
          f"{c.reference_median_rate:,.0f} exits/s, ratio {c.ratio_of_medians:.2f} "
          f"(median of per-round ratios {c.median_of_ratios:.2f}; target >= {TARGET}); "
          f"other ratios: {ratios}")
    return 1 if args.check and c.ratio_of_medians < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
