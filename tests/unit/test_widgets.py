"""vlab.widgets without /dev/kvm or a browser: views over hand-built layer-3 models and a Lab
that has not started. A model changes (or a button is clicked); the widget state follows."""
from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest

from vlab.devices import Uart16550
from vlab.kvm.exits import Hlt, IoOut
from vlab.kvm.state import CpuidEntry, Regs, Segment, Sregs
from vlab.lab import CpuidTable, Lab, RegisterModel
from vlab.machine.board import Console
from vlab.machine.exitlog import ExitLog, ExitRecord
from vlab.machine.memory import GuestMemory
from vlab.machine.snapshot import RegisterSnapshot
from vlab.widgets import (CpuidExplorer, Dashboard, Disassembly, ExitHistogram, MemoryView,
                          RegisterView, SerialConsole, StageStepper, code_bits, hexdump)
from vlab.widgets.base import Poller

LONG_CS = Segment(selector=8, type=11, l=1)
PROTECTED = Sregs(cr0=0x11, cs=Segment(selector=8, type=11, db=1, g=1, limit=0xFFFFFFFF))


def snapshot(rip: int = 0x8000, sregs: Sregs = Sregs(cr0=0x10), **regs) -> RegisterSnapshot:
    return RegisterSnapshot(Regs(rip=rip, **regs), sregs)


def fake_lab(**parts) -> SimpleNamespace:
    """The parts of a Lab a view reads, built by hand."""
    lab = SimpleNamespace(registers=[], exit_logs=[], runners=[], machine=None, cpuid=None, guest=None)
    lab.__dict__.update(parts)
    return lab


# --- helpers --------------------------------------------------------------------------------
@pytest.mark.parametrize("sregs, bits", [
    (Sregs(cr0=0x10), 16),                                   # real mode
    (PROTECTED, 32),
    (Sregs(cr0=0x11, cs=Segment(selector=8, type=11)), 16),  # 16-bit protected-mode code
    (Sregs(cr0=0x80000011, efer=0x500, cs=LONG_CS), 64),
    (Sregs(cr0=0x80000011, efer=0x500, cs=Segment(selector=8, type=11, db=1)), 32),  # compat
    (Sregs(cr0=0x11, efer=0x100, cs=LONG_CS), 16),         # LME without LMA: not long mode
])
def test_code_bits_follows_cr0_efer_and_cs(sregs, bits):
    assert code_bits(sregs) == bits


def test_hexdump_lines():
    assert hexdump(b"Hi\x00" + bytes(range(0x41, 0x51)), 0x7FF0) == [
        "00007ff0  48 69 00 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d  |Hi.ABCDEFGHIJKLM|",
        "00008000  4e 4f 50                                         |NOP|"]


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_poller_calls_once_the_version_moved_then_waits_the_interval():
    poller, version, calls = Poller(), [0], []
    unwatch = poller.watch(lambda: version[0], lambda: calls.append(time.monotonic()), 0.3)
    time.sleep(3 * Poller.TICK)
    assert calls == []                      # nothing changed: nothing drawn
    for _ in range(1000):
        version[0] += 1                     # as exits come, no call each
    assert wait_for(lambda: len(calls) == 1)
    version[0] += 1
    assert wait_for(lambda: len(calls) == 2)
    assert calls[1] - calls[0] >= 0.3       # the last change, shown once the interval is over
    unwatch()
    assert wait_for(lambda: poller._thread is None)   # nothing watched: the thread ends
    version[0] += 1
    time.sleep(3 * Poller.TICK)
    assert len(calls) == 2


def test_poller_goes_on_after_a_watch_fails(capsys):
    poller, version, calls = Poller(), [0], []
    unwatch_broken = poller.watch(lambda: version[0], lambda: 1 / 0, 0.01)
    unwatch = poller.watch(lambda: version[0], lambda: calls.append(version[0]), 0.01)
    for _ in range(3):
        version[0] += 1
        assert wait_for(lambda: calls[-1:] == version)
    unwatch_broken()
    unwatch()
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_poller_counts_the_interval_from_the_end_of_a_slow_call():
    """A draw slower than the interval (as on an emulated host) does not run back to back."""
    poller, version, calls = Poller(), [0], []
    unwatch = poller.watch(lambda: version[0],
                           lambda: (calls.append(time.monotonic()), time.sleep(0.1)), 0.05)
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        version[0] += 1
        time.sleep(0.001)
    unwatch()
    assert len(calls) >= 2 and all(b - a >= 0.15 for a, b in zip(calls, calls[1:]))


