"""vlab.widgets over a real Lab on /dev/kvm, without a browser: drive the Lab (or click a
button) and check the widget state that follows."""
from __future__ import annotations

import time

import pytest

from vlab import Lab
from vlab.widgets.base import POLLER
from vlab.widgets import (CpuidExplorer, Dashboard, Disassembly, ExitHistogram, KvmStatsView,
                          MemoryView, RegisterView, SerialConsole, StageStepper)

pytestmark = pytest.mark.kvm

# Echoes COM1 input back upper-cased until it reads 'q', then halts.
ECHO = """\
    mov dx, 0x3fa
    mov al, 0x07            ; FCR: enable and clear the 16-byte FIFOs
    out dx, al
poll:
    mov dx, 0x3fd           ; LSR
    in al, dx
    test al, 1              ; DR: a byte has arrived
    jz poll
    mov dx, 0x3f8
    in al, dx               ; RBR
    cmp al, 'q'
    je done
    and al, 0xdf            ; upper case (letters)
    out dx, al              ; THR
    jmp poll
done:
    hlt
"""
SPIN = "spin: jmp spin\n"                       # never exits on its own
OUT_FOREVER = "again: out 0x80, al\n jmp again\n"  # one userspace exit per loop


def up(source: str | None = None) -> Lab:
    lab = Lab(accel="kvm")
    if source is not None:
        lab.load_assembly(source)
    lab.bring_up()
    return lab


@pytest.fixture
def lab():
    with up() as lab:
        yield lab


# Seconds before a background run or redraw counts as hung: generous, since Python and
# matplotlib run ~25x slower on an emulated KVM host (./run-tests --host svm).
HUNG = 60.0


