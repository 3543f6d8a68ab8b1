"""fds and mappings are released: at once by close(), and by the garbage collector for
objects a learner drops without closing (a notebook cell re-run does exactly that)."""
from __future__ import annotations

import gc
import mmap
import os
import weakref

import pytest

from vlab.kvm import Kvm

from guestlib import host_address

CYCLES = 1000
MAPS_SLACK = 16  # the interpreter's own allocator may add a few mappings; a leak adds CYCLES


def open_fds() -> list[str]:
    """What each open fd refers to (/dev/kvm, anon_inode:kvm-vm, ...)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the directory fd listdir itself used
            pass
    return targets


def kvm_fds() -> list[str]:
    return sorted(t for t in open_fds() if t == "/dev/kvm" or t.startswith("anon_inode:kvm"))


def mappings() -> list[str]:
    with open("/proc/self/maps") as maps:
        return maps.read().splitlines()


def kvm_run_mappings() -> list[str]:
    return [line for line in mappings() if "kvm-vcpu" in line]


def test_vm_create_close_cycles_leave_no_fd_and_no_mapping(kvm):
    kvm_runs = kvm_run_mappings()

    def cycle():
        memory = mmap.mmap(-1, 0x10000)
        with kvm.create_vm() as vm:
            vm.set_user_memory_region(0, 0, len(memory), host_address(memory))
            vm.create_vcpu(0)
            assert len(kvm_run_mappings()) == len(kvm_runs) + 1
        memory.close()

    cycle()  # first use: caches such as the vCPU mmap size
    fds, maps = open_fds(), len(mappings())
    gc.disable()  # close() alone must release everything, not the collector
    try:
        for _ in range(CYCLES):
            cycle()
    finally:
        gc.enable()
    assert sorted(open_fds()) == sorted(fds)
    assert kvm_run_mappings() == kvm_runs
    assert len(mappings()) <= maps + MAPS_SLACK


@pytest.mark.kvm
def test_objects_dropped_without_close_are_released_by_gc():
    gc.collect()  # what earlier tests dropped goes now, not during this test's collection
    fds, kvm_runs = kvm_fds(), len(kvm_run_mappings())

    def open_everything_and_drop_it():
        kvm = Kvm()
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        stats = [vm.get_stats_fd(), vcpu.get_stats_fd()]
        opened = set(kvm_fds()) - set(fds)
        assert {"/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0",
                "anon_inode:kvm-vm-stats", "anon_inode:kvm-vcpu-stats:0"} <= opened
        assert len(kvm_run_mappings()) == kvm_runs + 1
        return [weakref.ref(obj) for obj in (kvm, vm, vcpu, *stats)]

    refs = open_everything_and_drop_it()
    gc.collect()  # the VM and its vCPUs refer to each other: only the collector frees them
    assert [ref() for ref in refs] == [None] * len(refs)
    assert kvm_fds() == fds
    assert len(kvm_run_mappings()) == kvm_runs
