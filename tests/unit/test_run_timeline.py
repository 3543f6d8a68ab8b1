"""The kernel-trace views without /dev/kvm or tracefs: a KVM_RUN's timeline and the
per-reason exit table over hand-built kernel events, as VMX (entries and exits) and
kvm_pvm (instructions emulated, no entries) report them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlab.kvm.backend import KVM_PVM, TCG, VMX
from vlab.kvm.exits import Hlt, IoOut
from vlab.kvm.kernel_events import (KvmCpuid, KvmEmulateInsn, KvmEntry, KvmExit, KvmFpu,
                                    KvmInjVirq, KvmPio, KvmUserspaceExit, KvmVcpuWakeup,
                                    RawEvent)
from vlab.kvm.state import Regs, Sregs
from vlab.lab import RegisterModel
from vlab.machine.exitlog import ExitLog, ExitRecord
from vlab.machine.snapshot import RegisterSnapshot
from vlab.widgets import KernelExitTable, KvmRunTimeline
from vlab.widgets.kernel_trace import GUEST, KVM, USERSPACE, RunTimeline, timeline_html

TID, CPU = 1234, 0


def at(t_ns: int) -> tuple[int, int, int]:
    """What every record starts with: timestamp, thread, CPU."""
    return t_ns, TID, CPU


def vmx_exit(t_ns: int, reason: int, name: str, rip: int) -> KvmExit:
    return KvmExit(*at(t_ns), vcpu_id=0, reason=reason, reason_name=name, isa="VMX", rip=rip)


def emulated(t_ns: int, rip: int, insn: bytes) -> KvmEmulateInsn:
    return KvmEmulateInsn(*at(t_ns), rip=rip, insn=insn, mode="real")


def io_exit(t_ns: int, errno: int = 0) -> KvmUserspaceExit:
    return (KvmUserspaceExit(*at(t_ns), reason=10, reason_name="EINTR", errno=errno) if errno
            else KvmUserspaceExit(*at(t_ns), reason=2, reason_name="KVM_EXIT_IO"))


# One KVM_RUN on VMX: a timer interrupt and a CPUID handled in KVM, then an OUT to userspace.
VMX_RUN = (
    KvmFpu(*at(1000), load=True),
    KvmEntry(*at(1500), vcpu_id=0, rip=0x8000),
    vmx_exit(4500, 1, "EXTERNAL_INTERRUPT", 0x8004),
    KvmEntry(*at(5100), vcpu_id=0, rip=0x8004),
    vmx_exit(6000, 10, "CPUID", 0x800A),
    KvmCpuid(*at(6200), function=0, eax=0x1C),
    KvmInjVirq(*at(6300), vector=0x20),
    KvmEntry(*at(6600), vcpu_id=0, rip=0x800C),
    vmx_exit(8000, 30, "IO_INSTRUCTION", 0x800E),
    KvmPio(*at(8100), direction="out", port=0xE9, size=1, count=1, value=0x42),
    KvmFpu(*at(8300), load=False),
    io_exit(8400),
)
# The same OUT on kvm_pvm: CPL 0 code runs in KVM's emulator; no entry or exit is traced.
PVM_RUN = (
    KvmFpu(*at(0), load=True),
    emulated(100, 0x8000, b"\xb0\x41"),
    emulated(400, 0x8002, b"\xe6\xe9"),
    KvmPio(*at(500), direction="out", port=0xE9, size=1, count=1, value=0x41),
    KvmFpu(*at(700), load=False),
    io_exit(800),
)


def record(events, seq: int = 1, exit=IoOut(port=0xE9, data=b"B")) -> ExitRecord:
    return ExitRecord(0, exit, 0x8000, None, False, 1e-6, None, None, seq=seq,
                      kernel_events=events)


def test_vmx_run_exits_handled_in_kvm_and_the_one_that_reached_userspace():
    timeline = RunTimeline(record(VMX_RUN, seq=7))
    assert timeline.entries == 3 and timeline.injected == 1 and timeline.io == 1
    assert timeline.handled_in_kernel == {"EXTERNAL_INTERRUPT": 1, "CPUID": 1}
    assert timeline.exits_to_userspace == {"IO_INSTRUCTION": 1}
    assert timeline.headline() == (
        "KVM_RUN #7 (vCPU 0): 3 VM entries, 2 exits handled in KVM (EXTERNAL_INTERRUPT 1, "
        "CPUID 1), 1 port or MMIO access, 1 interrupt or exception injected; "
        "then to userspace: IO out")
    call, *rows = timeline.rows
    assert (call.source, call.target, call.offset_ns) == (USERSPACE, KVM, None)
    assert [r.name for r in rows] == [e.name for e in VMX_RUN]
    assert rows[0].offset_ns == 0 and rows[-1].offset_ns == 7400
    exits = [r for r in rows if r.name == "kvm_exit"]
    assert [r.note.split(":")[0] for r in exits] == [
        "handled in KVM", "handled in KVM", "handle_exit returned 0"]
    assert rows[-1].note == "KVM_RUN returns 0: kvm_run.exit_reason says why"
    assert (exits[0].source, exits[0].target) == (GUEST, KVM)
    assert (rows[-1].source, rows[-1].target, rows[-1].kind) == (KVM, USERSPACE, "userspace")
    assert rows[1].line() == "     +0.5 us  KVM->guest      kvm_entry: vcpu 0 enters the guest at rip 0x8000"


def test_kvm_pvm_run_is_instructions_emulated_without_entries():
    timeline = RunTimeline(record(PVM_RUN))
    assert timeline.entries == 0 and timeline.emulated == 2 and not timeline.handled_in_kernel
    # what did not happen is left out of the headline
    assert timeline.headline() == ("KVM_RUN #1 (vCPU 0): 2 instructions emulated, "
                                   "1 port or MMIO access; then to userspace: IO out")
    emulated = [r for r in timeline.rows if r.kind == "emulate"]
    assert [r.label for r in emulated] == ["mov al, 0x41", "out 0xe9, al"]
    assert all(r.source == r.target == KVM for r in emulated)


def test_hlt_with_an_in_kernel_irqchip_blocks_in_kvm_until_a_signal():
    """VMX with an in-kernel irqchip: the HLT exit is handled in KVM (vcpu_block); the
    timeout's signal wakes the vCPU and KVM_RUN returns EINTR. Events the thread caused
    before KVM_RUN (the MMU notifier) come before the call, at negative offsets."""
    events = (RawEvent(*at(0), "kvm_unmap_hva_range", {"start": 0x7F0000000000}),
              KvmFpu(*at(2000), load=True),
              KvmEntry(*at(2500), vcpu_id=0, rip=0x8004),
              vmx_exit(3000, 12, "HLT", 0x8005),
              KvmVcpuWakeup(*at(300_000_000), ns=299_997_000, waited=True, valid=True),
              KvmFpu(*at(300_001_000), load=False),
              io_exit(300_002_000, errno=-4))
    timeline = RunTimeline(record(events))
    assert timeline.handled_in_kernel == {"HLT": 1} and not timeline.exits_to_userspace
    assert [r.name for r in timeline.rows][:3] == ["kvm_unmap_hva_range", "KVM_RUN", "kvm_fpu"]
    assert timeline.rows[0].offset() == "-2.0 us" and timeline.rows[2].offset() == "+0.0 us"
    assert [r.offset() for r in timeline.rows[-3:]] == ["+299.998 ms", "+299.999 ms", "+300.000 ms"]
    notes = {r.name: r.note for r in timeline.rows}
    assert notes["kvm_exit"] == "handled in KVM: the vCPU halts, vcpu_run waits in vcpu_block"
    assert notes["kvm_userspace_exit"].startswith("KVM_RUN returns -EINTR (a signal")


def test_an_exit_handled_before_a_pending_signal_is_not_one_for_userspace():
    events = (KvmEntry(*at(0), vcpu_id=0, rip=0x8000),
              vmx_exit(10, 1, "EXTERNAL_INTERRUPT", 0x8000),
              io_exit(20, errno=-4))
    timeline = RunTimeline(record(events))
    assert timeline.handled_in_kernel == {"EXTERNAL_INTERRUPT": 1}
    assert timeline.rows[2].note == "handled in KVM, but a signal is pending: vcpu_run stops"


def test_a_long_run_shows_its_start_and_end_and_counts_the_middle():
    loop = tuple(emulated(1000 + i, 0x8004, b"\x49") for i in range(1000))   # dec cx
    events = PVM_RUN[:1] + loop + PVM_RUN[3:]
    timeline = RunTimeline(record(events), head=5, tail=3)
    kinds = [r.kind for r in timeline.rows]
    assert kinds == ["call", "fpu"] + ["emulate"] * 3 + ["skipped"] + ["io", "fpu", "userspace"]
    assert timeline.rows[5].text == "... 997 more events: kvm_emulate_insn 997"
    assert timeline.emulated == 1000          # the counts cover every event, shown or not
    assert len(timeline.summary().splitlines()) == 1 + len(timeline.rows)


def test_a_run_without_events_says_so():
    timeline = RunTimeline(record(()))
    assert timeline.headline() == "KVM_RUN #1 (vCPU 0): no kernel events; then to userspace: IO out"
    assert [r.kind for r in timeline.rows] == ["call"]


def test_timeline_html_draws_lanes_arrows_and_escapes_text():
    events = VMX_RUN + (RawEvent(*at(9000), "kvm_test", {"text": "<b> & more"}),)
    html = timeline_html(RunTimeline(record(events)))
    assert html.count("class='vlab-kind-entry'") == 3 and html.count("class='vlab-kind-exit'") == 3
    assert "kvm_test: text=&lt;b&gt; &amp; more" in html and "<b>" not in html
    assert ">▶</span>" in html and ">◀</span>" in html      # into the guest, back out
    assert html.count("vlab-timeline-strip") == 1


# --- the views, over a hand-built lab ----------------------------------------------------------
def traced_lab(log: ExitLog, lost: int = 0) -> SimpleNamespace:
    return SimpleNamespace(registers=[RegisterModel(0)], exit_logs=[log], runners=[],
                           kernel_trace=SimpleNamespace(lost=lost, closed=False))


def test_views_say_when_kernel_tracing_is_off():
    lab = SimpleNamespace(registers=[], exit_logs=[ExitLog()], runners=[], kernel_trace=None)
    for view in (KernelExitTable(lab), KvmRunTimeline(lab)):
        assert "kernel_trace=True" in view.html.value and "kernel_trace=True" in view.summary()


@pytest.fixture
def log_with_runs():
    log = ExitLog()
    runs = [record(PVM_RUN, seq=1), record(VMX_RUN, seq=2), record((), seq=3, exit=Hlt())]
    for run in runs:
        log.append(run)
    return log


def test_timeline_follows_the_latest_run_and_steps_through_the_kept_ones(log_with_runs):
    view = KvmRunTimeline(traced_lab(log_with_runs), interval=3600)
    assert view.summary().startswith("KVM_RUN #3 (vCPU 0): no kernel events")
    assert "no kernel events were recorded for this KVM_RUN" in view.html.value
    view.previous.click()
    assert view.seq == 2 and view.timeline.entries == 3
    assert "EXTERNAL_INTERRUPT" in view.html.value
    view.previous.click()
    view.previous.click()                      # no record before the first kept one
    assert view.seq == 1 and view.timeline.emulated == 2
    view.next.click()
    assert view.seq == 2
    view.latest.click()
    assert view.seq is None and view.timeline.seq == 3
    view.show(99)
    assert "no exit record #99 kept" in view.html.value
    assert repr(view) == "KvmRunTimeline(vcpu=0)"


def test_timeline_says_when_the_backend_traces_no_vm_entries(log_with_runs):
    lab = traced_lab(log_with_runs)
    view = KvmRunTimeline(lab)
    assert "fires no kvm_entry" not in view.html.value       # a lab without a backend yet
    for backend, emulator in ((KVM_PVM, True), (VMX, None), (TCG, False)):
        lab.backend = backend
        view.render()
        shown = "fires no kvm_entry" in view.html.value
        assert shown == (emulator is not None)
        assert ("emulator ran" in view.html.value) == bool(emulator)


def test_timeline_redraws_when_a_run_ends(log_with_runs):
    lab = traced_lab(log_with_runs)
    view = KvmRunTimeline(lab, interval=3600)
    log_with_runs.append(record(VMX_RUN, seq=4))       # no live redraw for an hour
    lab.registers[0].update(RegisterSnapshot(Regs(), Sregs()))   # the run's end
    assert view.timeline.seq == 4
    view.close()
    assert log_with_runs._listeners == []


def test_kernel_exit_table_rows_bars_and_lost_events(log_with_runs):
    """kvm_pvm's run counts under its userspace exit, VMX's under its hardware exits."""
    view = KernelExitTable(traced_lab(log_with_runs, lost=5))
    table = log_with_runs.kernel_exit_table()
    assert [(r.reason, r.in_kernel, r.userspace) for r in table.rows] == [
        ("CPUID", 1, 0), ("EXTERNAL_INTERRUPT", 1, 0), ("IO_INSTRUCTION", 0, 1), ("KVM_EXIT_IO", 0, 1)]
    html = view.html.value
    assert [r.reason for r in table.rows] == [part.split("'")[0] for part in html.split("data-reason='")[1:]]
    assert "2 KVM_RUNs traced, 2 instructions emulated by KVM" in html and "5 events lost" in html
    assert html.count("width:120px") == 4      # every nonzero count is 1: full bars
    assert view.summary() == str(table) + "\n" + \
        "5 events lost (tracefs ring buffer overrun): some KVM_RUNs are incomplete"
    assert repr(view) == "KernelExitTable(vcpu=0)"