# --- views over hand-built models ---------------------------------------------------------------
def test_register_view_follows_its_model():
    model = RegisterModel(0)
    view = RegisterView(fake_lab(registers=[model]))
    assert "no registers yet" in view.html.value
    model.update(snapshot(0x8000))        # no stage refreshed the view: the subscription does
    model.update(snapshot(0x8003, rax=0x2A))
    assert view.highlighted == {"rip", "rax"}
    assert "data-reg='rip' title='was 0x8000'>0000000000008003<" in view.html.value
    model.update(snapshot(0x8003, sregs=PROTECTED, rax=0x2A))
    assert view.highlighted == {"cr0", "cs"} and "protected" in view.summary()
    assert repr(view) == "RegisterView(vcpu=0)"
    view.close()
    model.update(snapshot(0x9000))
    assert "0000000000009000" not in view.html.value


def test_histogram_changes_with_the_exit_log():
    log = ExitLog(counter_names=("exits", "insn_emulation"))
    runner = SimpleNamespace(kernel_counters=lambda: {"exits": 3, "insn_emulation": 1000, "other": 5})
    model = RegisterModel(0)
    view = ExitHistogram(fake_lab(exit_logs=[log], runners=[runner], registers=[model]),
                         interval=3600)
    empty = view.html.value
    assert "nothing yet" in empty and view.summary() == "0 userspace exits: none yet\n" \
        "KVM's counters: exits 3, insn_emulation 1000"
    for _ in range(2):
        log.append(ExitRecord(0, IoOut(port=0x80), 0x8000, None, False, 1e-5, None, None))
    log.append(ExitRecord(0, Hlt(), 0x8001, None, True, 1e-5, None, None))
    # The poller saw the log's total move and drew; later changes wait for the interval
    # (an hour here) or the end of the run.
    assert wait_for(lambda: view.redraws == 2)
    log.append(ExitRecord(0, IoOut(port=0x80), 0x8002, None, False, 1e-5, None, None))
    time.sleep(3 * Poller.TICK)
    assert view.redraws == 2
    model.update(snapshot(0x8002))
    assert view.redraws == 3 and view.html.value != empty
    assert view.summary().startswith("4 userspace exits: IO out 3, HLT 1")
    view.close()
    assert log._listeners == []


def test_histogram_bars_are_to_scale_with_their_counts_printed():
    log = ExitLog(counter_names=("exits",))
    runner = SimpleNamespace(kernel_counters=lambda: {"exits": 4})
    view = ExitHistogram(fake_lab(exit_logs=[log], runners=[runner], registers=[RegisterModel(0)]))
    for reason, n in ((IoOut(port=0x80), 400), (Hlt(), 1)):
        for _ in range(n):
            log.append(ExitRecord(0, reason, 0x8000, None, False, 1e-5, None, None))
    view.render()
    html = view.html.value
    assert re.search(r"data-exit='IO out'>.*?width:100\.00%.*?>400<", html)
    assert re.search(r"data-exit='HLT'>.*?width:0\.25%.*?>1<", html)    # 1:400, linear
    assert "linear" in html
    view.close()


def test_views_say_whether_they_follow_the_lab():
    memory = GuestMemory()
    memory.add_ram(0, 0x10000)
    model = RegisterModel(0)
    model.update(snapshot(0x8000))
    lab = fake_lab(registers=[model], machine=SimpleNamespace(memory=memory))
    live, at_cell = RegisterView(lab), RegisterView(lab, live=False)
    disassembly = Disassembly(lab, live=False)
    model.update(snapshot(0x8001))
    assert "data-reg='rip' title='was 0x8000'>0000000000008001<" in live.html.value
    assert "0000000000008000<" in at_cell.html.value
    assert disassembly.current == 0x8000
    assert "live: follows the lab" in live.caption.value
    assert "as at this cell" in at_cell.caption.value and at_cell.caption in at_cell.children
    memory.close()


def test_cpuid_explorer_toggles_until_frozen():
    host = [CpuidEntry(0, eax=1), CpuidEntry(0x80000001, edx=(1 << 29) | (1 << 20))]
    table = CpuidTable(host, host)
    explorer = CpuidExplorer(fake_lab(cpuid=table))
    assert explorer.feature.options == tuple(sorted(explorer.feature.options))
    assert explorer.enabled.value and not explorer.enabled.disabled
    explorer.enabled.value = False
    assert not table.has("lm") and "-lm" in explorer.summary()
    table.frozen = True
    table.notify(frozen=True)
    assert not explorer.enabled.disabled and not explorer.feature.disabled
    explorer.enabled.value = True          # frozen: the edit waits for a new Lab
    assert not table.has("lm") and explorer.edits == {"lm": True}
    assert "KVM_SET_CPUID2" in explorer.status.value and "new Lab" in explorer.status.value


