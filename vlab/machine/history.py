"""A machine's past: the steps `step_back()` undoes, and whole-VM snapshots.

Undoing a step needs the vCPU's state before it and the previous contents of every page it
wrote. KVM tells which pages those are through its dirty log (KVM_GET_DIRTY_LOG on a slot
created with KVM_MEM_LOG_DIRTY_PAGES), as live migration asks it round by round; on an
accelerator without one (tcg) the pages are found by comparing RAM with a shadow copy.
A snapshot is what QEMU's savevm keeps: every vCPU's state and all of guest memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..x86 import PAGE_SIZE
from .snapshot import VcpuState


@dataclass
class Snapshot:
    vcpus: list[VcpuState]
    memory: dict[str, bytes]
    exits: int


def take_snapshot(machine, vcpus, msr_indices: list[int]) -> Snapshot:
    """Every vCPU's state (with the MSRs in `msr_indices`) and guest memory."""
    parts = machine.accel.capabilities.vcpu_state
    return Snapshot([VcpuState.capture(v, msr_indices, parts) for v in vcpus], machine.memory.snapshot(),
                    sum(runner.log.total for runner in machine.runners))


def restore_snapshot(machine, vcpus, snapshot: Snapshot) -> None:
    """Memory first, then each vCPU's state; the vCPUs are no longer halted."""
    machine.memory.restore(snapshot.memory)
    for vcpu, state in zip(vcpus, snapshot.vcpus):
        state.restore(vcpu)
    for runner in machine.runners:
        runner.halted = False


class StepHistory:
    """Per step: which vCPU, its state before the step, and the pages the step overwrote."""

    def __init__(self, machine):
        self.machine = machine
        self._steps: list[tuple[int, VcpuState, dict[int, bytes]]] = []
        self._shadow: bytearray | None = None

    def __len__(self) -> int:
        return len(self._steps)

    def before_step(self, index: int, vcpu) -> VcpuState:
        """Call right before stepping vCPU `index`; returns its state for `after_step`."""
        if self._shadow is None:
            self._shadow = bytearray(self._ram().view)
            self._dirty_pages()  # start a fresh dirty log
        return VcpuState.capture(vcpu, parts=self.machine.accel.capabilities.vcpu_state)

    def after_step(self, index: int, state: VcpuState) -> None:
        self._steps.append((index, state, self._overwritten()))

    def undo(self, vcpus) -> int:
        """Put the last step's vCPU and pages back; returns that vCPU's index."""
        if not self._steps:
            raise IndexError("no step to undo")
        index, state, pages = self._steps.pop()
        state.restore(vcpus[index])
        ram = self._ram()
        for gpa, page in pages.items():
            offset = gpa - ram.gpa
            ram.view[offset:offset + PAGE_SIZE] = page
            self._shadow[offset:offset + PAGE_SIZE] = page
        self.machine.runners[index].halted = False
        return index

    def clear(self) -> None:
        """Forget every step (after a run or a restore, which they cannot be undone past)."""
        self._steps.clear()
        self._shadow = None

    def _ram(self):
        return next(r for r in self.machine.memory.regions if r.slot is not None)

    def _dirty_pages(self) -> list[int]:
        """Pages of RAM written since the last call: KVM's dirty log, or the pages that
        differ from the shadow copy."""
        ram = self._ram()
        if self.machine.vm.dirty_pages is not None:
            return self.machine.vm.dirty_pages(ram)
        view, shadow = ram.view, self._shadow
        return [ram.gpa + offset for offset in range(0, ram.size, PAGE_SIZE)
                if view[offset:offset + PAGE_SIZE].tobytes() != shadow[offset:offset + PAGE_SIZE]]

    def _overwritten(self) -> dict[int, bytes]:
        """The previous contents of the pages just written, from the shadow copy (which
        then takes their new contents)."""
        ram = self._ram()
        pages = {}
        for gpa in self._dirty_pages():
            offset = gpa - ram.gpa
            pages[gpa] = bytes(self._shadow[offset:offset + PAGE_SIZE])
            self._shadow[offset:offset + PAGE_SIZE] = ram.view[offset:offset + PAGE_SIZE]
        return pages
