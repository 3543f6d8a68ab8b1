"""The exercises' checks, in process: each solution notebook's code passes its checks, and
each typical mistake gets the feedback that names it, on KVM here (tcg without /dev/kvm).

The solution code is read from the notebooks in exercises/source, so the notebooks and the
checks cannot drift apart; a mistake is the solution with one line changed.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import nbformat
import pytest

import vlab.grading as grading
from vlab.grading import CheckFailed

SOURCE = Path(__file__).resolve().parents[2] / "exercises" / "source"
NOTEBOOKS = {
    "ex1-kvm-run-loop": "kvm-run-loop", "ex2-cpu-modes": "cpu-modes",
    "ex3-cpuid": "hide-cpuid-feature", "ex4-rom-slot": "rom-slot",
    "ex5-port-device": "port-device", "ex6-exit-count": "exit-count",
}


def _cells(exercise: str):
    nb = nbformat.read(SOURCE / exercise / f"{NOTEBOOKS[exercise]}.ipynb", as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"]


def solution(exercise: str, *edits: tuple[str, str]) -> dict:
    """The namespace of the notebook's given and answer cells, after `edits` (old, new)."""
    namespace: dict = {}
    for cell in _cells(exercise):
        if cell.metadata["nbgrader"]["grade"]:
            continue
        source = cell.source
        for old, new in edits:
            if old in source:
                source = source.replace(old, new)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, f"<{exercise}>", "exec"), namespace)  # noqa: S102
    return namespace


def checks(exercise: str) -> list[str]:
    """The test cells' sources: what nbgrader runs to grade."""
    return [c.source for c in _cells(exercise) if c.metadata["nbgrader"]["grade"]]


def feedback(check, *args) -> str:
    with pytest.raises(CheckFailed) as failed:
        check(*args)
    return "\n".join(failed.value.lines())


@pytest.mark.parametrize("exercise", sorted(NOTEBOOKS))
def test_every_solution_passes_its_checks(exercise, capsys):
    namespace = solution(exercise)
    for source in checks(exercise):
        exec(source, dict(namespace))  # noqa: S102 - the test cell, as the autograder runs it
    printed = capsys.readouterr().out
    assert printed.count("✓") == len(checks(exercise)), printed


def test_every_check_cell_is_graded_and_every_check_is_used():
    used = "".join(s for exercise in NOTEBOOKS for s in checks(exercise))
    assert {name for name in grading.__all__ if name.startswith("check_")} == {
        name for name in grading.__all__ if f"{name}(" in used}


# --- exercise 1 -------------------------------------------------------------------------------

def test_run_loop_names_the_reset_vector_when_cs_is_not_set():
    ns = solution("ex1-kvm-run-loop", ("vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))", "pass"))
    text = feedback(grading.check_run_loop, ns["run_guest"])
    assert "CS.base 0xffff0000" in text and "= 0xffff1000, not at 0x1000" in text


def test_run_loop_asks_for_all_of_an_exits_data():
    ns = solution("ex1-kvm-run-loop", ("printed += exit.data", "printed += bytes([exit.value & 0xFF])"))
    text = feedback(grading.check_run_loop, ns["run_guest"])
    assert "size 2 x count 1" in text and "size * count bytes" in text


def test_run_loop_that_stops_early_is_told_to_go_on_to_hlt():
    ns = solution("ex1-kvm-run-loop", ("printed += exit.data", "return bytes(exit.data)"))
    text = feedback(grading.check_run_loop, ns["run_guest"])
    assert "returned after 1 exits" in text and "until it returns Hlt" in text


def test_an_unwritten_answer_is_feedback_not_a_traceback():
    def run_guest(accel, code):
        raise NotImplementedError()
    text = feedback(grading.check_run_loop, run_guest)
    assert text.splitlines() == ["✗ KVM_RUN loop: not yet", "  - `run_guest` is not written "
                                 "yet: replace `raise NotImplementedError()` with your code."]


def test_check_failed_renders_without_a_traceback_in_ipython():
    error = CheckFailed("x", ["first", "  indented continuation"])
    assert error._render_traceback_() == ["✗ x: not yet", "  - first", "    indented continuation"]
    assert isinstance(error, AssertionError)   # nbgrader scores a failing test cell 0


# --- exercise 2 -------------------------------------------------------------------------------

def test_long_mode_with_l_and_d_set_is_named():
    ns = solution("ex2-cpu-modes", ('selector=0x18, type=11, db=0, l=1', 'selector=0x18, type=11, db=1, l=1'))
    text = feedback(grading.check_long_mode, ns["long_mode"])
    assert "descriptor 0x18 has L=1 and D=1" in text and "CS.l and CS.db are both 1" in text