def test_serial_console_feeds_the_uart_and_streams_output():
    console_model = Console()
    uart = Uart16550(output=console_model.write, name="serial0")
    model = RegisterModel(0)
    lab = fake_lab(registers=[model],
                   machine=SimpleNamespace(console=console_model, devices={"serial0": uart}))
    console = SerialConsole(lab, newline="\n")
    console.input.value = "x"       # no FIFOs enabled: the newline overruns the held "x"
    assert uart.state()["rx_fifo"] == b"\n" and "1 of 2 bytes kept" in console.status.value
    console_model.write(b"<tag> & more")    # streamed while the guest runs, by the poller
    assert wait_for(lambda: "&lt;tag&gt; &amp; more" in console.output.value)
    assert console.summary() == "<tag> & more"
    console.close()


def test_memory_view_and_disassembly_read_guest_memory():
    memory = GuestMemory()
    memory.add_ram(0, 0x10000)
    memory.write(0x8000, bytes.fromhex("fa b8 2a 00 f4"))   # cli; mov ax, 42; hlt
    model = RegisterModel(0)
    lab = fake_lab(registers=[model], machine=SimpleNamespace(memory=memory))
    memory_view = MemoryView(lab, follow_rip=True, length=32)
    disassembly = Disassembly(lab, after=3)
    assert disassembly.summary() == "vCPU 0: nothing to disassemble yet"
    model.update(snapshot(0x8001))
    assert memory_view.start == 0x7FF0
    assert "title='RIP'>b8</span>" in memory_view.html.value
    assert [(l.address, l.text, l.current) for l in disassembly.lines if l.address >= 0x8000] == [
        (0x8000, "cli", False), (0x8001, "mov ax, 0x2a", True), (0x8004, "hlt", False),
        (0x8005, "add byte ptr [bx + si], al", False)]
    model.update(snapshot(0x20000))
    assert "outside guest memory" in disassembly.html.value
    memory.close()


# --- a Lab that has not started ----------------------------------------------------------------
def test_dashboard_over_a_fresh_lab_says_what_is_missing():
    lab = Lab(accel="kvm")      # nothing opened yet
    dashboard = Dashboard(lab)
    summary = dashboard.summary()
    for text in ("stages done: 0/7, next: kvm_init", "vCPU 0: no registers yet",
                 "no guest memory yet", "no CPU model yet", "0 userspace exits"):
        assert text in summary
    dashboard.stepper.step_button.click()
    assert "step failed: StageError: the guest cannot run yet" in dashboard.stepper.status_text
    dashboard.stepper.stop_button.click()
    assert dashboard.stepper.status_text == "stop: the guest is not running"
    assert repr(dashboard) == "Dashboard()"
    # one caption for the whole Dashboard, whose views are all live
    assert dashboard.children[0] is dashboard.caption and "live" in dashboard.caption.value
    assert all(view.live and view.caption.layout.display == "none" for view in dashboard.views)


# --- the stepper's background runs, with a Lab whose run waits for stop -----------------------
class WaitingLab:
    """Stages all done; `run()` blocks until `stop()`, as a guest that never exits would."""
    stages = [{"stage": "kvm_cpu_exec", "title": "the KVM_RUN loop", "status": "done"}]
    records: dict = {}
    closed = False
    busy = None     # what runs it (vlab.Lab.busy); the stepper's own runs are its `running`

    def __init__(self):
        self.stopped = threading.Event()
        self.steps = 0

    def run(self, **options):
        self.stopped.wait(5)
        return "stopped: by stop()"

    def stop(self, cause: str = "stopped") -> None:
        self.stopped.set()

    def step(self, vcpu: int = 0):
        self.steps += 1
        return "one step"


def test_stepper_runs_in_the_background_refuses_clicks_and_stops():
    lab = WaitingLab()
    stepper = StageStepper(lab)
    finished = []
    stepper.on_action(lambda: finished.append(
        (stepper.running, threading.current_thread() is threading.main_thread())))
    stepper.run_button.click()
    assert stepper.running and "the guest is running" in stepper.status_text
    assert [b.description for b in stepper.buttons if not b.disabled] == ["stop"]
    for button in (stepper.step_button, stepper.run_button, stepper.exit_button, stepper.next_button):
        button.click()
        assert "refused: the guest has been running" in stepper.status_text
    assert lab.steps == 0
    stepper.stop_button.click()
    assert stepper.wait(5) and stepper.status_text == "run: stopped: by stop()"
    assert finished == [(False, False)]     # after the run, on the run's thread
    assert stepper.next_button.disabled and not stepper.step_button.disabled
    stepper.step_button.click()
    assert lab.steps == 1 and stepper.status_text == "step: one step"