def wait_for(condition, timeout: float = HUNG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def rip_cell(view: RegisterView) -> str:
    """The text of the RIP cell, as a browser would show it."""
    html = view.html.value
    start = html.index("data-reg='rip'")
    return html[html.index(">", start) + 1:html.index("<", start)]


def test_step_changes_rip_text_and_highlights_what_changed(lab):
    view = RegisterView(lab)
    assert rip_cell(view) == "0000000000008000" and view.highlighted == set()
    lab.step()   # cld
    assert rip_cell(view) == "0000000000008001" and view.highlighted == {"rip"}
    lab.step()   # mov si, hello
    assert view.highlighted == {"rip", "rsi"}
    assert "class='vlab-changed'" in view.html.value and "RIP=0x8004" in view.summary()
    lab.step_back()
    assert rip_cell(view) == "0000000000008001"


def test_register_view_decodes_control_registers_and_mode():
    with Lab(accel="kvm", mode="long") as lab:
        view = RegisterView(lab)
        assert "no registers yet" in view.html.value
        lab.bring_up()
        view.refresh()
        html = view.html.value
        assert "long (64-bit)" in html and ">LME LMA<" in html and "PE" in html
        assert "long (64-bit) mode" in view.summary()


def test_histogram_redraws_after_a_run_and_skips_identical_redraws(lab):
    histogram = ExitHistogram(lab)
    before, redraws = histogram.html.value, histogram.redraws
    lab.run()
    assert histogram.html.value != before and histogram.redraws > redraws
    assert "<tr data-exit='IO out'>" in histogram.html.value
    assert histogram.summary().startswith("22 userspace exits: IO out 21, HLT 1")
    line = histogram.summary().splitlines()[1]
    assert line.startswith("KVM's counters: ")  # in the stats fd's order, which backends differ in
    kernel = dict(item.rsplit(" ", 1) for item in line.removeprefix("KVM's counters: ").split(", "))
    assert int(kernel["exits"]) >= 22  # every userspace exit is a VM exit first
    if lab.backend.emulates_kernel_mode:
        # kvm_pvm emulates this ring-0 guest instruction by instruction; on VMX and SVM it
        # runs on the CPU and insn_emulation counts only what KVM itself had to decode.
        assert int(kernel["insn_emulation"]) > 0
    redraws = histogram.redraws
    histogram.refresh()
    assert histogram.redraws == redraws


def test_histogram_updates_live_while_the_guest_runs():
    with up(OUT_FOREVER) as lab:
        histogram = ExitHistogram(lab, interval=0.05)
        stepper = StageStepper(lab)
        first = histogram.redraws
        stepper.run_button.click()
        try:
            wait_for(lambda: histogram.redraws >= first + 3)
            assert stepper.running
        finally:
            stepper.stop_button.click()
            assert stepper.wait(HUNG)
        assert histogram.summary().split()[0] == str(lab.exits().total)


def test_console_updates_live_while_the_guest_prints():
    """Also where the compiled run loop takes the debug console's bytes without Python."""
    with up("mov al, 'x'\nagain: out 0xe9, al\n jmp again\n") as lab:
        console = SerialConsole(lab, interval=0.05)
        stepper = StageStepper(lab)
        stepper.run_button.click()
        try:
            wait_for(lambda: "xxx" in console.output.value)
            assert stepper.running
        finally:
            stepper.stop_button.click()
            assert stepper.wait(HUNG)
        assert console.summary() == "x" * lab.exits().histogram()["IO out"]
        console.close()


def test_stepper_buttons_walk_the_stages_then_run():
    with Lab(accel="kvm") as lab:
        stepper = StageStepper(lab)
        assert "data-stage='kvm_init' data-status='next'" in stepper.stages_html.value
        stepper.step_button.click()
        assert "step failed: StageError" in stepper.status_text
        for name in ("kvm_init", "x86_cpu_realizefn", "kvm_init_vcpu", "kvm_arch_init_vcpu",
                     "pc_memory_init", "kvm_arch_put_registers"):
            stepper.next_button.click()
            assert stepper.latest_record.name == name
            assert f"<h4>{name} " in stepper.record_html.value
        stepper.next_button.click()          # kvm_cpu_exec: runs in the background
        assert stepper.wait(HUNG)
        assert "HLT" in stepper.status_text and stepper.latest_record.name == "kvm_cpu_exec"
        assert "KVM_RUN" in stepper.record_html.value
        assert stepper.next_button.disabled and stepper.stop_button.disabled
        assert "stages done: 7/7" in stepper.summary()


def test_run_to_next_exit_makes_one_exit(lab):
    stepper = StageStepper(lab)
    stepper.exit_button.click()
    assert stepper.wait(HUNG)
    assert lab.exits().total == 1 and "max_exits=1 reached" in stepper.status_text


def test_stop_interrupts_a_runaway_guest_and_clicks_meanwhile_are_refused():
    with up(SPIN) as lab:
        stepper = StageStepper(lab)
        stepper.run_button.click()
        time.sleep(0.2)
        assert stepper.running and not stepper.stop_button.disabled and stepper.step_button.disabled
        stepper.step_button.click()
        assert "step refused: the guest has been running" in stepper.status_text
        assert "class='vlab-error'" in stepper.status.value
        stepper.stop_button.click()
        assert stepper.wait(HUNG)
        assert "stopped from the stepper" in stepper.status_text
        assert not stepper.step_button.disabled and stepper.stop_button.disabled
        stepper.step_button.click()          # the guest can go on after a stop
        assert stepper.status_text.startswith("step: 0x8000 -> 0x8000")


def test_cpuid_toggle_edits_the_model_until_kvm_set_cpuid2():
    with Lab(accel="kvm") as lab:
        explorer = CpuidExplorer(lab)
        assert explorer.enabled.disabled and explorer.summary() == "no CPU model yet"
        lab.kvm_init()
        lab.x86_cpu_realizefn()
        explorer.refresh()
        assert explorer.feature.value == "lm" and explorer.enabled.value
        explorer.enabled.value = False
        assert not lab.cpuid.has("lm")
        assert "-lm" in explorer.summary() and "class='vlab-changed'" in explorer.table_html.value
        explorer.feature.value = "nx"
        assert explorer.enabled.value == lab.cpuid.has("nx")
        lab.cpuid.set_feature("lm", True)     # an edit elsewhere shows here too
        explorer.feature.value = "lm"
        assert explorer.enabled.value
        lab.kvm_init_vcpu()
        lab.kvm_arch_init_vcpu()
        assert "frozen" in explorer.summary()
        explorer.enabled.value = False        # frozen: the edit waits for a new Lab
        assert lab.cpuid.has("lm") and explorer.new_lab_button.description == "new Lab with -lm"


def test_serial_input_reaches_the_uart_and_the_guest_echoes_it():
    with up(ECHO) as lab:
        console = SerialConsole(lab)
        lab.run(max_exits=2)                  # the guest enables the FIFOs, then polls LSR
        console.input.value = "hi"
        assert console.input.value == ""
        assert lab.machine.devices["serial0"].state()["rx_fifo"] == b"hi\r"
        assert "sent 3 bytes to COM1" in console.status.value
        lab.run(max_exits=40)
        assert console.summary() == "HI\r" and "HI" in console.output.value
        console.feed("q")
        lab.run()
        assert lab.machine.devices["serial0"].state()["rx_fifo"] == b"\r"   # after the q
        assert lab.last_run.stop_reason.startswith("HLT")


def test_serial_overrun_is_reported():
    with up() as lab:        # the example guest never enables the FIFOs: one byte is kept
        console = SerialConsole(lab)
        assert console.feed("abc") == 1
        assert "1 of 4 bytes kept" in console.status.value


def test_disassembly_marks_rip_in_the_current_mode(lab):
    view = Disassembly(lab)
    assert view.bits == 16 and view.current == 0x8000
    current = [line for line in view.lines if line.current]
    assert [(l.address, l.text) for l in current] == [(0x8000, "cld")]
    assert current[0].source.startswith("cld")
    lab.step()
    lab.step()
    assert view.current == 0x8004
    behind = [l.text for l in view.lines if l.address < 0x8004]
    assert behind[-2:] == ["cld", "mov si, 0x802e"]    # re-synchronised behind RIP
    assert "<tr class='vlab-current'" in view.html.value
    assert "=> 0x8004: mov ebx, 0x2a" in view.summary()


def test_disassembly_of_long_mode_is_64_bit():
    with Lab(accel="kvm", mode="long") as lab:
        lab.bring_up()
        view = Disassembly(lab)
        assert view.bits == 64
        assert [l.address for l in view.lines if l.current] == [0x8000]


def test_memory_view_follows_rip_and_marks_its_byte(lab):
    view = MemoryView(lab, follow_rip=True, length=64)
    assert view.start == 0x7FF0 and "<span class='vlab-rip'" in view.html.value
    lab.step()
    assert view.start == 0x7FF0
    view.address.value = "0x400"
    assert view.start == 0x400 and not view.follow.value
    lab.run()                                   # the guest stores 42 at 0x400
    assert view.summary().splitlines()[0].startswith("00000400  2a 00 00 00")
    view.address.value = "nonsense"
    assert "not an address" in view.html.value


def test_kvm_stats_view_marks_counters_that_moved(lab):
    view = KvmStatsView(lab)
    assert len(view.counters) > 20 and view.highlighted == set()
    lab.run()
    assert {"exits", "halt_exits"} <= view.highlighted
    if lab.backend.emulates_kernel_mode:  # kvm_pvm; on VMX and SVM the guest runs natively
        assert "insn_emulation" in view.highlighted
    view.refresh()                              # a second render of the same run keeps them
    assert "exits" in view.highlighted and "data-stat='exits'" in view.html.value


def test_dashboard_refreshes_every_view_after_each_stepper_action():
    with Lab(accel="kvm") as lab:
        dashboard = Dashboard(lab)
        assert "no registers yet" in dashboard.registers.summary()
        for _ in range(6):
            dashboard.stepper.next_button.click()
        assert dashboard.registers.summary().startswith("vCPU 0 in real mode: RIP=0x8000")
        assert dashboard.cpuid.model.frozen and dashboard.memory.start == 0x7FF0
        dashboard.stepper.step_button.click()
        assert "RIP=0x8001" in dashboard.registers.summary()
        assert dashboard.disassembly.current == 0x8001
        dashboard.stepper.run_button.click()
        assert dashboard.stepper.wait(HUNG)
        assert not dashboard.stepper.step_button.disabled and dashboard.stepper.stop_button.disabled
        assert dashboard.console.summary() == "Hello from real mode\n"
        assert "HLT" in dashboard.histogram.summary()
        assert "[KvmStatsView]" in dashboard.summary()
        dashboard.close()
        assert lab.exit_logs[0]._listeners == [] and lab.machine.console.listeners == []


def test_dashboard_follows_stages_and_steps_typed_in_cells():
    """No button pressed: the Lab's own events refresh the views."""
    with Lab(accel="kvm") as lab:
        dashboard = Dashboard(lab)
        lab.bring_up()
        assert dashboard.registers.summary().startswith("vCPU 0 in real mode: RIP=0x8000")
        lab.step()
        assert "RIP=0x8001" in dashboard.registers.summary()
        lab.step_back()
        assert "RIP=0x8000" in dashboard.registers.summary()
        dashboard.close()
        assert lab._subscribers == []


def test_lab_notifies_each_event_in_order():
    with Lab(accel="kvm") as lab:
        events = []
        lab.subscribe(lambda _lab, **event: events.append(event))
        lab.bring_up()
        lab.step()
        lab.step_back()
        lab.run()
        assert [e.get("stage") for e in events[:6]] == [s["stage"] for s in lab.stages[:6]]
        lab.run()
        # the first run is the kvm_cpu_exec stage: one event, once its record is complete
        assert [e["event"] for e in events[6:]] == ["step", "step_back", "stage", "run"]
        assert events[8]["stage"] == "kvm_cpu_exec"


def test_a_step_draws_each_dashboard_view_once():
    """The models tell the views when to redraw; the Lab's event must not draw them again."""
    with Lab(accel="kvm") as lab:
        dashboard = Dashboard(lab)
        drawn = []
        for view in dashboard.views:   # before the views attach, so they call this one
            render = view.render
            view.render = lambda view=view, render=render: (drawn.append(type(view).__name__),
                                                            render())
        lab.bring_up()
        drawn.clear()
        lab.step()
        time.sleep(3 * POLLER.TICK)   # the poller, too, saw the log and console move
        assert sorted(drawn) == sorted(type(view).__name__ for view in dashboard.views
                                       if type(view).__name__ != "CpuidExplorer")
        assert "RIP=0x8000" not in dashboard.registers.summary()
        dashboard.close()
