"""The dashboard's controls without a browser: the stepper's buttons follow what a click can
do, the console says when a guest is not reading COM1, the CPUID explorer offers a new Lab
once its table is frozen, and the dashboard notebook's echo guest stays halted after `q`.
Labs here run on the software accelerator (tcg), so no /dev/kvm is needed."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlab.devices import Uart16550
from vlab.kvm.state import CpuidEntry
from vlab.lab import CpuidTable, Lab, RegisterModel
from vlab.machine.board import Console
from vlab.widgets import CpuidExplorer, SerialConsole, StageStepper

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "dashboard.ipynb"
needs_nasm = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")


def dashboard_guest() -> str:
    """The ECHO guest as notebooks/dashboard.ipynb defines it."""
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        match = re.search(r'ECHO = """(.*?)"""', "".join(cell["source"]), re.S)
        if match:
            return match.group(1)
    raise AssertionError("dashboard.ipynb defines no ECHO guest")


@needs_nasm
def test_dashboard_guest_stays_halted_when_run_again_after_q():
    with Lab(accel="tcg") as lab:
        guest = lab.load_assembly(dashboard_guest(), name="echo")
        lab.bring_up()
        lab.run(predicate=lambda record: record.reason == "IO in")
        lab.machine.devices["serial0"].feed(b"q")
        greeting = lab.machine.console.text
        data = guest.load_address + guest.code.index(b"vlab echo:")
        for _ in range(3):      # "run" pressed again and again after q
            result = lab.run(timeout=5)
            assert result.stop_reason.startswith("HLT"), result.stop_reason
            rip = lab.registers[0].current.regs.rip
            # halted in the code, never in the greeting string after it
            assert guest.load_address <= rip < data
        assert lab.machine.console.text == greeting


def uart_console(fifo: bool) -> tuple[Uart16550, SerialConsole]:
    console_model = Console()
    uart = Uart16550(output=console_model.write, name="serial0")
    if fifo:
        uart.write(2, 0x07)     # FCR: FIFOs on, 16 bytes
    lab = SimpleNamespace(registers=[RegisterModel(0)], exit_logs=[], runners=[], cpuid=None,
                          guest=None, machine=SimpleNamespace(console=console_model,
                                                              devices={"serial0": uart}))
    return uart, SerialConsole(lab)


def test_console_says_the_guest_is_not_reading_com1_not_an_error():
    uart, console = uart_console(fifo=True)
    console.input.value = "x" * 20
    assert "the guest is not reading COM1" in console.status.value
    assert "16 of 21 bytes kept" in console.status.value
    assert "vlab-error" not in console.status.value     # the student did nothing wrong
    for _ in range(16):
        uart.read(0)            # the guest reads RBR: now it is only behind


def test_console_queues_what_a_reading_guest_has_no_room_for_yet():
    """A line longer than the 16-byte FIFO, typed to a guest that reads COM1 (a shell), is
    not cut: the rest follows as the guest reads RBR, in order."""
    uart, console = uart_console(fifo=True)
    uart.read(0)                # the guest has read RBR once: it reads COM1
    console.input.value = "echo " + "y" * 30
    assert "sent 16 bytes to COM1; 20 more follow" in console.status.value
    console.input.value = "ls"  # typed while the first line still waits: after it
    received = bytearray()
    deadline = time.monotonic() + 5
    while len(received) < 39 and time.monotonic() < deadline:
        if uart.read(5) & 0x01:  # LSR.DR
            received.append(uart.read(0))
        else:
            time.sleep(0.01)     # the poller feeds what waits as room appears
    assert bytes(received) == b"echo " + b"y" * 30 + b"\rls\r"
    assert not uart.read(5) & 0x02   # no overrun
    deadline = time.monotonic() + 5
    while "read all that was typed" not in console.status.value and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "the guest has read all that was typed" in console.status.value
    console.close()


def test_stepper_enables_step_and_run_only_once_the_guest_can_run():
    lab = Lab(accel="tcg")
    stepper = StageStepper(lab)
    enabled = lambda: [b.description for b in stepper.buttons if not b.disabled]
    assert enabled() == ["next stage"]
    assert stepper.stop_button.button_style == ""       # not red while it cannot stop
    for _ in range(5):                                  # kvm_init .. pc_memory_init
        stepper.next_button.click()
        assert enabled() == ["next stage"], stepper.latest_record.name
    stepper.next_button.click()                         # kvm_arch_put_registers
    assert enabled() == ["next stage", "step", "run to next exit", "run"]
    lab.close()
    stepper.refresh()
    assert enabled() == []


def test_stop_is_red_only_while_a_run_can_be_stopped():
    lab = Lab(accel="tcg")
    lab.load_assembly("spin: jmp spin", name="spin")
    lab.bring_up()
    stepper = StageStepper(lab)
    assert stepper.stop_button.disabled and stepper.stop_button.button_style == ""
    stepper.run_button.click()
    try:
        assert not stepper.stop_button.disabled and stepper.stop_button.button_style == "danger"
    finally:
        stepper.stop_button.click()
        assert stepper.wait(10)
    assert stepper.stop_button.disabled and stepper.stop_button.button_style == ""
    lab.close()


def test_cpuid_explorer_lists_changed_rows_and_the_chosen_feature_first():
    host = [CpuidEntry(leaf) for leaf in range(0x20)] + [
        CpuidEntry(0x80000000), CpuidEntry(0x80000001, edx=(1 << 29) | (1 << 20))]
    explorer = CpuidExplorer(SimpleNamespace(cpuid=CpuidTable(host, host), registers=[]))
    first_row = lambda: re.search(r"<tr[^>]*>(?:<td[^>]*>)([^<]*)</td>",
                                  explorer.table_html.value.split("</th></tr>", 1)[1])
    assert first_row().group(1) == "0x80000001"   # the chosen feature (lm) leads, outlined
    assert "class='vlab-selected'" in first_row().group(0)
    explorer.feature.value = "nx"                 # 0x80000001 too
    explorer.enabled.value = False
    explorer.feature.value = "fpu"                # leaf 1 chosen; the changed row still first
    rows = re.findall(r"<tr[^>]*><td[^>]*>([^<]*)</td>", explorer.table_html.value)
    assert rows[:2] == ["0x80000001", "0x00000001"]   # what changed, then the chosen one


@needs_nasm
def test_frozen_cpuid_table_offers_a_new_lab_with_the_edit():
    with Lab(accel="tcg") as lab:
        lab.load_assembly("hlt", name="halt")
        lab.bring_up()
        explorer = CpuidExplorer(lab)
        assert lab.cpuid.frozen and lab.cpuid.has("lm")
        assert not explorer.feature.disabled and not explorer.enabled.disabled
        assert explorer.new_lab_button.layout.display == "none"
        explorer.enabled.value = False
        assert explorer.new_lab_button.layout.display == ""
        assert explorer.new_lab_button.description == "new Lab with -lm"
        assert lab.cpuid.has("lm")                    # the frozen table is untouched
        explorer.new_lab_button.click()
        new = explorer.new_lab
        try:
            assert new is not lab and not new.cpuid.frozen and not new.cpuid.has("lm")
            assert (new.accel_choice, new.memory_size, new.nr_vcpus, new.mode) == (
                lab.accel_choice, lab.memory_size, lab.nr_vcpus, lab.mode)
            assert [r["stage"] for r in new.stages if r["status"] == "done"] == [
                "kvm_init", "x86_cpu_realizefn"]
            assert "made a new Lab" in explorer.status.value and "-lm" in explorer.status.value
            assert lab.cpuid.has("lm")
        finally:
            new.close()
