"""The tcg VM: the guest-physical memory map its vCPUs share.

Each vCPU is its own Unicorn engine (one engine emulates one CPU), and each engine maps the
same host memory, so all of them, and the loaders, see one guest RAM. Translated code is
per engine: one vCPU rewriting code another is running is not noticed by the other.
"""
from __future__ import annotations

from .vcpu import TcgVcpu


class TcgVm:
    """QEMU's `AddressSpace` and vCPU list for a TCG machine."""

    dirty_pages = None   # no dirty log: who needs written pages compares memory instead

    def __init__(self) -> None:
        self._regions: list = []   # backed regions, by address
        self.vcpus: list[TcgVcpu] = []

    def map_memory(self, region) -> None:
        """Back a `vlab.machine.memory.Region` with its host memory: RAM read/write/execute,
        ROM read/execute (a guest store to it exits as `MmioWrite`). An MMIO region needs no
        mapping: every address no region backs is a hole. The region's memory must stay
        mapped until the VM is closed, as for KVM."""
        if region.host_address is None or region in self._regions:
            return  # a hole; or mapped already, as KVM takes a slot set again unchanged
        for other in self._regions:
            if region.gpa < other.gpa + other.size and other.gpa < region.gpa + region.size:
                raise ValueError(f"region {region.name!r} at {region.gpa:#x} overlaps "
                                 f"{other.name!r} at {other.gpa:#x}")
        self._regions = sorted([*self._regions, region], key=lambda r: r.gpa)
        for vcpu in self.vcpus:
            vcpu._engine.set_memory(self._regions)

    def host_address(self, gpa: int) -> int:
        """The host address behind a backed guest-physical address."""
        for region in self._regions:
            if region.gpa <= gpa < region.gpa + region.size:
                return region.host_address + gpa - region.gpa
        raise ValueError(f"guest-physical {gpa:#x} is not backed by host memory")

    def create_vcpu(self, vcpu_id: int = 0) -> TcgVcpu:
        if any(vcpu.id == vcpu_id for vcpu in self.vcpus):
            raise ValueError(f"vCPU {vcpu_id} already exists")
        vcpu = TcgVcpu(self, vcpu_id)
        vcpu._engine.set_memory(self._regions)
        self.vcpus.append(vcpu)
        return vcpu

    def forget_vcpu(self, vcpu: TcgVcpu) -> None:
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)

    def close(self) -> None:
        for vcpu in list(self.vcpus):
            vcpu.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
