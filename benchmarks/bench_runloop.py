"""Userspace exits per second through the whole machine: Machine + VcpuRunner, with the
standard devices and the full exit trace, against the C reference loop.

    python benchmarks/bench_runloop.py [--rounds N] [--exits N] [--check]

The guest writes to the debug console (port 0xE9) in a loop, so every exit is decoded,
dispatched through the port bus to a device, recorded in the ExitLog with its RIP and its
KVM_RUN time, and (unless switched off) paired with KVM's in-kernel counters read from the
stats fd. The same guest runs under exit_loop.c, in alternating rounds. A breakdown then
says where the per-exit time goes, component by component, so the cost of each part of the
trace is visible. "Python floor" bounds what any Python loop keeping that trace could reach.
`--check` exits with status 1 when the traced loop is below the target.
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
from vlab.kvm import Hlt, IoOut
from vlab.machine.board import Machine
from vlab.machine.exitlog import ExitLog, ExitRecord
from vlab.machine.dispatch import handle_exit
from vlab.machine.runloop import VcpuRunner

TARGET = 0.9
SMALL_KEEP = 10_000

DEBUGCON_LOOP = """\
bits 16
org {load:#x}
    mov ecx, {count}
.l: out 0xe9, al
    dec ecx
    jnz .l
    hlt
"""


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


def run_machine(guest: bytes, kernel_counters: bool = True, keep: int | None = None,
                gc_time: list[float] | None = None) -> Run:
    """One round: only `runner.run()` is timed, as exit_loop.c times only its loop. With
    `gc_time`, the time the garbage collector takes during the run is appended to it."""
    machine, runner = build_machine(guest, kernel_counters, keep)
    collecting = [0.0, 0.0]  # start of the current collection, total

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collecting[0] = time.perf_counter()
        else:
            collecting[1] += time.perf_counter() - collecting[0]

    if gc_time is not None:
        gc.callbacks.append(on_gc)
    try:
        result = runner.run()
        if not isinstance(result.last_exit, Hlt):
            raise RuntimeError(f"the guest stopped on {result.stop_reason}, not HLT")
        return Run(machine.log.histogram()["IO out"], result.seconds)
    finally:
        if gc_time is not None:
            gc.callbacks.remove(on_gc)
            gc_time.append(collecting[1])
        machine.close()
        machine.accel.close()


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
    """What one traced exit costs, part by part, measured outside KVM_RUN where possible."""
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

    gc_default, gc_small = [], []
    for _ in range(3):
        run_machine(guest, gc_time=gc_default)
        run_machine(guest, keep=SMALL_KEEP, gc_time=gc_small)
    exits = results["traced"][0].exits
    parts[f"garbage collection (ExitLog keeps {ExitLog().keep:,})"] = \
        statistics.median(gc_default) * 1e9 / exits

    def per_exit(name: str) -> float:
        return 1e9 / statistics.median(run.rate for run in results[name])

    bare, full = per_exit("bare run()"), per_exit("traced")
    print("\nwhere a traced exit's time goes (ns per exit; medians):")
    print(f"  {'C reference loop (whole exit)':<52} {per_exit('C'):8.0f}")
    print(f"  {'vcpu.run(): KVM_RUN + decode, bare loop':<52} {bare:8.0f}")
    for name, ns in parts.items():
        print(f"  {'+ ' + name:<52} {ns:8.0f}")
    accounted = bare + sum(parts.values())
    print(f"  {'= sum of the parts':<52} {accounted:8.0f}")
    print(f"  {'traced run() measured':<52} {full:8.0f}  "
          f"(loop control and the rest: {full - accounted:.0f})")
    print(f"  {'run() with kernel_counters=False measured':<52} {per_exit('no counters'):8.0f}  "
          f"(the stats fd costs {full - per_exit('no counters'):.0f})")
    print(f"  {f'run() with ExitLog(keep={SMALL_KEEP:,}) measured':<52} "
          f"{per_exit(f'keep {SMALL_KEEP:,}'):8.0f}  (garbage collection "
          f"{statistics.median(gc_small) * 1e9 / exits:.0f})")


def main() -> int:
    args = exit_rate_arguments(__doc__.splitlines()[0], TARGET)

    with tempfile.TemporaryDirectory() as tmp:
        guest = assemble(DEBUGCON_LOOP.format(load=LOAD_ADDR, count=args.exits), Path(tmp))
        c_binary = build_c_reference()
        code = guest.read_bytes()
        results = interleave({"C": partial(run_c_reference, c_binary, guest),
                              "traced": partial(run_machine, code),
                              "no counters": partial(run_machine, code, False),
                              f"keep {SMALL_KEEP:,}": partial(run_machine, code, keep=SMALL_KEEP),
                              "bare run()": partial(run_bare, code),
                              "Python floor": partial(run_floor, code)},
                             args.rounds, expected_exits=args.exits)
    print(f"{args.exits:,} debug-console exits per run, {args.rounds} interleaved rounds (exits/s)")
    print("traced: Machine + VcpuRunner, devices, ExitLog records and KVM's counters per exit;"
          f" no counters: the same without the stats fd; keep {SMALL_KEEP:,}: the same with an "
          f"ExitLog keeping {SMALL_KEEP:,} records; bare run(): vcpu.run() alone; Python floor: "
          "the least a Python loop can do with the same trace (see run_floor)")
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
