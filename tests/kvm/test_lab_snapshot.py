"""Snapshot, restore and step back on real KVM: every part of the vCPU state and guest memory
comes back exactly; step_back undoes registers and the memory a step wrote."""
from __future__ import annotations

import dataclasses

import pytest

from vlab.kvm import DebugRegs, Hlt, MpState
from vlab.lab import Lab, StageError
from vlab.machine.snapshot import VcpuState

pytestmark = pytest.mark.kvm

IA32_TSC = 0x10
IA32_SYSENTER_CS = 0x174
# MSRs of KVM_GET_MSR_INDEX_LIST that are clocks: they move while the vCPU is stopped and
# KVM does not wind them back. The Hyper-V ones are listed where the kernel has Hyper-V
# emulation (seen on SVM; kvm_pvm's kernel lists none).
HV_X64_MSR_VP_RUNTIME = 0x40000010
HV_X64_MSR_TIME_REF_COUNT = 0x40000020
CLOCKS = {IA32_TSC, HV_X64_MSR_VP_RUNTIME, HV_X64_MSR_TIME_REF_COUNT}
STATE_PARTS = [f.name for f in dataclasses.fields(VcpuState)]

STORES = """
    mov ax, 0x1234
    mov [0x400], ax
    mov ax, 0x5678
    mov [0x2402], ax
    hlt
"""
STEPS = [(0x8000, 0x8003), (0x8003, 0x8006), (0x8006, 0x8009), (0x8009, 0x800c)]


@pytest.fixture
def lab():
    """A real-mode Lab brought up to reset, running the real-mode example guest."""
    with Lab(accel="kvm") as lab:
        lab.bring_up()
        yield lab


@pytest.fixture
def stores():
    """A real-mode Lab brought up to reset, running STORES."""
    with Lab(accel="kvm") as lab:
        lab.load_assembly(STORES)
        lab.bring_up()
        yield lab


def capture(lab: Lab) -> VcpuState:
    return VcpuState.capture(lab.vcpus[0], lab._msr_indices, lab.accel.capabilities.vcpu_state)


def ram(lab: Lab) -> bytes:
    return lab.memory(0, lab.memory_size)


def without_clocks(state: VcpuState) -> VcpuState:
    return dataclasses.replace(state, msrs={k: v for k, v in state.msrs.items() if k not in CLOCKS})


# --- snapshot / restore -------------------------------------------------------------------------------
def test_snapshot_holds_every_part_of_the_vcpu_state_and_memory(lab):
    snap = lab.snapshot()
    [state] = snap.vcpus
    assert STATE_PARTS == ["regs", "sregs", "msrs", "fpu", "xcrs", "vcpu_events", "mp_state",
                           "debugregs"]
    assert all(getattr(state, part) is not None for part in STATE_PARTS)
    assert set(state.msrs) <= set(lab._msr_indices) and IA32_SYSENTER_CS in state.msrs
    # What is left out is what KVM will not read for this vCPU (e.g. Hyper-V's MSRs on a
    # kernel that lists them, without Hyper-V in the vCPU's CPUID).
    for index in set(lab._msr_indices) - set(state.msrs):
        assert lab.vcpus[0].get_msrs([index]) == {}, hex(index)
    assert list(snap.memory) == ["pc.ram"] and len(snap.memory["pc.ram"]) == lab.memory_size


def test_msrs_that_move_while_the_vcpu_is_stopped_are_clocks(lab):
    first, second = capture(lab), capture(lab)
    moved = {i for i in first.msrs if first.msrs[i] != second.msrs[i]}
    assert IA32_TSC in moved and moved <= CLOCKS, sorted(map(hex, moved))


@pytest.fixture
def irqchip_lab():
    """A Lab with the in-kernel irqchip, where HLT changes the MP state, brought up to reset."""
    with Lab(accel="kvm", irqchip=True) as lab:
        lab.bring_up()
        yield lab


def test_restore_brings_registers_and_memory_back_exactly(irqchip_lab):
    lab = irqchip_lab
    for _ in range(3):
        lab.step()
    snap = lab.snapshot()
    saved_state, saved_ram = capture(lab), ram(lab)
    assert without_clocks(snap.vcpus[0]) == without_clocks(saved_state)

    lab.run(timeout=0.3)  # registers, memory and MP state (HLT in the kernel) move on ...
    assert lab.vcpus[0].get_mp_state() is MpState.HALTED
    assert lab.memory(0x400, 4) == (42).to_bytes(4, "little")
    lab.machine.memory.write(0x9000, b"scribble")
    vcpu = lab.vcpus[0]  # ... and every other part of the state is changed by hand
    fpu = vcpu.get_fpu()
    vcpu.set_fpu({**fpu, "fcw": 0x27F, "xmm": [bytes([i] * 16) for i in range(16)]})
    vcpu.set_debugregs(DebugRegs((0x1111, 0x2222, 0, 0), 0xFFFF0FF0, 0x400, 0))
    vcpu.set_msrs({IA32_SYSENTER_CS: 0x10})
    vcpu.set_sregs(vcpu.get_sregs().replace(cr2=0xDEAD000))
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events({**events, "nmi": {**events["nmi"], "masked": 1}})
    moved = capture(lab)
    for part in STATE_PARTS:
        if part != "xcrs":  # XCR0 needs XSAVE, which KVM may not offer
            assert getattr(moved, part) != getattr(saved_state, part), part

    lab.restore(snap)
    restored = capture(lab)
    for part in STATE_PARTS:
        if part != "msrs":
            assert getattr(restored, part) == getattr(saved_state, part), part
    assert without_clocks(restored).msrs == without_clocks(saved_state).msrs
    # KVM writes the snapshot's TSC back, or, when the value is within a second of the TSC it
    # expects, takes the write as a synchronisation and keeps counting: never below the snapshot
    assert restored.msrs[IA32_TSC] >= snap.vcpus[0].msrs[IA32_TSC]
    assert ram(lab) == saved_ram
    assert lab.registers[0].current.regs == saved_state.regs


