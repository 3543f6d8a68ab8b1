"""The kernel-trace views without /dev/kvm or tracefs: a KVM_RUN's timeline and the
per-reason exit table over hand-built kernel events, as VMX (entries and exits) and
kvm_pvm (instructions emulated, no entries) report them."""
from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import pytest

from vlab.kvm.exits import Hlt, IoOut
from vlab.kvm.state import Regs, Sregs
from vlab.lab import RegisterModel
from vlab.machine.exitlog import ExitLog
from vlab.machine.snapshot import RegisterSnapshot
from vlab.widgets import KernelExitTable, KvmRunTimeline
from vlab.widgets.kernel_trace import GUEST, KVM, USERSPACE, RunTimeline, timeline_html


def event(name: str, t_ns: int, text: str, **fields) -> SimpleNamespace:
    return SimpleNamespace(name=name, timestamp_ns=t_ns, describe=lambda: text, **fields)


# One KVM_RUN on VMX: a timer interrupt and a CPUID handled in KVM, then an OUT to userspace.
VMX_RUN = (
    event("kvm_fpu", 1000, "fpu load"),
    event("kvm_entry", 1500, "VM entry at rip 0x8000"),
    event("kvm_exit", 4500, "exit EXTERNAL_INTERRUPT", reason_name="EXTERNAL_INTERRUPT"),
    event("kvm_entry", 5100, "VM entry at rip 0x8004"),
    event("kvm_exit", 6000, "exit CPUID", reason_name="CPUID"),
    event("kvm_cpuid", 6200, "cpuid 0x0 -> eax 0x1c"),
    event("kvm_inj_virq", 6300, "inject vector 0x20"),
    event("kvm_entry", 6600, "VM entry at rip 0x800c"),
    event("kvm_exit", 8000, "exit IO_INSTRUCTION", reason_name="IO_INSTRUCTION"),
    event("kvm_pio", 8100, "pio write port 0xe9 <1 byte> value 0x42"),
    event("kvm_fpu", 8300, "fpu unload"),
    event("kvm_userspace_exit", 8400, "userspace exit KVM_EXIT_IO"),
)
# The same OUT on kvm_pvm: CPL 0 code runs in KVM's emulator; no entry or exit is traced.
PVM_RUN = (
    event("kvm_fpu", 0, "fpu load"),
    event("kvm_emulate_insn", 100, "emulated 0:8000 mov al, 0x41", disassembly="mov al, 0x41"),
    event("kvm_emulate_insn", 400, "emulated 0:8002 out 0xe9, al", disassembly="out 0xe9, al"),
    event("kvm_pio", 500, "pio write port 0xe9 value 0x41"),
    event("kvm_fpu", 700, "fpu unload"),
    event("kvm_userspace_exit", 800, "userspace exit KVM_EXIT_IO"),
)


def record(events, seq: int = 1, exit=IoOut(port=0xE9, data=b"B")) -> SimpleNamespace:
    return SimpleNamespace(vcpu=0, seq=seq, reason="IO out", exit=exit, kernel_events=events)


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
    assert rows[1].line() == "     +0.5 us  KVM->guest      VM entry at rip 0x8000"


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
    events = (event("kvm_unmap_hva_range", 0, "kvm_unmap_hva_range: start=0x7f0000000000"),
              event("kvm_fpu", 2000, "fpu load", load=True),
              event("kvm_entry", 2500, "VM entry at rip 0x8004"),
              event("kvm_exit", 3000, "exit HLT", reason_name="HLT"),
              event("kvm_vcpu_wakeup", 300_000_000, "wait time 300 ms"),
              event("kvm_fpu", 300_001_000, "fpu unload", load=False),
              event("kvm_userspace_exit", 300_002_000, "userspace exit EINTR", errno=-4))
    timeline = RunTimeline(record(events))
    assert timeline.handled_in_kernel == {"HLT": 1} and not timeline.exits_to_userspace
    assert [r.name for r in timeline.rows][:3] == ["kvm_unmap_hva_range", "KVM_RUN", "kvm_fpu"]
    assert timeline.rows[0].offset() == "-2.0 us" and timeline.rows[2].offset() == "+0.0 us"
    notes = {r.name: r.note for r in timeline.rows}
    assert notes["kvm_exit"] == "handled in KVM: the vCPU halts, vcpu_run waits in vcpu_block"
    assert notes["kvm_userspace_exit"].startswith("KVM_RUN returns an error (EINTR")


