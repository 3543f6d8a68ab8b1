"""Userspace exits per second: vlab.kvm's own KVM_RUN loop against the same loop in C.

    python benchmarks/bench_exits.py [--rounds N] [--exits N] [--check]

Every `out` of the guest is one trip kernel -> Python -> kernel, so this measures what vlab
adds per exit (the ioctl wrapper, decoding kvm_run into an Exit) over the C floor. The
target applies to `VcpuFd.run()` as installed: with the compiled exit path (vlab/kvm/
_exitpath.c) where it was built. The same loop with exits decoded in Python (`exits.decode`,
the path without a compiler) is shown beside it. `--check` exits with status 1 when the
ratio of medians is below the target.
"""
from __future__ import annotations

import mmap
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from reference import (LOAD_ADDR, MEM_SIZE, Run, build_c_reference, compare, exit_rate_arguments,
                       interleave,
                       out_loop_guest, print_table, run_c_reference)
from vlab.kvm import Hlt, IoOut, Kvm, Regs
from vlab.kvm import vcpu as vcpu_module
from vlab.kvm.abi import ffi

TARGET = 0.9


def run_vlab(guest: bytes, exit_path=vcpu_module._exitpath) -> Run:
    """One round in-process, set up as exit_loop.c does (a fresh VM, 1 MiB at 0, CS base 0,
    RIP at the load address); only the run loop is timed, as in C. `exit_path=None` decodes
    in Python."""
    installed, vcpu_module._exitpath = vcpu_module._exitpath, exit_path
    try:
        return _run_vlab(guest)
    finally:
        vcpu_module._exitpath = installed


def _run_vlab(guest: bytes) -> Run:
    mem = mmap.mmap(-1, MEM_SIZE)
    mem[LOAD_ADDR:LOAD_ADDR + len(guest)] = guest
    with Kvm() as kvm, kvm.create_vm() as vm, ffi.from_buffer(mem) as host:
        vm.set_user_memory_region(0, 0, MEM_SIZE, int(ffi.cast("uintptr_t", host)))
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))
        vcpu.set_regs(Regs(rip=LOAD_ADDR, rflags=2))
        run, exits = vcpu.run, 0
        start = time.perf_counter()
        while True:
            last = run()
            if last.__class__ is IoOut:
                exits += 1
                continue
            break
        seconds = time.perf_counter() - start
    mem.close()
    if not isinstance(last, Hlt):
        raise RuntimeError(f"vlab.kvm loop ended on {last.describe()}, not HLT")
    return Run(exits, seconds)


def main() -> int:
    args = exit_rate_arguments(__doc__.splitlines()[0], TARGET)

    with tempfile.TemporaryDirectory() as tmp:
        guest = out_loop_guest(args.exits, Path(tmp))
        c_binary = build_c_reference()
        contenders = {"C": partial(run_c_reference, c_binary, guest),
                      "vlab.kvm": partial(run_vlab, guest.read_bytes())}
        if vcpu_module._exitpath is not None:
            contenders["Python decode"] = partial(run_vlab, guest.read_bytes(), None)
        results = interleave(contenders, args.rounds, expected_exits=args.exits)
    print(f"{args.exits:,} port-I/O exits per run, {args.rounds} interleaved rounds (exits/s)")
    print_table(results, reference="C")
    if "Python decode" in results:
        py = compare(results, "Python decode", "C")
        print(f"with exits decoded in Python: ratio {py.ratio_of_medians:.2f}")
    c = compare(results, "vlab.kvm", "C")
    path = "compiled exit path" if vcpu_module._exitpath is not None else "decoded in Python"
    print(f"vlab.kvm run loop ({path}): {c.median_rate:,.0f} exits/s, C reference: "
          f"{c.reference_median_rate:,.0f} exits/s, ratio {c.ratio_of_medians:.2f} "
          f"(median of per-round ratios {c.median_of_ratios:.2f}; target >= {TARGET})")
    return 1 if args.check and c.ratio_of_medians < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
