"""Lockstep: the same guest single-stepped on kvm and tcg side by side. Skipped where
/dev/kvm cannot be used."""
from __future__ import annotations

import functools
import shutil

import pytest

from vlab.accel import select
from vlab.kvm import detect_backend, kvm_usable
from vlab.machine.examples import EXAMPLES
from vlab.machine.lockstep import lockstep

from test_tcg_differential import PROGRAMS

_kvm = functools.cache(kvm_usable)
FLAG_BITS = {"CF": 1 << 0, "PF": 1 << 2, "AF": 1 << 4, "ZF": 1 << 6, "SF": 1 << 7, "OF": 1 << 11}


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
    """A single-stepped `rep movsb` runs one iteration per step on tcg, VMX and SVM (the
    trap flag) and whole on kvm_pvm (KVM's emulator); an MMIO load completes within its step
    everywhere."""
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


def test_flags_an_instruction_leaves_undefined_are_named_not_a_divergence():
    """After MUL the architecture leaves SF, ZF, AF and PF undefined, after SHLD AF (and OF
    for a count above 1): each CPU sets them its own way. KVM and tcg differed after this
    program's MUL on one kvm_pvm host and agreed on another, with another CPU; either way
    lockstep goes on to the end and names the flags that differed, and only those."""
    source = PROGRAMS["64-bit arithmetic"][1]
    report = lockstep(source, "long")
    assert report.agreed, str(report)
    assert report.stop.startswith("both halted at ")
    kvm, tcg = report.final
    assert kvm.regs == tcg.regs
    text = str(report)
    for note in report.undefined:
        mnemonic = note.disassembly.split("  ")[1].split()[0]
        assert mnemonic in {"mul", "imul", "shld"}, note
        differing = note.rflags[0] ^ note.rflags[1]
        assert {FLAG_BITS[name] for name in note.flags} == {b for b in FLAG_BITS.values() if differing & b}
        assert f"undefined flags differ after {note}" in text


def test_cpuid_leaf_1_diverges_where_kvm_answers_other_than_the_table():
    """tcg's CPUID answers from the table both vCPUs were given. KVM's answers from it too
    on VMX and SVM, but with the bits KVM keeps up to date itself (leaf 1's APIC bit follows
    IA32_APIC_BASE, OSXSAVE follows CR4); on kvm_pvm leaf 1 holds the host's raw feature
    bits (ECX among them). Lockstep diverges at the CPUID exactly in the registers where
    KVM's guest read other than the table."""
    accel = select("kvm")
    try:
        table = accel.get_supported_cpuid()
    finally:
        accel.close()
    leaf = next(e for e in table if e.function == 1 and e.index == 0)
    report = lockstep("mov eax, 1\nxor ecx, ecx\ncpuid\nhlt", cpuid=table)
    kvm, tcg = report.divergence.after if report.divergence else report.final
    assert [getattr(tcg.regs, f"r{r}x") for r in "abcd"] == [leaf.eax, leaf.ebx, leaf.ecx, leaf.edx]
    differing = {f"r{r}x" for r in "abcd" if getattr(kvm.regs, f"r{r}x") != getattr(leaf, f"e{r}x")}
    if not detect_backend().cpuid_follows_table:
        assert "rcx" in differing  # the host's bits, not the table's
    if not differing:
        assert report.agreed and report.stop == "both halted at 0x800b", str(report)  # the HLT
        return
    d = report.divergence
    assert d is not None and d.step == 3 and report.steps == 2
    assert d.disassembly == "0x8009: 0f a2  cpuid"
    assert set(d.registers) == differing
    text = str(report)
    assert text.startswith("kvm and tcg diverge at instruction 3: 0x8009: 0f a2  cpuid")
    row = next(line for line in text.splitlines() if line.split()[0] == sorted(differing)[0])
    name = sorted(differing)[0]
    assert row.split() == [name, f"{getattr(kvm.regs, name):#x}", f"{getattr(tcg.regs, name):#x}", "*"]
    assert d.before.regs.rax == 1 and d.exits == ("single-step", "single-step")
