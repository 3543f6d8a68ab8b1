"""The kernel-trace views over a real traced Lab on /dev/kvm: the timeline of each KVM_RUN
and the exit table follow what the guest did, on whichever backend runs it (kvm_pvm
emulates CPL 0 code; VMX and SVM enter the guest and exit from it)."""
from __future__ import annotations

import pytest

from vlab import Lab
from vlab.kvm import kernel_trace_usable
from vlab.widgets import KernelExitTable, KvmRunTimeline

pytestmark = pytest.mark.kvm

GUEST = """
    mov al, 'A'
    out 0xe9, al
    xor eax, eax
    cpuid
    mov al, 'B'
    out 0xe9, al
    hlt
"""
HALT = "mov al, 'A'\nout 0xe9, al\nhlt\n"


@pytest.fixture(autouse=True)
def tracefs():
    usable, why = kernel_trace_usable()
    if not usable:
        pytest.skip(why)


def traced(source: str, **options) -> Lab:
    lab = Lab(accel="kvm", kernel_trace=True, **options)
    lab.load_assembly(source)
    lab.bring_up()
    return lab


def test_each_kvm_run_on_the_timeline_ends_where_userspace_took_over():
    with traced(GUEST) as lab:
        timeline = KvmRunTimeline(lab)
        exit_table = KernelExitTable(lab)
        lab.run()
        assert lab.console == "AB"
        # the view followed the run: it shows the last KVM_RUN, the HLT
        assert timeline.timeline.seq == 3 and timeline.summary().endswith(
            "kvm_userspace_exit: KVM_EXIT_HLT  (KVM_RUN returns 0: kvm_run.exit_reason says why)")
        runs = {}
        for seq in (1, 2, 3):
            timeline.show(seq)
            runs[seq] = timeline.timeline
            assert timeline.timeline.rows[-1].kind == "userspace"
            assert [r.kind for r in timeline.timeline.rows].count("call") == 1
            if seq == 2:   # the CPUID, answered by KVM (with a page fault on VMX, SVM)
                assert "class='vlab-kind-handled'" in timeline.html.value
        assert ("fires no kvm_entry" in timeline.html.value) == (not lab.backend.traces_vm_entries)
        second = [r.name for r in runs[2].rows]
        assert second.count("kvm_cpuid") == 1 and "kvm_cpuid" not in [r.name for r in runs[1].rows]
        if lab.backend.emulates_kernel_mode:
            # kvm_pvm: the emulator ran the four instructions between the OUTs
            assert [r.label for r in runs[2].rows if r.kind == "emulate"] == [
                "xor eax, eax", "cpuid", "mov al, 0x42", "out 0xe9, al"]
        if lab.backend.traces_vm_entries:
            # VMX, SVM: CPUID is an exit KVM handled; the OUT the one it could not
            assert runs[2].entries >= 2 and sum(runs[2].handled_in_kernel.values()) >= 1
            assert sum(runs[2].exits_to_userspace.values()) == 1
        else:
            assert runs[2].entries == 0 and not runs[2].handled_in_kernel
        table = lab.exits().kernel_exit_table()
        assert exit_table.summary() == str(table)
        assert sum(row.userspace for row in table.rows) == 3
        assert all(f"data-reason='{row.reason}'" in exit_table.html.value for row in table.rows)


def test_a_halt_in_the_kernel_shows_as_vcpu_block_until_the_signal():
    with traced(HALT, irqchip=True) as lab:
        lab.run(timeout=0.3)
        assert lab.exits().histogram() == {"IO out": 1, "INTR": 1}
        timeline = KvmRunTimeline(lab).timeline
        notes = {row.name: row.note for row in timeline.rows}
        assert notes["kvm_vcpu_wakeup"] == "vcpu_block: the halted vCPU wakes up"
        assert notes["kvm_userspace_exit"].startswith("KVM_RUN returns -EINTR")
        assert not timeline.exits_to_userspace     # the HLT exit (VMX, SVM) was handled in KVM


def test_views_over_an_untraced_lab_say_how_to_trace():
    with Lab(accel="kvm") as lab:
        lab.load_assembly(HALT)
        lab.bring_up()
        lab.run()
        for view in (KvmRunTimeline(lab), KernelExitTable(lab)):
            assert "kernel_trace=True" in view.summary()
