"""Resident memory of a VM with 1 GiB of guest RAM before the guest touches it.

    python benchmarks/bench_memory.py [--ram 1G] [--touch 64M] [--check]

Guest RAM is an anonymous mapping (MAP_NORESERVE), so the kernel gives it pages only when
they are first touched. The process's RSS is read from /proc/self/status just before the
machine is built (everything imported already) and again once the board is complete: RAM
mapped into KVM with KVM_SET_USER_MEMORY_REGION, the standard devices, a vCPU with its
CPUID table and its runner. Then the host touches `--touch` bytes of guest RAM, one byte a
page, to show that the cost appears only then. `--check` exits with status 1 when the VM
costs more than the target.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlab.accel import select  # noqa: E402
from vlab.machine.board import parse_size  # noqa: E402
from vlab.machine.boot import create_machine  # noqa: E402
from vlab.machine.memory import PAGE_SIZE  # noqa: E402

TARGET_MIB = 50
MiB = 1 << 20


def rss() -> dict[str, int]:
    """VmRSS and its anonymous and file-backed parts, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def show(label: str, now: dict[str, int], base: dict[str, int]) -> None:
    parts = ", ".join(f"{name} {(now[name] - base[name]) / MiB:+.1f}" for name in
                      ("RssAnon", "RssFile", "RssShmem"))
    print(f"  {label:<40} VmRSS {now['VmRSS'] / MiB:8.1f} MiB   "
          f"above the interpreter: {(now['VmRSS'] - base['VmRSS']) / MiB:+7.1f} MiB ({parts})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="1G")
    parser.add_argument("--touch", default="64M")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if the untouched VM costs more than {TARGET_MIB} MiB")
    args = parser.parse_args()
    touch = parse_size(args.touch)

    base = rss()
    accel = select("kvm")
    machine, runner = create_machine(accel, memory=args.ram)
    try:
        built = rss()
        ram = machine.memory.regions[0]
        for offset in range(0, touch, PAGE_SIZE):
            ram.view[offset] = 1
        touched = rss()
        print(f"RSS of a VM with {machine.ram_size / MiB:.0f} MiB of guest RAM "
              f"(slot {ram.slot}, mapped into KVM), {len(machine.devices)} devices, "
              f"vCPU {runner.vcpu.id} with its runner:")
        show("interpreter with vlab imported", base, base)
        show("VM built, RAM untouched", built, base)
        show(f"after touching {touch / MiB:.0f} MiB of guest RAM", touched, base)
    finally:
        machine.close()
        accel.close()
    cost = (built["VmRSS"] - base["VmRSS"]) / MiB
    print(f"untouched VM: {cost:.1f} MiB above the interpreter (target <= {TARGET_MIB} MiB)")
    return 1 if args.check and cost > TARGET_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