IA32_MISC_ENABLE = 0x1A0
FAST_STRINGS = 1 << 0


def test_restore_writes_back_the_msrs_listed_after_one_kvm_refuses(lab):
    """Without the in-kernel irqchip KVM gives MSR_KVM_ASYNC_PF_INT but refuses to set it
    (it needs the in-kernel LAPIC), and KVM_SET_MSRS stops there: the MSRs listed after it,
    such as IA32_MISC_ENABLE, must still come back."""
    vcpu = lab.vcpus[0]
    snap = lab.snapshot()
    saved = snap.vcpus[0].msrs[IA32_MISC_ENABLE]
    assert vcpu.set_msrs({IA32_MISC_ENABLE: saved ^ FAST_STRINGS}) == 1
    lab.restore(snap)
    assert vcpu.get_msrs([IA32_MISC_ENABLE]) == {IA32_MISC_ENABLE: saved}
    assert without_clocks(capture(lab)).msrs == without_clocks(snap.vcpus[0]).msrs


def test_restored_guest_runs_on_from_the_snapshot(lab):
    for _ in range(4):
        lab.step()
    snap = lab.snapshot()
    first = lab.run()
    console = lab.console
    lab.restore(snap)
    second = lab.run()
    assert isinstance(second.last_exit, Hlt) and second.rip == first.rip
    assert second.exits == first.exits
    assert lab.console == console + console[console.index("H"):]  # printed again from 'H'


def test_restore_then_step_back_has_nothing_to_undo(lab):
    lab.step()
    snap = lab.snapshot()
    lab.step()
    lab.restore(snap)
    with pytest.raises(StageError, match="nothing to step back"):
        lab.step_back()


# --- step back ----------------------------------------------------------------------------------------
def test_step_back_undoes_a_store_to_memory(stores):
    stores.step()
    store = stores.step()
    assert (store.rip_before, store.rip_after) == STEPS[1]
    assert stores.memory(0x400, 2) == bytes.fromhex("3412")
    back = stores.step_back()
    assert back.regs.rip == 0x8003 and back.regs.rax & 0xFFFF == 0x1234
    assert stores.memory(0x400, 2) == b"\0\0"
    assert stores.registers[0].current.regs.rip == 0x8003
    again = stores.step()  # and the step can be taken again
    assert (again.rip_before, again.rip_after) == STEPS[1]
    assert stores.memory(0x400, 2) == bytes.fromhex("3412")


def test_several_steps_back_in_a_row(stores):
    before = capture(stores)
    start_ram = ram(stores)
    for expected in STEPS:
        step = stores.step()
        assert (step.rip_before, step.rip_after) == expected
    assert stores.memory(0x400, 2) == bytes.fromhex("3412") and stores.memory(0x2402, 2) == bytes.fromhex("7856")
    checks = [  # after each step back: rip, ax, [0x400], [0x2402]
        (0x8009, 0x5678, "3412", "0000"),
        (0x8006, 0x1234, "3412", "0000"),
        (0x8003, 0x1234, "0000", "0000"),
        (0x8000, 0x0000, "0000", "0000"),
    ]
    for rip, ax, low, high in checks:
        regs = stores.step_back().regs
        assert (regs.rip, regs.rax & 0xFFFF) == (rip, ax)
        assert stores.memory(0x400, 2).hex() == low and stores.memory(0x2402, 2).hex() == high
    assert ram(stores) == start_ram
    assert capture(stores).regs == before.regs and capture(stores).sregs == before.sregs
    with pytest.raises(StageError, match="nothing to step back"):
        stores.step_back()


def test_step_back_after_run_is_refused(stores):
    stores.step()
    stores.run()
    with pytest.raises(StageError, match="nothing to step back: no step"):
        stores.step_back()


def test_step_back_from_hlt_lets_the_guest_run_again(stores):
    for _ in STEPS:
        stores.step()
    halt = stores.step()
    assert isinstance(halt.exit, Hlt) and stores.runners[0].halted
    stores.step_back()
    assert not stores.runners[0].halted and stores.vcpus[0].get_regs().rip == 0x800c
    assert isinstance(stores.run().last_exit, Hlt)