def test_long_mode_without_a_page_directory_is_a_shutdown_with_the_missing_entry():
    ns = solution("ex2-cpu-modes", ('memory.write(PDPT, struct.pack("<Q", PD | 0x3))', "pass"))
    text = feedback(grading.check_long_mode, ns["long_mode"])
    assert "ended with KVM_EXIT_SHUTDOWN" in text
    assert "0x8000, 0x7ff8, 0x400 are not mapped: PDPT entry 0 at 0x2000 is 0x0 (P=0)" in text


def test_long_mode_without_pae_is_refused_by_kvm_set_sregs():
    ns = solution("ex2-cpu-modes", ("cr4=0x20, efer=0x500", "cr4=0, efer=0x500"))
    text = feedback(grading.check_long_mode, ns["long_mode"])
    assert "KVM_SET_SREGS refused" in text and "CR4.PAE is clear" in text


def test_protected_mode_with_16_bit_code_says_which_bit():
    ns = solution("ex2-cpu-modes", ("selector=0x08, type=11, db=1", "selector=0x08, type=11, db=0"))
    text = feedback(grading.check_protected_mode, ns["protected_mode"])
    assert "CS makes this 16-bit code" in text and "CS.db=1" in text


def test_vlab_own_setup_is_refused():
    def protected_mode(sregs, memory):
        from vlab.machine.cpu_modes import setup_mode
        return setup_mode("protected", sregs, memory, ram_size=1 << 22).sregs
    assert "calls setup_mode" in feedback(grading.check_protected_mode, protected_mode)


# --- exercise 3 -------------------------------------------------------------------------------

def test_cpuid_entries_are_frozen_and_the_feedback_says_so():
    ns = solution("ex3-cpuid", ("entry = entry.replace(**{register: getattr(entry, register) & ~(1 << bit)})",
                                "setattr(entry, register, 0)"))
    text = feedback(grading.check_cpuid, ns["hide_feature"])
    assert "FrozenInstanceError" in text and "replace(field=...)" in text


def test_cpuid_hiding_more_than_the_feature_is_named():
    ns = solution("ex3-cpuid", ("getattr(entry, register) & ~(1 << bit)", "0"))
    assert "other bits changed too: leaf 0x80000001.0 EDX" in feedback(grading.check_cpuid, ns["hide_feature"])


# --- exercise 4 -------------------------------------------------------------------------------

def test_a_writable_rom_is_caught_landing_the_store():
    ns = solution("ex4-rom-slot", ("bios = memory.add_rom(0xF0000, rom)",
                                   'bios = memory.add_ram(0xF0000, 0x1000, "bios"); memory.write(0xF0000, rom)'))
    text = feedback(grading.check_rom, ns["run_with_rom"])
    assert "is writable (ram, no KVM_MEM_READONLY)" in text and "landed (the byte is now 0x55)" in text


def test_an_unmapped_rom_is_an_mmio_read():
    ns = solution("ex4-rom-slot", ("vm.map_memory(bios)", "pass"))
    text = feedback(grading.check_rom, ns["run_with_rom"])
    assert "nothing is mapped at 0xf0000" in text


# --- exercise 5 -------------------------------------------------------------------------------

def test_a_device_reading_port_numbers_is_told_about_offsets():
    ns = solution("ex5-port-device", ("return {1: self.sum, 2: self.count}.get(offset, 0)",
                                      "return {0x701: self.sum, 0x702: self.count}.get(offset, 0)"))
    text = feedback(grading.check_device, ns["Checksum"])
    assert "read(1) returned 0, expected 0x42" in text and "offsets from its base" in text


def test_a_device_wired_for_one_port_leaves_the_others_unclaimed():
    ns = solution("ex5-port-device", ("bus.register(0x700, 3, device)", "bus.register(0x700, 1, device)"))
    text = feedback(grading.check_wired_device, ns["Checksum"], ns["wire"])
    assert "ports 0x701, 0x702 are unclaimed" in text


def test_a_device_over_the_debug_console_is_a_bus_error():
    ns = solution("ex5-port-device", ("bus.register(0x700, 3, device)", "bus.register(0xE9, 3, device)"))
    text = feedback(grading.check_wired_device, ns["Checksum"], ns["wire"])
    assert "BusError" in text and "overlaps debugcon" in text


# --- exercise 6 -------------------------------------------------------------------------------

def test_a_wrong_prediction_is_explained_instruction_by_instruction():
    ns = solution("ex6-exit-count", ('return {"IO": 4, "MMIO": 2, "HLT": 1}',
                                     'return {"IO": 4, "MMIO": 2, "HLT": 1, "CPUID": 1}'))
    text = feedback(grading.check_prediction, ns["predict_exits"])
    assert "CPUID: nothing in the guest gives a CPUID exit" in text and "kvm_emulate_cpuid" in text


def test_a_count_without_hlt_is_named():
    ns = solution("ex6-exit-count", ("        elif isinstance(exit, Hlt):\n            return counts",
                                     "        elif isinstance(exit, Hlt):\n            return {k: v for k, v in counts.items() if k != 'HLT'}"))
    text = feedback(grading.check_count_exits, ns["count_exits"])
    assert "HLT included" in text
