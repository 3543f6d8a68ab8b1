"""Lockstep: the same guest single-stepped on kvm and tcg side by side. Skipped where
/dev/kvm cannot be used."""
from __future__ import annotations

import functools
import shutil

import pytest

from vlab.kvm import detect_backend, kvm_usable
from vlab.machine.examples import EXAMPLES
from vlab.machine.lockstep import lockstep

from test_tcg_differential import PROGRAMS

_kvm = functools.cache(kvm_usable)


@pytest.fixture(autouse=True)
def needs_kvm_and_nasm():
    usable, why = _kvm()
    if not usable:
        pytest.skip(why)
    if shutil.which("nasm") is None:
        pytest.skip("nasm is not installed")


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_the_example_guests_agree_to_hlt(mode):
    report = lockstep(EXAMPLES[mode].source(), mode)
    assert report.agreed, str(report)
    assert report.stop.startswith("both halted at ") and report.steps > 100
    assert str(report).startswith(f"kvm and tcg agree through {report.steps} instructions")
    kvm, tcg = report.final
    assert kvm.regs == tcg.regs and kvm.regs.rax == 42


@pytest.mark.parametrize("name", ["flags and string ops", "port and MMIO reads"])
def test_rep_string_ops_port_and_mmio_reads_agree(name):
    """KVM here runs a whole `rep movsb` in one step, tcg one iteration per step; an MMIO
    load completes within its step on both."""
    mode, source = PROGRAMS[name]
    assert lockstep(source, mode).agreed


def test_a_runaway_guest_agrees_for_max_steps():
    report = lockstep("spin: inc ax\njmp spin", max_steps=40)
    assert report.agreed and report.steps == 40 and report.stop == "40 steps"
    assert report.final[0].regs.rax == report.final[1].regs.rax == 20


def test_isa_debug_exit_ends_the_run():
    report = lockstep("mov al, 3\nout 0xf4, al\nhlt")
    assert report.agreed and report.steps == 2
    assert report.stop == "the guest asked to exit with status 7 (isa-debug-exit)"  # (3 << 1) | 1


def test_undefined_flags_after_mul_are_a_divergence():
    report = lockstep(PROGRAMS["64-bit arithmetic"][1], "long")
    assert not report.agreed and report.divergence.step == 3
    assert report.divergence.disassembly.endswith("mul rcx")
    assert list(report.divergence.registers) == ["rflags"]


@pytest.mark.skipif(detect_backend().module != "kvm_pvm",
                    reason="only this kind of host's KVM answers CPUID leaf 1 from the host")
def test_cpuid_leaf_1_diverges_on_kvm_pvm():
    report = lockstep("mov eax, 1\nxor ecx, ecx\ncpuid\nhlt")
    d = report.divergence
    assert d is not None and d.step == 3 and report.steps == 2
    assert d.disassembly == "0x8009: 0f a2  cpuid"
    assert set(d.registers) <= {"rbx", "rcx", "rdx"} and "rcx" in d.registers
    text = str(report)
    assert text.startswith("kvm and tcg diverge at instruction 3: 0x8009: 0f a2  cpuid")
    kvm, tcg = d.after
    row = next(line for line in text.splitlines() if line.split()[0] == "rcx")
    assert row.split() == ["rcx", f"{kvm.regs.rcx:#x}", f"{tcg.regs.rcx:#x}", "*"]
    assert d.before.regs.rax == 1 and d.exits == ("single-step", "single-step")
