"""An accelerator handed to the student's code that records what the code did with it.

The student's VMM gets the real accelerator (`vlab.accel.select("auto")`: KVM where
/dev/kvm works, else tcg) wrapped so that the check can say afterwards which VMs and vCPUs
were made, which memory was mapped and which exits each `run()` returned; and so that a
loop which never stops is stopped, with the reason, instead of hanging the notebook.
"""
from __future__ import annotations

import threading
import time

from ..accel import select
from ..kvm.exits import Interrupted
from .feedback import CheckFailed

MAX_EXITS = 10_000     # far more than any exercise guest makes
RUN_SECONDS = 10.0     # the guest's whole run, in KVM_RUN


class WatchedVcpu:
    """A vCPU whose exits are kept in `exits`; other calls go to the real one."""

    def __init__(self, vcpu, exercise: str):
        self._vcpu = vcpu
        self._exercise = exercise
        self.exits: list = []
        self.reset_sregs = vcpu.get_sregs()   # what the vCPU starts with unless it is set
        self.regs_set = self.sregs_set = None
        self._seconds = 0.0

    def run(self):
        if len(self.exits) >= MAX_EXITS:
            raise CheckFailed(self._exercise, [
                f"your loop called run() {MAX_EXITS} times; the guest's last exits were "
                + ", ".join(e.describe() for e in self.exits[-3:])
                + ": stop the loop at the exit that ends the guest (HLT)."])
        timer = threading.Timer(max(RUN_SECONDS - self._seconds, 0.01), self._vcpu.kick,
                                (threading.get_ident(),))
        start = time.monotonic()
        timer.start()
        try:
            exit = self._vcpu.run()
        finally:
            timer.cancel()
            self._seconds += time.monotonic() - start
        self.exits.append(exit)
        if exit.__class__ is Interrupted and self._seconds >= RUN_SECONDS:
            raise CheckFailed(self._exercise, [
                f"the guest ran {RUN_SECONDS:.0f} s without an exit that ends it; RIP is "
                f"{self._vcpu.get_regs().rip:#x}. Did the vCPU start where the code is?"])
        return exit

    def set_regs(self, regs) -> None:
        self.regs_set = regs
        self._vcpu.set_regs(regs)

    def set_sregs(self, sregs) -> None:
        self.sregs_set = sregs
        self._vcpu.set_sregs(sregs)

    def __getattr__(self, name):
        return getattr(self._vcpu, name)


class WatchedVm:
    """A VM whose memory regions (`regions`) and vCPUs (`vcpus`) are kept."""

    def __init__(self, vm, exercise: str, backend):
        self._vm = vm
        self._exercise = exercise
        self.backend = backend
        self.regions: list = []
        self.vcpus: list[WatchedVcpu] = []

    def map_memory(self, region, **flags) -> None:
        self._vm.map_memory(region, **flags)
        self.regions.append(region)

    def create_vcpu(self, vcpu_id: int = 0) -> WatchedVcpu:
        vcpu = WatchedVcpu(self._vm.create_vcpu(vcpu_id), self._exercise)
        self.vcpus.append(vcpu)
        return vcpu

    def region_at(self, gpa: int):
        """The mapped region holding `gpa`, or None."""
        return next((r for r in self.regions if r.gpa <= gpa < r.gpa + r.size), None)

    def read_physical(self, gpa: int, size: int) -> bytes:
        """Bytes of mapped memory, as the host sees them (ValueError outside it)."""
        region = self.region_at(gpa)
        if region is None or region.view is None:
            raise ValueError(f"{gpa:#x} is not backed by mapped memory")
        offset = gpa - region.gpa
        return bytes(region.view[offset:offset + size])

    def __getattr__(self, name):
        return getattr(self._vm, name)


class WatchedAccel:
    """`vlab.accel.select("auto")`, recording the VMs made on it (`vms`)."""

    def __init__(self, exercise: str, accel: str = "auto"):
        self._accel = select(accel)
        self._exercise = exercise
        self.vms: list[WatchedVm] = []

    def create_vm(self) -> WatchedVm:
        vm = WatchedVm(self._accel.create_vm(), self._exercise, self._accel.backend)
        self.vms.append(vm)
        return vm

    def __getattr__(self, name):
        return getattr(self._accel, name)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self._accel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