def test_an_exit_handled_before_a_pending_signal_is_not_one_for_userspace():
    events = (event("kvm_entry", 0, "VM entry"),
              event("kvm_exit", 10, "exit EXTERNAL_INTERRUPT", reason_name="EXTERNAL_INTERRUPT"),
              event("kvm_userspace_exit", 20, "userspace exit EINTR", errno=-4))
    timeline = RunTimeline(record(events))
    assert timeline.handled_in_kernel == {"EXTERNAL_INTERRUPT": 1}
    assert timeline.rows[2].note == "handled in KVM, but a signal is pending: vcpu_run stops"


def test_a_long_run_shows_its_start_and_end_and_counts_the_middle():
    loop = tuple(event("kvm_emulate_insn", i, f"emulated {i}", disassembly="dec ecx")
                 for i in range(1000))
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
    events = VMX_RUN[:-1] + (event("kvm_userspace_exit", 9000, "exit <IO> & more"),)
    html = timeline_html(RunTimeline(record(events)))
    assert html.count("class='vlab-kind-entry'") == 3 and html.count("class='vlab-kind-exit'") == 3
    assert "exit &lt;IO&gt; &amp; more" in html and "<IO>" not in html
    assert ">▶</span>" in html and ">◀</span>" in html      # into the guest, back out
    assert html.count("vlab-timeline-strip") == 1


# --- the views, over a hand-built lab ----------------------------------------------------------
TableRow = namedtuple("TableRow", "reason in_kernel userspace")


class FakeTable:
    """What ExitLog.kernel_exit_table() returns, built by hand."""

    def __init__(self, rows):
        self.rows = rows

    def __str__(self):
        return "\n".join(f"{r.reason} {r.in_kernel} {r.userspace}" for r in self.rows)


def traced_lab(log: ExitLog, lost: int = 0) -> SimpleNamespace:
    return SimpleNamespace(registers=[RegisterModel(0)], exit_logs=[log], runners=[],
                           kernel_trace=SimpleNamespace(lost=lost))


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


def test_timeline_redraws_when_a_run_ends(log_with_runs):
    lab = traced_lab(log_with_runs)
    view = KvmRunTimeline(lab, interval=3600)
    log_with_runs.append(record(VMX_RUN, seq=4))       # the throttle was due at the first exit
    lab.registers[0].update(RegisterSnapshot(Regs(), Sregs()))   # the run's end
    assert view.timeline.seq == 4
    view.close()
    assert log_with_runs._listeners == []


def test_kernel_exit_table_rows_bars_and_lost_events(log_with_runs, monkeypatch):
    rows = [TableRow("EXTERNAL_INTERRUPT", 120, 0), TableRow("IO_INSTRUCTION", 0, 2),
            TableRow("HLT", 0, 1)]
    monkeypatch.setattr(ExitLog, "kernel_exit_table", lambda self: FakeTable(rows), raising=False)
    view = KernelExitTable(traced_lab(log_with_runs, lost=5))
    html = view.html.value
    assert [r.reason for r in rows] == [part.split("'")[0] for part in html.split("data-reason='")[1:]]
    assert "120</td>" in html and "5 events lost" in html
    assert view.summary() == str(FakeTable(rows)) + "\n" + \
        "5 events lost (tracefs ring buffer overrun): some KVM_RUNs are incomplete"
    assert repr(view) == "KernelExitTable(vcpu=0)"
